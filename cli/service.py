"""`moe up / down / init / route / stats / eval`: the service and the commands that use the whole model."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta
from pathlib import Path

from cli.args import positive_float, positive_int
from cli.context import Context
from cli.experts import show_experts
from core.errors import InvalidInputError

EXAMPLE = """curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\
  -d '{{"model": "auto", "max_tokens": 64, "messages": [{{"role": "user",
        "content": "I have had a fever and a sore throat for three days. Should I see a doctor?"}}]}}'"""


def _check_deploy_config(ctx: Context) -> None:
    """A broken MOE_DEPLOY_CONFIG is refused before the backbone loads and Ray starts, in one line."""
    import yaml
    from pydantic import ValidationError

    from api.serve_app import load_deploy_config

    try:
        load_deploy_config(ctx.settings)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'file'}: {e['msg']}" for e in exc.errors())
        raise InvalidInputError(f"Deploy config {ctx.settings.deploy_config}: {problems}.") from exc
    except (yaml.YAMLError, OSError) as exc:
        reason = " ".join(str(exc).split())
        raise InvalidInputError(f"Deploy config {ctx.settings.deploy_config} cannot be read ({reason}).") from exc


def _require_router(ctx: Context) -> None:
    from registry import repository as repo

    with ctx.sessions() as session:
        repo.require_active_router(session)


def cmd_up(ctx: Context, args: argparse.Namespace) -> int:
    from serving import local_ray

    _check_deploy_config(ctx)
    ctx.bootstrap()
    ctx.release_backbone()  # the service loads its own copies; free this one
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
    return show_experts(ctx)


def cmd_route(ctx: Context, args: argparse.Namespace) -> int:
    from experts.data import load_texts
    from pipelines.route import route_file

    load_texts(args.input)  # a bad file or no router fails before the model loads
    _require_router(ctx)
    count = route_file(ctx.routing(), args.input, args.output, args.top_k)
    if args.output is not None:
        print(f"routed {count} lines -> {args.output}", file=sys.stderr)
    return 0


def cmd_stats(ctx: Context, args: argparse.Namespace) -> int:
    from pipelines.routing_stats import routing_stats

    stats = routing_stats(ctx.settings, ctx.sessions, window=timedelta(hours=args.hours))
    print(stats.to_string(float_format=lambda v: f"{v:.3f}") if not stats.empty else "no requests in the window")
    return 0


def cmd_eval_qa(ctx: Context, args: argparse.Namespace) -> int:
    from pipelines.evaluate import evaluate_qa, format_table, load_qa
    from serving.pool import ExpertPoolCore

    items = load_qa(args.input)
    _require_router(ctx)
    routing = ctx.routing()
    pool = ExpertPoolCore(ctx.settings, ctx.sessions, ctx.backbone)
    pool.engine.stop()
    result = evaluate_qa(items, routing, pool.engine.multi, ctx.backbone.tokenizer)
    print(format_table(result))
    if args.json:
        print(json.dumps(result))
    return 0


def add_service_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    up = sub.add_parser("up", parents=[common],
                        help="serve locally on MOE_HOST:MOE_PORT (registers the default experts first)")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", parents=[common], help="stop the local service").set_defaults(func=cmd_down)
    init = sub.add_parser("init", parents=[common], help="register the default experts and train the first router")
    init.set_defaults(func=cmd_init)


def add_model_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    route = sub.add_parser("route", parents=[common], help="route a JSONL file of {'text'} lines")
    route.add_argument("--input", type=Path, required=True)
    route.add_argument("--output", type=Path)
    route.add_argument("--top-k", type=positive_int)
    route.set_defaults(func=cmd_route)

    stats = sub.add_parser("stats", parents=[common],
                           help="routing statistics from the request log (also logged to MLflow)")
    stats.add_argument("--hours", type=positive_float, default=24.0)
    stats.set_defaults(func=cmd_stats)

    evaluate = sub.add_parser("eval", help="evaluate experts").add_subparsers(dest="sub", required=True)
    qa = evaluate.add_parser("qa", parents=[common], help="answer NLL: routed vs bare backbone vs named expert")
    qa.add_argument("--input", type=Path, required=True)
    qa.add_argument("--json", action="store_true", help="also print the result as one JSON line after the table")
    qa.set_defaults(func=cmd_eval_qa)
