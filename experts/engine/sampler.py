"""Token sampling for a batch, as tensors over [B, V]: per-row penalties (presence, frequency, repetition) and
logit_bias, then greedy rows share one argmax and the others sample with their own temperature and top_p
(seeded rows with their own generator). Log-probabilities come from the raw logits, as vLLM reports them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from experts.engine.batch import Row
from experts.engine.request import SamplingParams

MAX_LOGIT = 1e30
"""Adjusted logits are clamped to +-MAX_LOGIT: a penalty or bias pushing a logit to inf (or a whole row to -inf)
would make the row's softmax NaN, and a NaN fails the decode step of every row in the batch."""


@dataclass
class Sampled:
    """One decode step's picks: a token per row and, for rows that asked, (token logprob, top ids, top logprobs)."""

    tokens: list[int]
    logprobs: list[tuple[float, list[int], list[float]] | None]


def _counts(sequences: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """How often each token id occurs in each row's sequence: [B, V] float (ids outside the vocabulary dropped)."""
    length = max(1, max(len(s) for s in sequences))
    index = torch.full((len(sequences), length), vocab, dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            index[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    index = index.clamp_(0, vocab).to(device)
    counts = torch.zeros((len(sequences), vocab + 1), device=device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=counts.dtype))
    return counts[:, :vocab]


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)


def _penalise(logits: torch.Tensor, rows: Sequence[Row], params: Sequence[SamplingParams]) -> torch.Tensor:
    """Repetition penalty over prompt and output (vLLM/HF order: first), then frequency and presence penalties
    over the output only (OpenAI)."""
    vocab = logits.shape[-1]
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = _counts([[*r.request.prompt_ids, *r.generated] if p.repetition_penalty != 1.0 else []
                        for r, p in zip(rows, params, strict=True)], vocab, logits.device) > 0
        penalty = _column([p.repetition_penalty for p in params], logits)
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    if any(p.presence_penalty or p.frequency_penalty for p in params):
        counts = _counts([r.generated if p.presence_penalty or p.frequency_penalty else []
                          for r, p in zip(rows, params, strict=True)], vocab, logits.device)
        logits = (logits - _column([p.frequency_penalty for p in params], logits) * counts
                  - _column([p.presence_penalty for p in params], logits) * (counts > 0).to(logits.dtype))
    return logits


def adjust(logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """The logits sampled from (float32 [B, V]): raw logits with each row's penalties and logit_bias applied."""
    params = [r.request.params for r in rows]
    if not any(p.penalised or p.logit_bias for p in params):
        return logits
    logits = _penalise(logits, rows, params)
    vocab = logits.shape[-1]
    biased = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias if 0 <= t < vocab]
    if biased:
        where = torch.tensor([(i, t) for i, t, _ in biased], device=logits.device).T
        logits = logits.index_put((where[0], where[1]), _column([b for *_, b in biased], logits).squeeze(1),
                                  accumulate=True)
    return logits.nan_to_num(nan=-MAX_LOGIT, posinf=MAX_LOGIT, neginf=-MAX_LOGIT).clamp(-MAX_LOGIT, MAX_LOGIT)


def pick(logits: torch.Tensor, rows: Sequence[Row]) -> list[int]:
    """One token per row from adjusted logits [B, V]: argmax for greedy rows, else temperature + top_p."""
    tokens = logits.argmax(dim=-1).tolist()
    sampling = [i for i, r in enumerate(rows) if r.request.params.temperature > 0]
    if not sampling:
        return tokens
    params = [rows[i].request.params for i in sampling]
    probs = torch.softmax(logits[sampling] / _column([p.temperature for p in params], logits), dim=-1)  # [S, V]
    if any(p.top_p < 1.0 for p in params):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < _column([p.top_p for p in params], logits)  # keeps top 1
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)
    free = [j for j, i in enumerate(sampling) if rows[i].generator is None]
    if free:
        for j, token in zip(free, torch.multinomial(probs[free], 1).squeeze(-1).tolist(), strict=True):
            tokens[sampling[j]] = token
    for j, i in enumerate(sampling):  # a seeded row draws from its own generator, whatever shares the batch
        if rows[i].generator is not None:
            tokens[i] = int(torch.multinomial(probs[j], 1, generator=rows[i].generator))
    return tokens


def token_logprobs(raw: torch.Tensor, tokens: Sequence[int],
                   rows: Sequence[Row]) -> list[tuple[float, list[int], list[float]] | None]:
    """For rows that asked: the picked token's log-probability under the raw logits, and the top-k (id, logprob)."""
    wanted = [i for i, r in enumerate(rows) if r.request.params.logprobs is not None]
    result: list[tuple[float, list[int], list[float]] | None] = [None] * len(rows)
    if not wanted:
        return result
    logprobs = torch.log_softmax(raw[wanted], dim=-1)
    picked = torch.tensor([tokens[i] for i in wanted], device=raw.device).unsqueeze(1)
    chosen = logprobs.gather(1, picked).squeeze(1).tolist()
    k = min(max(rows[i].request.params.logprobs or 0 for i in wanted), logprobs.shape[-1])
    top_values, top_ids = logprobs.topk(k, dim=-1)
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    for j, i in enumerate(wanted):
        count = rows[i].request.params.logprobs or 0
        result[i] = (chosen[j], top_ids[j][:count], top_values[j][:count])
    return result


def sample(logits: torch.Tensor, rows: Sequence[Row]) -> Sampled:
    """logits [B, V] (row i belongs to rows[i]) -> one token id per row, and the logprobs rows asked for."""
    raw = logits.float()
    tokens = pick(adjust(raw, rows), rows)
    return Sampled(tokens, token_logprobs(raw, tokens, rows))
