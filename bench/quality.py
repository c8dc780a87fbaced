"""Quality on real text from sources the product never trained on (`bench/data/quality/`, built by
`python -m corpora.build`; sources in experts/seed_data/SOURCES.md):

    python -m bench.quality                       # routing, answer NLL, learning loop, routing cost
    python -m bench.quality --skip-loop --qa-per-domain 60

It sets up a scratch data home the way `moe init` does (the shipped experts and router on the default
backbone) and measures what a user gets:
- routing, per domain: top-1 accuracy on real in-domain queries, the share of them sent to `base`, and the
  share of real out-of-domain queries sent to `base`; the same for two baselines trained on the same
  training prompts as the router (TF-IDF + logistic regression, all-MiniLM-L6-v2 + logistic regression);
- answers: mean token NLL of real answers given their question, routed mixture vs the expert of the domain vs
  the bare backbone (`moe eval qa`);
- the learning loop: the dev routing set split in halves; half A is sent as requests through the HTTP app,
  its labels come back through `POST /v1/feedback`, `moe router retrain --from-logs` runs, and half B (never
  sent) is scored before and after;
- routing cost: one routing decision against a 64-token greedy generation of the same prompt.
The last line is one JSON object with the figures and their ratios against the baselines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.device import release_openmp_pool
from core.settings import Settings
from experts.seed import split_digest

logger = logging.getLogger("bench.quality")

DATA_DIR = Path(__file__).resolve().parent / "data" / "quality"
OUT_OF_DOMAIN = "general"
"""The dev routing set's label for requests that belong to no expert: the right answer is `base`."""


@dataclass(frozen=True)
class DevQuery:
    text: str
    domain: str
    source: str


def load_routing(path: Path = DATA_DIR / "routing.jsonl") -> list[DevQuery]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [DevQuery(r["text"], r["domain"], r["source"]) for r in rows]


def routing_scores(queries: Sequence[DevQuery], predicted: Sequence[str], base: str = "base") -> dict:
    """Per domain: n, top-1 accuracy, share sent to base. For out-of-domain rows the right answer is base."""
    by_domain: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for query, label in zip(queries, predicted, strict=True):
        by_domain[query.domain].append((label, base if query.domain == OUT_OF_DOMAIN else query.domain))
    out = {}
    for domain, pairs in sorted(by_domain.items()):
        out[domain] = {"n": len(pairs), "top1": round(float(np.mean([p == t for p, t in pairs])), 4),
                       "to_base": round(float(np.mean([p == base for p, _ in pairs])), 4)}
    in_domain = [(p, q.domain) for q, p in zip(queries, predicted, strict=True) if q.domain != OUT_OF_DOMAIN]
    out["in_domain"] = {"n": len(in_domain), "top1": round(float(np.mean([p == t for p, t in in_domain])), 4),
                        "to_base": round(float(np.mean([p == base for p, _ in in_domain])), 4),
                        # every domain counts the same, however many dev queries its sources gave
                        "macro_top1": round(float(np.mean([v["top1"] for k, v in out.items()
                                                           if k != OUT_OF_DOMAIN])), 4)}
    return out


def halves(queries: Sequence[DevQuery]) -> tuple[list[DevQuery], list[DevQuery]]:
    """A fixed split by text hash: half A feeds the learning loop, half B scores it."""
    a = [q for q in queries if split_digest(q.text)[1] % 2 == 0]
    b = [q for q in queries if split_digest(q.text)[1] % 2 == 1]
    return a, b


# --- set-up ----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def scratch_service(settings: Settings) -> Iterator[tuple[Settings, object, object]]:
    """A data home set up the way `moe init` does it: shipped experts and router, default backbone."""
    from experts.backbone import load_backbone
    from pipelines.bootstrap import ensure_defaults
    from registry.db import session_factory

    with tempfile.TemporaryDirectory() as home:
        local = settings.model_copy(update={"home": Path(home), "database_url": None, "mlflow_tracking_uri": None,
                                            "mlflow_artifact_root": None})
        # the converted backbone and the routing-feature cache are the user's: reruns encode only new texts
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
        (Path(home) / "cache").symlink_to(settings.cache_dir, target_is_directory=True)
        local.ensure_dirs()
        backbone = load_backbone(local)
        sessions = session_factory(local)
        ensure_defaults(local, sessions, backbone)
        yield local, sessions, backbone


def product_routes(routing, texts: Sequence[str]) -> list[str]:
    """One prompt per pass, as requests reach an idle ingress (a narrow pass: the router copy's fp16 layers)."""
    return [d.experts[0][0] for d in routing.route(list(texts), top_k=1, batch_size=1)]


# --- baselines -------------------------------------------------------------------------------------------------

def training_prompts(sessions) -> tuple[list[str], list[str]]:
    """The router's own training prompts (registry routing examples, train split) and labels."""
    from pipelines.train_router import load_labelled
    from registry import repository as repo
    from router.gate import BASE

    with sessions() as session:
        labels = [*sorted(e.name for e in repo.list_experts(session, ["active"])), BASE]
        train, _ = load_labelled(session, labels)
    return train.texts, train.labels


def baseline_routes(train_texts: list[str], train_labels: list[str], texts: Sequence[str]) -> dict[str, list[str]]:
    """TF-IDF and sentence-embedding logistic regressions on the router's training prompts."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from router.sentence import MINILM, SentenceEncoder

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    tfidf = LogisticRegression(max_iter=3000, C=10, class_weight="balanced")
    tfidf.fit(vectorizer.fit_transform(train_texts), train_labels)
    encoder = SentenceEncoder(MINILM)
    embedding = LogisticRegression(max_iter=3000, C=10, class_weight="balanced")
    embedding.fit(encoder.encode(train_texts).numpy(), train_labels)
    return {"tfidf": list(tfidf.predict(vectorizer.transform(list(texts)))),
            "embedding": list(embedding.predict(encoder.encode(list(texts)).numpy()))}


# --- answers ---------------------------------------------------------------------------------------------------

def answer_nll(local: Settings, sessions, backbone, routing, per_domain: int | None) -> dict:
    from pipelines.evaluate import evaluate_qa, load_qa
    from serving.pool import ExpertPoolCore

    items = load_qa(DATA_DIR / "qa.jsonl")
    if per_domain:
        by_domain: dict[str | None, list] = defaultdict(list)
        for item in sorted(items, key=lambda i: split_digest(i.question)):
            by_domain[item.domain].append(item)
        items = [i for group in by_domain.values() for i in group[:per_domain]]
    pool = ExpertPoolCore(local, sessions, backbone)
    pool.engine.stop()
    try:
        return evaluate_qa(items, routing, pool.engine.multi, backbone.tokenizer)
    finally:
        pool.close()


# --- learning loop ---------------------------------------------------------------------------------------------

def learning_loop(local: Settings, sessions, backbone, routing, half_a: list[DevQuery],
                  half_b: list[DevQuery]) -> dict:
    """Half A through the HTTP app (one token each), its labels as feedback, a retrain from logs; half B scored
    before and after."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.gateway import Gateway
    from pipelines.retrain_router import retrain_from_logs
    from pipelines.train_router import backbone_encoder
    from registry.request_log import RequestLogWriter
    from router.gate import BASE
    from serving.pool import ExpertPoolCore, LocalPoolClient

    before = routing_scores(half_b, product_routes(routing, [q.text for q in half_b]))
    pool = ExpertPoolCore(local, sessions, backbone)
    writer = RequestLogWriter(sessions, local.spill_dir / "requests.jsonl", flush_ms=100).start()
    gateway = Gateway(local, sessions, backbone.tokenizer, routing, [LocalPoolClient(pool)], writer)
    sent = 0
    try:
        with TestClient(create_app(lambda: gateway)) as client:
            for number, query in enumerate(half_a):
                response = client.post("/v1/chat/completions", json={
                    "model": "auto", "max_tokens": 1, "messages": [{"role": "user", "content": query.text}]})
                if response.status_code != 200:
                    logger.warning("request %d: %s %s", number, response.status_code, response.text[:200])
                    continue
                label = BASE if query.domain == OUT_OF_DOMAIN else query.domain
                request_id = response.json()["moe"]["request_id"]
                sent += client.post("/v1/feedback", json={"request_id": request_id, "expert": label}).status_code == 200
                if (number + 1) % 100 == 0:
                    logger.info("learning loop: %d/%d requests with feedback", number + 1, len(half_a))
    finally:
        writer.stop()
        pool.close()
    report = retrain_from_logs(local, sessions, backbone_encoder(local, backbone), backbone.fingerprint)
    routing.refresh()
    after = routing_scores(half_b, product_routes(routing, [q.text for q in half_b]))
    return {"feedback_labels": sent, "promoted": report.promoted, "reasons": report.reasons,
            "before": before["in_domain"] | {"all_top1": _overall(before)},
            "after": after["in_domain"] | {"all_top1": _overall(after)},
            "gain_in_domain": round(after["in_domain"]["top1"] - before["in_domain"]["top1"], 4)}


def _overall(scores: dict) -> float:
    rows = [v for k, v in scores.items() if k != "in_domain"]
    return round(sum(v["top1"] * v["n"] for v in rows) / max(1, sum(v["n"] for v in rows)), 4)


# --- routing cost ----------------------------------------------------------------------------------------------

def routing_cost(local: Settings, backbone, routing, texts: Sequence[str]) -> dict:
    from experts.engine import GenerationEngine, GenerationRequest, SamplingParams

    engine = GenerationEngine(backbone, local).start()
    engine.eos_ids = set()  # exactly 64 new tokens
    route_s, gen_s = [], []
    try:
        for text in texts:
            started = time.perf_counter()
            routing.route([text])
            route_s.append(time.perf_counter() - started)
            # the ingress routes in its own process: this thread's OpenMP pool must not throttle the engine's
            # (core.device.release_openmp_pool; left alive, it made the generation here 2x slower)
            release_openmp_pool()
            ids = backbone.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                         add_generation_prompt=True, return_dict=True)["input_ids"]
            started = time.perf_counter()
            engine.generate_many([GenerationRequest(list(ids), (), SamplingParams(max_tokens=64, temperature=0,
                                                                                  stop=()))])
            gen_s.append(time.perf_counter() - started)
    finally:
        engine.stop()
    return {"route_ms": round(1000 * statistics.median(route_s), 1),
            "generate64_ms": round(1000 * statistics.median(gen_s), 1),
            "fraction": round(statistics.median(r / g for r, g in zip(route_s, gen_s, strict=True)), 4)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-loop", action="store_true", help="leave out the learning loop (the slowest part)")
    parser.add_argument("--skip-qa", action="store_true", help="leave out the answer NLL")
    parser.add_argument("--qa-per-domain", type=int, default=None, help="score at most this many QA pairs per domain")
    parser.add_argument("--routing-per-domain", type=int, default=None,
                        help="route at most this many dev queries per domain (a quick smoke run)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("alembic", "httpx", "httpx2", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.manual_seed(0)
    queries = load_routing()
    if args.routing_per_domain:
        kept: dict[str, list[DevQuery]] = defaultdict(list)
        for query in sorted(queries, key=lambda q: split_digest(q.text)):
            if len(kept[query.domain]) < args.routing_per_domain:
                kept[query.domain].append(query)
        queries = [q for group in kept.values() for q in group]
    report: dict = {"n_routing": dict(Counter(q.domain for q in queries)),
                    "sources": dict(Counter(q.source for q in queries))}
    with scratch_service(Settings()) as (local, sessions, backbone):
        from experts.backbone import load_backbone
        from router.service import RoutingService

        # routed as `moe up` routes: on the ingress's own truncated backbone copy (fp16 for one prompt on a CPU)
        router_copy = load_backbone(local)
        routing = RoutingService(local, sessions, router_copy.model, router_copy.tokenizer, own_backbone=True)
        routing.refresh()
        texts = [q.text for q in queries]
        report["router"] = routing_scores(queries, product_routes(routing, texts))
        logger.info("router: %s", report["router"]["in_domain"])
        train_texts, train_labels = training_prompts(sessions)
        for name, predicted in baseline_routes(train_texts, train_labels, texts).items():
            report[name] = routing_scores(queries, predicted)
            logger.info("%s: %s", name, report[name]["in_domain"])
        if not args.skip_qa:
            report["answers"] = answer_nll(local, sessions, backbone, routing, args.qa_per_domain)
            logger.info("answers: %s", report["answers"])
        sample = texts[:: max(1, len(texts) // 12)][:12]
        report["cost"] = routing_cost(local, backbone, routing, sample)
        if not args.skip_loop:
            report["loop"] = learning_loop(local, sessions, backbone, routing, *halves(queries))
    report["ratios"] = ratios(report)
    print(json.dumps(report))


def ratios(report: dict) -> dict:
    router = report["router"]
    out = {f"router_vs_{name}_top1": round(router["in_domain"]["top1"] / max(1e-9, report[name]["in_domain"]["top1"]),
                                           4) for name in ("tfidf", "embedding")}
    out["in_domain_to_base"] = router["in_domain"]["to_base"]
    if OUT_OF_DOMAIN in router:
        out["out_of_domain_to_base"] = router[OUT_OF_DOMAIN]["to_base"]
    for domain, stats in report.get("answers", {}).get("domains", {}).items():
        if stats.get("base") and stats.get("routed"):
            out[f"{domain}_routed_vs_bare_nll"] = round(stats["routed"] / stats["base"], 4)
        if stats.get("base") and stats.get("expert"):
            out[f"{domain}_expert_vs_bare_nll"] = round(stats["expert"] / stats["base"], 4)
    if "loop" in report:
        out["loop_gain_in_domain"] = report["loop"]["gain_in_domain"]
    out["routing_cost_fraction"] = report["cost"]["fraction"]
    return out


if __name__ == "__main__":
    main()
