"""Registering a domain that borders the defaults: does the router reach it, and at whose cost?

    python -m bench.bordering [--domains hr tax insurance]

For each domain (tests/data/<domain>.jsonl: an HR desk, a tax desk, an insurer's desk, 60-80 pairs), in a scratch
data home set up as `moe init` does: the pairs' prompts are registered as `moe expert add NAME --data FILE`
registers them (split by hash into train and validation; the adapter is not trained, routing never reads it), and
the router is retrained by the product's pipeline and judged by its promotion rule (`train_router`). Then, for
the candidate as it would serve (a held-back label masked) and for the active router, in the same run:
- reach: the share of the domain's unseen prompts (tests/data/<domain>_unseen.jsonl, written apart from the
  training pairs) routed to it;
- real traffic: top-1 per default domain on the real dev routing set (bench/data/quality/routing.jsonl), the
  largest drop of an old expert's recall against the active router, and how many dev queries the new label takes.
The issue's target: at least 80% reach with no old expert's recall down more than 2 points. Last line: one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from bench.quality import OUT_OF_DOMAIN, DevQuery, load_routing, routing_scores, scratch_service
from core.settings import Settings
from experts.data import load_examples, load_texts
from experts.seed import split_texts
from registry import repository as repo
from registry.models import ExpertStatus
from router.gate import Router

logger = logging.getLogger("bench.bordering")

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
DOMAINS = ("hr", "tax", "insurance")


def load_domain(name: str) -> tuple[list[str], list[str]]:
    """(the pairs' routing texts, as `moe expert add` reads them; the unseen prompts) of a bordering domain."""
    pairs = [example.routing_text for example in load_examples(DATA / f"{name}.jsonl")]
    return pairs, load_texts(DATA / f"{name}_unseen.jsonl")


def routes(router: Router, features: torch.Tensor, held: set[str]) -> list[str]:
    """Top-1 columns as serving picks them: held-back (unrouted) columns masked."""
    allowed = {label for label in router.labels if label not in held}
    return [d.experts[0][0] for d in router.decide(features, top_k=1, allowed=allowed)]


def max_recall_drop(before: dict, after: dict) -> float:
    """The largest drop of a default domain's dev top-1 from `before` to `after` (routing_scores outputs)."""
    domains = [d for d in before if d not in (OUT_OF_DOMAIN, "in_domain")]
    return round(max(0.0, *(before[d]["top1"] - after[d]["top1"] for d in domains)), 4)


def measure(name: str, dev: list[DevQuery]) -> dict:
    from pipelines.train_router import backbone_encoder, train_router

    pairs, unseen = load_domain(name)
    train, val = split_texts(pairs)
    with scratch_service(Settings()) as (local, sessions, backbone):
        with sessions.begin() as session:
            active = Router.load(Path(repo.active_router(session).path))
            repo.add_expert(session, name, f"bordering domain: {name}", status=ExpertStatus.UNROUTED)
            repo.add_routing_examples(session, name, train, "train", "data")
            repo.add_routing_examples(session, name, val, "val", "data")
        encode = backbone_encoder(local, backbone)
        report = train_router(local, sessions, encode, backbone.fingerprint)  # promoted in the scratch home only
        candidate = Router.load(Path(report.path))
        with sessions() as session:  # a held-back label stays unrouted: serving masks its column
            held = {name} if repo.require_expert(session, name).status == ExpertStatus.UNROUTED else set()
        spec = candidate.config.spec
        unseen_x, dev_x = encode(unseen, spec), encode([q.text for q in dev], spec)
        served, column = routes(candidate, unseen_x, held), routes(candidate, unseen_x, set())
        before = routing_scores(dev, routes(active, dev_x, set()))
        dev_routes = routes(candidate, dev_x, held)
        after = routing_scores(dev, dev_routes)
    out = {
        "pairs": len(pairs), "train": len(train), "val": len(val), "unseen": len(unseen),
        "promoted": report.promoted, "held_back": bool(held), "reasons": report.reasons,
        "val_recall": report.metrics["per_label"][name]["recall"],  # 0 when held back: masked, as served
        "unseen_reach": round(served.count(name) / len(unseen), 4),
        "unseen_reach_unmasked": round(column.count(name) / len(unseen), 4),
        "dev_top1_before": before["in_domain"]["top1"], "dev_top1_after": after["in_domain"]["top1"],
        "dev_to_new": dev_routes.count(name), "max_old_recall_drop": max_recall_drop(before, after),
        "per_domain_after": {d: v["top1"] for d, v in after.items() if d not in ("in_domain", OUT_OF_DOMAIN)},
    }
    logger.info("%s: %s", name, {k: v for k, v in out.items() if k != "reasons"})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=DOMAINS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("alembic", "httpx", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.manual_seed(0)
    dev = load_routing()
    report = {name: measure(name, dev) for name in args.domains}
    report["ratios"] = {f"{name}_unseen_reach": report[name]["unseen_reach"] for name in args.domains}
    report["ratios"] |= {f"{name}_max_old_recall_drop": report[name]["max_old_recall_drop"] for name in args.domains}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
