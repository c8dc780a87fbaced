"""bench.quality's scoring on hand-made routes: per-domain top-1, in-domain queries sent to base, out-of-domain
queries sent to base, the learning loop's fixed halves, the ratios in the last line."""

from __future__ import annotations

from bench.quality import DATA_DIR, DevQuery, halves, load_routing, ratios, routing_scores


def test_routing_scores_per_domain_and_out_of_domain():
    queries = [DevQuery("a", "medical", "s"), DevQuery("b", "medical", "s"), DevQuery("c", "legal", "s"),
               DevQuery("d", "general", "s"), DevQuery("e", "general", "s")]
    scores = routing_scores(queries, ["medical", "base", "legal", "base", "support"])
    assert scores["medical"] == {"n": 2, "top1": 0.5, "to_base": 0.5}
    assert scores["general"] == {"n": 2, "top1": 0.5, "to_base": 0.5}  # out of domain: base is right
    assert scores["in_domain"] == {"n": 3, "top1": 0.6667, "to_base": 0.3333, "macro_top1": 0.75}


def test_halves_are_fixed_and_disjoint():
    queries = [DevQuery(f"query number {i}", "medical", "s") for i in range(200)]
    a, b = halves(queries)
    assert len(a) + len(b) == 200 and not {q.text for q in a} & {q.text for q in b}
    assert 60 < len(a) < 140 and halves(list(reversed(queries)))[0] == list(reversed(a))


def test_ratios_against_the_baselines():
    def block(top1):
        return {"in_domain": {"n": 10, "top1": top1, "to_base": 0.02, "macro_top1": top1},
                "general": {"n": 5, "top1": 0.8, "to_base": 0.8}}

    report = {"router": block(0.9), "tfidf": block(0.75), "embedding": block(0.8), "cost": {"fraction": 0.02},
              "answers": {"domains": {"medical": {"routed": 2.0, "base": 2.5, "expert": 1.9, "n": 3}}}}
    out = ratios(report)
    assert out["router_vs_tfidf_top1"] == 1.2 and out["router_vs_embedding_top1"] == 1.125
    assert out["medical_routed_vs_bare_nll"] == 0.8 and out["medical_expert_vs_bare_nll"] == 0.76
    assert out["in_domain_to_base"] == 0.02 and out["out_of_domain_to_base"] == 0.8


def test_shipped_dev_set_is_labelled_and_kept_apart_from_training_sources():
    from corpora.build import load_sources

    queries = load_routing(DATA_DIR / "routing.jsonl")
    dev_sources = {s.name for s in load_sources() if s.role == "dev"}
    assert queries and {q.source for q in queries} <= dev_sources
    assert {q.domain for q in queries} == {"medical", "finance", "legal", "support", "general"}
