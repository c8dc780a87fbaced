"""The `moe` command line. Every failure the user can fix is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from functools import cached_property
from pathlib import Path

from core.errors import InvalidInputError, MoEError
from core.settings import Settings
from registry.models import ExpertStatus

logger = logging.getLogger("moe")

EXAMPLE = """curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\
  -d '{{"model": "auto", "max_tokens": 64, "messages": [{{"role": "user",
        "content": "I have had a fever and a sore throat for three days. Should I see a doctor?"}}]}}'"""


class Context:
    """Lazily built heavy parts, so `moe --help` and `moe expert list` stay fast."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def sessions(self):
        from registry.db import session_factory

        return session_factory(self.settings)

    @cached_property
    def backbone(self):
        from experts.backbone import load_backbone

        return load_backbone(self.settings)

    def routing(self):
        from router.service import RoutingService

        service = RoutingService(self.settings, self.sessions, self.backbone.model, self.backbone.tokenizer)
        service.refresh()
        return service

    def bootstrap(self) -> None:
        from pipelines.bootstrap import ensure_defaults

        ensure_defaults(self.settings, self.sessions, self.backbone)


# ---- commands ---------------------------------------------------------------------------


def cmd_up(ctx: Context, args: argparse.Namespace) -> int:
    from serving import local_ray

    ctx.bootstrap()
    del ctx.__dict__["backbone"]  # the service loads its own copies; free this one
    url = local_ray.up(ctx.settings)
    print(f"moe is serving at {url}  (OpenAI-compatible; `moe down` stops it)")
    print("Try:\n" + EXAMPLE.format(url=url))
    return 0


def cmd_down(ctx: Context, args: argparse.Namespace) -> int:
    from serving import local_ray

    local_ray.down(ctx.settings)
    print("moe stopped")
    return 0


def cmd_init(ctx: Context, args: argparse.Namespace) -> int:
    ctx.bootstrap()
    return cmd_expert_list(ctx, args)


def cmd_expert_add(ctx: Context, args: argparse.Namespace) -> int:
    from experts.training import TrainConfig
    from pipelines.register import register_adapter
    from pipelines.train_expert import train_expert_from_file

    if (args.data is None) == (args.adapter is None):
        raise InvalidInputError("Give exactly one of --data FILE or --adapter DIR.")
    if args.data is not None:
        result = train_expert_from_file(ctx.settings, ctx.backbone, ctx.sessions, args.name, args.data,
                                        args.description, TrainConfig(epochs=args.epochs), prompts=args.prompts)
        print(f"expert {args.name} v{result.version}: held-out answer NLL {result.expert_loss:.3f} vs bare backbone "
              f"{result.base_loss:.3f} ({100 * result.reduction:.0f}% lower), MLflow run {result.run_id}")
        if result.warning:
            print(f"warning: {result.warning}", file=sys.stderr)
    else:
        version = register_adapter(ctx.settings, ctx.sessions, ctx.backbone, args.name, args.adapter,
                                   args.description, args.prompts)
        print(f"expert {args.name} v{version} registered from {args.adapter}")
    if args.no_router:
        print("router not retrained (--no-router): the expert answers when named, `auto` does not pick it yet")
        return 0
    return cmd_router_train(ctx, argparse.Namespace(promote="auto"))


def cmd_expert_list(ctx: Context, args: argparse.Namespace) -> int:
    from registry import repository as repo

    with ctx.sessions() as session:
        experts = repo.list_experts(session)
        print(f"{'name':<16}{'status':<10}{'version':>8}  description")
        for e in experts:
            print(f"{e.name:<16}{e.status:<10}{e.current_version:>8}  {e.description}")
    return 0


def _set_status(ctx: Context, name: str, status: str) -> int:
    from registry import repository as repo

    with ctx.sessions.begin() as session:
        repo.set_expert_status(session, name, status)
    print(f"expert {name}: {status}")
    return 0


def cmd_router_train(ctx: Context, args: argparse.Namespace) -> int:
    from pipelines.train_router import backbone_encoder, train_router

    report = train_router(ctx.settings, ctx.sessions, backbone_encoder(ctx.settings, ctx.backbone),
                          ctx.backbone.fingerprint, promote=args.promote)
    verdict = "promoted" if report.promoted else "not promoted"
    print(f"router v{report.version}: accuracy {report.metrics['accuracy']:.3f} on {report.metrics['n']} held-out "
          f"prompts, {verdict} ({'; '.join(report.reasons)})")
    return 0


def cmd_router_retrain(ctx: Context, args: argparse.Namespace) -> int:
    from datetime import datetime

    from pipelines.retrain_router import retrain_from_logs
    from pipelines.train_router import backbone_encoder

    if not args.from_logs:
        raise InvalidInputError("Say where the labels come from: --from-logs.")
    try:
        since = datetime.fromisoformat(args.since) if args.since else None
    except ValueError as exc:
        raise InvalidInputError(f"--since {args.since!r} is not an ISO date or time (e.g. 2026-11-01).") from exc
    report = retrain_from_logs(ctx.settings, ctx.sessions, backbone_encoder(ctx.settings, ctx.backbone),
                               ctx.backbone.fingerprint, since=since, promote=args.promote)
    verdict = "promoted" if report.promoted else "rejected, the active router stays"
    reasons = "; ".join(report.reasons)
    print(f"router v{report.version}: accuracy {report.metrics['accuracy']:.3f}, {verdict} ({reasons})")
    return 0


def cmd_stats(ctx: Context, args: argparse.Namespace) -> int:
    from datetime import timedelta

    from pipelines.routing_stats import routing_stats

    stats = routing_stats(ctx.settings, ctx.sessions, window=timedelta(hours=args.hours))
    print(stats.to_string(float_format=lambda v: f"{v:.3f}") if not stats.empty else "no requests in the window")
    return 0


def cmd_router_list(ctx: Context, args: argparse.Namespace) -> int:
    from registry import repository as repo

    with ctx.sessions() as session:
        for r in repo.list_routers(session):
            print(f"v{r.version:<4} {r.status:<10} accuracy {r.metrics.get('accuracy', 0):.3f}  {', '.join(r.experts)}")
    return 0


def cmd_router_promote(ctx: Context, args: argparse.Namespace) -> int:
    from registry import repository as repo

    with ctx.sessions.begin() as session:
        repo.promote_router(session, args.version)
    print(f"router v{args.version} is active")
    return 0


def cmd_router_rollback(ctx: Context, args: argparse.Namespace) -> int:
    from registry import repository as repo

    with ctx.sessions.begin() as session:
        router = repo.rollback_router(session)
    print(f"router v{router.version} is active again")
    return 0


def cmd_route(ctx: Context, args: argparse.Namespace) -> int:
    from experts.data import load_texts
    from pipelines.route import route_file

    load_texts(args.input)  # a bad file fails before the model loads
    count = route_file(ctx.routing(), args.input, args.output, args.top_k)
    if args.output is not None:
        print(f"routed {count} lines -> {args.output}", file=sys.stderr)
    return 0


def cmd_eval_qa(ctx: Context, args: argparse.Namespace) -> int:
    from pipelines.evaluate import evaluate_qa, format_table, load_qa
    from serving.pool import ExpertPoolCore

    items = load_qa(args.input)
    routing = ctx.routing()
    pool = ExpertPoolCore(ctx.settings, ctx.sessions, ctx.backbone)
    pool.engine.stop()
    result = evaluate_qa(items, routing, pool.engine.multi, ctx.backbone.tokenizer)
    print(format_table(result))
    if args.json:
        print(json.dumps(result))
    return 0


# ---- parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe", description="Mixture-of-LoRA-experts service.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="serve locally on MOE_HOST:MOE_PORT (registers the default experts first)")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop the local service").set_defaults(func=cmd_down)
    sub.add_parser("init", help="register the default experts and train the first router").set_defaults(func=cmd_init)

    expert = sub.add_parser("expert", help="register, list, retire experts").add_subparsers(dest="sub", required=True)
    add = expert.add_parser("add", help="train from data or import a peft adapter")
    add.add_argument("name")
    add.add_argument("--data", type=Path, help="JSONL/CSV with messages or prompt/response")
    add.add_argument("--adapter", type=Path, help="peft LoRA folder (safetensors)")
    add.add_argument("--prompts", type=Path, help="extra JSONL of {'text'} routing prompts for the domain")
    add.add_argument("--description", default="")
    add.add_argument("--epochs", type=int, default=3)
    add.add_argument("--no-router", action="store_true", help="do not retrain the router afterwards")
    add.set_defaults(func=cmd_expert_add)
    expert.add_parser("list").set_defaults(func=cmd_expert_list)
    retire = expert.add_parser("retire", help="stop serving and routing to it (history kept)")
    retire.add_argument("name")
    retire.set_defaults(func=lambda ctx, a: _set_status(ctx, a.name, ExpertStatus.RETIRED))
    activate = expert.add_parser("activate", help="bring a retired expert back")
    activate.add_argument("name")
    activate.set_defaults(func=lambda ctx, a: _set_status(ctx, a.name, ExpertStatus.ACTIVE))

    router = sub.add_parser("router", help="train, promote, roll back routers")
    router = router.add_subparsers(dest="sub", required=True)
    train = router.add_parser("train", help="train a router on the registered experts' prompts")
    train.add_argument("--promote", choices=["auto", "always", "never"], default="auto")
    train.set_defaults(func=cmd_router_train)
    retrain = router.add_parser("retrain", help="train a candidate from request logs and feedback")
    retrain.add_argument("--from-logs", action="store_true", required=True)
    retrain.add_argument("--since", help="ISO date/time: only logs from then on")
    retrain.add_argument("--promote", choices=["auto", "always", "never"], default="auto")
    retrain.set_defaults(func=cmd_router_retrain)
    router.add_parser("list").set_defaults(func=cmd_router_list)
    promote = router.add_parser("promote")
    promote.add_argument("version", type=int)
    promote.set_defaults(func=cmd_router_promote)
    router.add_parser("rollback").set_defaults(func=cmd_router_rollback)

    route = sub.add_parser("route", help="route a JSONL file of {'text'} lines")
    route.add_argument("--input", type=Path, required=True)
    route.add_argument("--output", type=Path)
    route.add_argument("--top-k", type=int)
    route.set_defaults(func=cmd_route)

    stats = sub.add_parser("stats", help="routing statistics from the request log (also logged to MLflow)")
    stats.add_argument("--hours", type=float, default=24.0)
    stats.set_defaults(func=cmd_stats)

    evaluate = sub.add_parser("eval", help="evaluate experts").add_subparsers(dest="sub", required=True)
    qa = evaluate.add_parser("qa", help="answer NLL: routed vs bare backbone vs named expert")
    qa.add_argument("--input", type=Path, required=True)
    qa.add_argument("--json", action="store_true")
    qa.set_defaults(func=cmd_eval_qa)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings()
        return args.func(Context(settings), args) or 0
    except MoEError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
