"""`moe expert ...`: add (train or import), prompts, list, retire, activate."""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli import output
from cli.args import positive_float, positive_int
from cli.context import Context
from cli.routers import cmd_router_train
from core.errors import InvalidInputError
from core.names import validate_expert_name

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

LIST_HELP = (
    "list the experts. 'gain' is how much lower the expert's held-out answer NLL is than the bare backbone's, "
    "measured on its own held-out split when it was trained ('-' for imported adapters: never measured here). "
    "'traffic' is its share of the requests the router decided (model 'auto', not forced) in the last --hours "
    "hours, counted by top expert; the rest went to other experts or to the bare backbone ('-': no such "
    "requests in the window)."
)


def check_add(ctx: Context, args: argparse.Namespace) -> None:
    """The checks of `expert add` that need no model, cheapest first: bad input is refused before the backbone
    loads (seconds to minutes), a bad name before even the registry opens. The rules live in core.names,
    the registry and experts.*; the pipelines apply them again, plus the adapter's rank and fit to the backbone."""
    if (args.data is None) == (args.adapter is None):
        raise InvalidInputError("Give exactly one of --data FILE or --adapter DIR.")
    validate_expert_name(args.name)
    from registry import repository as repo

    with ctx.sessions() as session:
        repo.require_new_expert(session, args.name)
    if args.prompts is not None:
        from experts.data import load_texts

        load_texts(args.prompts)
    if args.data is not None:
        from experts.data import MIN_EXAMPLES, load_examples

        load_examples(args.data, min_records=MIN_EXAMPLES)  # exists, a known format, well formed, enough records
    else:
        from experts.adapters import load_lora_weights

        load_lora_weights(args.adapter, args.name)  # safetensors only, structure, shapes; backbone fit comes later


def cmd_expert_add(ctx: Context, args: argparse.Namespace) -> int:
    check_add(ctx, args)
    if args.data is not None:
        from experts.training import TrainConfig
        from pipelines.train_expert import train_expert_from_file

        result = train_expert_from_file(ctx.settings, ctx.backbone, ctx.sessions, args.name, args.data,
                                        args.description, TrainConfig(epochs=args.epochs), prompts=args.prompts)
        print(f"expert {args.name} v{result.version}: held-out answer NLL {result.expert_loss:.3f} vs bare backbone "
              f"{result.base_loss:.3f} ({100 * result.reduction:.0f}% lower), MLflow run {result.run_id}")
        if result.warning:
            print(f"warning: {result.warning}", file=sys.stderr)
    else:
        from pipelines.register import register_adapter

        version = register_adapter(ctx.settings, ctx.sessions, ctx.backbone, args.name, args.adapter,
                                   args.description, args.prompts)
        print(f"expert {args.name} v{version} registered from {args.adapter}")
    if args.no_router:
        print("router not retrained (--no-router): the expert answers when named, `auto` does not pick it yet")
        return 0
    return cmd_router_train(ctx, argparse.Namespace(promote="auto"))


def expert_rows(session: Session, window: timedelta) -> list[dict[str, Any]]:
    """One row per expert: registry fields, held-out NLL of the current version (expert and bare backbone, as
    the training pipeline recorded them) and the expert's share of recently routed traffic."""
    from registry import repository as repo
    from registry.models import utcnow

    versions = repo.current_versions(session)
    counts = repo.routed_top_experts(session, utcnow() - window)
    routed = sum(counts.values())
    rows = []
    for expert in repo.list_experts(session):
        version = versions.get(expert.name)
        metrics = version.metrics if version is not None else {}
        base, tuned = metrics.get("eval_loss_base"), metrics.get("eval_loss_expert")
        requests = counts.get(expert.name, 0)
        rows.append({
            "name": expert.name, "status": expert.status, "version": expert.current_version,
            "source": version.source if version is not None else None, "description": expert.description,
            "heldout_nll_base": base, "heldout_nll_expert": tuned,
            "heldout_gain": 1 - tuned / base if base and tuned is not None else None,
            "routed_requests": requests, "traffic_share": requests / routed if routed else None,
        })
    return rows


LIST_COLUMNS: list[output.Column] = [
    ("name", "name", str), ("status", "status", str), ("version", ">version", str),
    ("heldout_gain", ">gain", output.percent), ("traffic_share", ">traffic", output.share),
    ("description", "description", str),
]


def show_experts(ctx: Context, as_json: bool = False, hours: float = 24.0) -> int:
    with ctx.sessions() as session:
        rows = expert_rows(session, timedelta(hours=hours))
    if as_json:
        output.print_json(rows)
    else:
        output.print_table(rows, LIST_COLUMNS)
    return 0


def cmd_expert_list(ctx: Context, args: argparse.Namespace) -> int:
    return show_experts(ctx, args.json, args.hours)


def _set_status(ctx: Context, name: str, status: str) -> int:
    from registry import repository as repo

    with ctx.sessions.begin() as session:
        repo.set_expert_status(session, name, status)
    print(f"expert {name}: {status}")
    return 0


def cmd_expert_prompts(ctx: Context, args: argparse.Namespace) -> int:
    from experts.data import load_texts
    from pipelines.routing_prompts import add_routing_prompts

    texts = load_texts(args.prompts)  # exists, well formed, not empty: before the registry changes
    added = add_routing_prompts(ctx.sessions, args.name, texts)
    print(f"expert {args.name}: {added.train} training and {added.val} validation routing prompts added "
          f"({added.known} already known)")
    if not added.train + added.val:
        print("nothing new: the router is unchanged")
        return 0
    if args.no_router:
        print("router not retrained (--no-router): `moe router train` learns the prompts")
        return 0
    return cmd_router_train(ctx, argparse.Namespace(promote="auto"))


def cmd_expert_retire(ctx: Context, args: argparse.Namespace) -> int:
    from registry.models import ExpertStatus

    return _set_status(ctx, args.name, ExpertStatus.RETIRED)


def cmd_expert_activate(ctx: Context, args: argparse.Namespace) -> int:
    from registry.models import ExpertStatus

    return _set_status(ctx, args.name, ExpertStatus.ACTIVE)


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    expert = sub.add_parser("expert", help="register, list, retire experts").add_subparsers(dest="sub", required=True)
    add = expert.add_parser("add", parents=[common], help="train from data or import a peft adapter")
    add.add_argument("name")
    add.add_argument("--data", type=Path, help="JSONL/CSV with messages or prompt/response")
    add.add_argument("--adapter", type=Path, help="peft LoRA folder (safetensors)")
    add.add_argument("--prompts", type=Path, help="extra JSONL of {'text'} routing prompts for the domain")
    add.add_argument("--description", default="")
    add.add_argument("--epochs", type=positive_int, default=3)
    add.add_argument("--no-router", action="store_true", help="do not retrain the router afterwards")
    add.set_defaults(func=cmd_expert_add)
    listing = expert.add_parser("list", parents=[common], help="experts with held-out gain and traffic share",
                                description=LIST_HELP)
    listing.add_argument("--json", action="store_true", help="print one JSON list of objects instead of a table")
    listing.add_argument("--hours", type=positive_float, default=24.0, help="traffic window in hours (default 24)")
    listing.set_defaults(func=cmd_expert_list)
    prompts = expert.add_parser("prompts", parents=[common], help="add routing prompts to an expert and retrain "
                                "the router (what a verdict below 90%% for a new expert asks for)")
    prompts.add_argument("name")
    prompts.add_argument("--prompts", type=Path, required=True, help="JSONL of {'text'} routing prompts")
    prompts.add_argument("--no-router", action="store_true", help="do not retrain the router afterwards")
    prompts.set_defaults(func=cmd_expert_prompts)
    retire = expert.add_parser("retire", parents=[common], help="stop serving and routing to it (history kept)")
    retire.add_argument("name")
    retire.set_defaults(func=cmd_expert_retire)
    activate = expert.add_parser("activate", parents=[common], help="bring a retired expert back")
    activate.add_argument("name")
    activate.set_defaults(func=cmd_expert_activate)
