"""bench.bordering's scoring on hand-made routes: the largest drop of an old domain's recall, a held-back column
masked as serving masks it, the domain files it reads."""

from __future__ import annotations

import torch

from bench.bordering import DOMAINS, load_domain, max_recall_drop, routes
from bench.quality import DevQuery, routing_scores
from router.gate import BASE, Gate, GateConfig, Router


def test_max_recall_drop_is_the_worst_old_domain_and_ignores_gains():
    queries = [DevQuery("a", "legal", "s"), DevQuery("b", "legal", "s"), DevQuery("c", "medical", "s"),
               DevQuery("d", "general", "s")]
    before = routing_scores(queries, ["legal", "legal", "finance", "base"])
    after = routing_scores(queries, ["legal", "hr", "medical", "hr"])  # legal loses one, medical gains one
    assert max_recall_drop(before, after) == 0.5
    assert max_recall_drop(after, after) == 0.0


def test_a_held_back_column_is_masked_as_serving_masks_it():
    gate = Gate(GateConfig(labels=["hr", "legal", BASE], input_size=2, layers=[], hidden_size=2))
    with torch.no_grad():
        gate.net[0].weight.copy_(torch.eye(2))
        gate.net[0].bias.zero_()
        gate.net[3].weight.copy_(torch.tensor([[4.0, 0.0], [1.0, 1.0], [0.0, 0.0]]))
        gate.net[3].bias.zero_()
    router, x = Router(gate), torch.tensor([[3.0, 0.0]])
    assert routes(router, x, set()) == ["hr"] and routes(router, x, {"hr"}) == ["legal"]


def test_every_bordering_domain_has_pairs_and_unseen_prompts():
    for name in DOMAINS:
        pairs, unseen = load_domain(name)
        assert len(pairs) >= 30 and len(unseen) >= 15 and not set(pairs) & set(unseen), name
