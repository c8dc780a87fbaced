"""`moe router ...`: train, retrain from logs, list, promote, roll back."""

from __future__ import annotations

import argparse
from datetime import datetime
from typing import TYPE_CHECKING, Any

from cli import output
from cli.context import Context
from core.errors import InvalidInputError

if TYPE_CHECKING:
    from pipelines.train_router import Encode


def _encoder(ctx: Context) -> Encode:
    from pipelines.train_router import backbone_encoder

    return backbone_encoder(ctx.settings, ctx.backbone)


def cmd_router_train(ctx: Context, args: argparse.Namespace) -> int:
    from pipelines.train_router import routable_state, train_router

    routable_state(ctx.sessions)  # no expert with routing prompts: say so before the backbone loads
    report = train_router(ctx.settings, ctx.sessions, _encoder(ctx), ctx.backbone.fingerprint, promote=args.promote)
    verdict = "promoted" if report.promoted else "not promoted"
    print(f"router v{report.version}: accuracy {report.metrics['accuracy']:.3f} on {report.metrics['n']} held-out "
          f"prompts, {verdict} ({'; '.join(report.reasons)})")
    return 0


def _since(value: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if value else None
    except ValueError as exc:
        raise InvalidInputError(f"--since {value!r} is not an ISO date or time (e.g. 2026-11-01).") from exc


def cmd_router_retrain(ctx: Context, args: argparse.Namespace) -> int:
    from pipelines.retrain_router import require_log_labels, retrain_from_logs

    if not args.from_logs:
        raise InvalidInputError("Say where the labels come from: --from-logs.")
    since = _since(args.since)
    require_log_labels(ctx.sessions, since)  # no labels: say so before the backbone loads
    report = retrain_from_logs(ctx.settings, ctx.sessions, _encoder(ctx), ctx.backbone.fingerprint, since=since,
                               promote=args.promote)
    verdict = "promoted" if report.promoted else "rejected, the active router stays"
    reasons = "; ".join(report.reasons)
    print(f"router v{report.version}: accuracy {report.metrics['accuracy']:.3f}, {verdict} ({reasons})")
    return 0


def router_rows(ctx: Context) -> list[dict[str, Any]]:
    from registry import repository as repo

    with ctx.sessions() as session:
        return [{
            "version": r.version, "status": r.status, "accuracy": r.metrics.get("accuracy"),
            "heldout_prompts": r.metrics.get("n"), "abstain_rate": r.metrics.get("abstain_rate"),
            "experts": list(r.experts), "created_at": r.created_at, "promoted_at": r.promoted_at,
            "mlflow_run_id": r.mlflow_run_id,
        } for r in repo.list_routers(session)]


LIST_COLUMNS: list[output.Column] = [
    ("version", ">version", str), ("status", "status", str), ("accuracy", ">accuracy", output.number),
    ("heldout_prompts", ">held-out", output.text), ("experts", "labels", ", ".join),
]


def cmd_router_list(ctx: Context, args: argparse.Namespace) -> int:
    rows = router_rows(ctx)
    if args.json:
        output.print_json(rows)
    else:
        output.print_table(rows, LIST_COLUMNS)
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


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    router = sub.add_parser("router", help="train, promote, roll back routers").add_subparsers(dest="sub",
                                                                                                 required=True)
    train = router.add_parser("train", parents=[common], help="train a router on the registered experts' prompts")
    train.add_argument("--promote", choices=["auto", "always", "never"], default="auto")
    train.set_defaults(func=cmd_router_train)
    retrain = router.add_parser("retrain", parents=[common], help="train a candidate from request logs and feedback")
    retrain.add_argument("--from-logs", action="store_true", required=True)
    retrain.add_argument("--since", help="ISO date/time: only logs from then on")
    retrain.add_argument("--promote", choices=["auto", "always", "never"], default="auto")
    retrain.set_defaults(func=cmd_router_retrain)
    listing = router.add_parser("list", parents=[common], help="router versions: status, held-out accuracy, labels")
    listing.add_argument("--json", action="store_true", help="print one JSON list of objects instead of a table")
    listing.set_defaults(func=cmd_router_list)
    promote = router.add_parser("promote", parents=[common], help="make VERSION the active router")
    promote.add_argument("version", type=int)
    promote.set_defaults(func=cmd_router_promote)
    rollback = router.add_parser("rollback", parents=[common], help="re-activate the previously promoted router")
    rollback.set_defaults(func=cmd_router_rollback)
