"""Token sampling for a batch: greedy rows share one argmax, the others sample with their own temperature,
top_p and (seeded) generator."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from experts.engine.batch import Row


def sample(logits: torch.Tensor, rows: Sequence[Row]) -> list[int]:
    """logits [B, V] (row i belongs to rows[i]) -> one token id per row."""
    greedy = logits.argmax(dim=-1).tolist()
    tokens = []
    for i, row in enumerate(rows):
        params = row.request.params
        if params.temperature <= 0:
            tokens.append(greedy[i])
            continue
        probs = torch.softmax(logits[i].float() / params.temperature, dim=-1)  # [V]
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < params.top_p  # always keeps the top token
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        tokens.append(int(torch.multinomial(probs, 1, generator=row.generator)))
    return tokens
