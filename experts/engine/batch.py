"""The running batch and its KV state. The batch is left-padded: the KV cache is [B, kv_heads, L, head_dim]
per layer with a [B, L] attention mask; each row keeps its own position counter, so padding never shifts
positions. Rows join (a prefilled group is merged in) and leave (finished or cancelled) between steps; the
cache layers keep headroom along L (experts/kv_cache.py), so a decode step writes one column in place."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from experts.engine.request import GenerationRequest, Sink, TokenLogprob
from experts.kv_cache import GrowingCache


@dataclass
class Row:
    """One choice of a request while the engine holds it (a request with n choices is n rows)."""

    request: GenerationRequest
    sink: Sink
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    emitted_chars: int = 0
    cancelled: bool = False
    index: int = 0
    """Which of the request's n choices this row decodes."""
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    """Logprobs of tokens whose text is still held back; they leave with the row's next event."""
    submitted: float = field(default_factory=time.perf_counter)
    admitted: float | None = None
    """perf_counter() when the row's prefill started."""
    first_token: float | None = None
    """perf_counter() when its first token was sampled."""

    @property
    def position(self) -> int:
        """Position id of the newest token (prompt tokens count from 0)."""
        return len(self.request.prompt_ids) + len(self.generated) - 1


def left_padded(prompts: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts -> (ids [B, L], mask [B, L], positions [B, L]), right-aligned so every row's last token is at -1."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, length - len(prompt):] = torch.tensor(prompt)
        mask[i, length - len(prompt):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


GROUP_PADDING = 1.5
"""Largest ratio of attended to real columns in one group of decode rows (row_groups' default)."""


def row_groups(starts: Sequence[int], length: int, max_padding: float = GROUP_PADDING) -> list[tuple[int, int, int]]:
    """(first row, end row, first column) per group of consecutive left-padded rows of `length` columns, from each
    row's first real column: a group grows while its columns x rows stay within `max_padding` x its real columns
    (prefill passes: scheduler.prefill_groups; decode attention: attention.grouped_decode_attention)."""
    groups: list[tuple[int, int, int]] = []
    first = low = real = 0
    for row, start in enumerate(starts):
        if row > first:
            new_low = min(low, start)
            if (length - new_low) * (row - first + 1) <= max_padding * (real + length - start):
                low, real = new_low, real + length - start
                continue
            groups.append((first, row, low))
        first, low, real = row, start, length - start
    groups.append((first, len(starts), low))
    return groups


def _left_pad(t: torch.Tensor, dim: int, target: int) -> torch.Tensor:
    """Zeros in front of `t` along `dim` up to `target` (padding columns are masked out)."""
    if t.shape[dim] == target:
        return t
    shape = list(t.shape)
    shape[dim] = target - t.shape[dim]
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class RunningBatch:
    """The rows being decoded, with their KV cache and [B, L] attention mask (row i of each is rows[i])."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.cache: GrowingCache | None = None
        self.mask: torch.Tensor | None = None  # [B, L]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def kv_tokens(self) -> int:
        """KV-cache positions held: rows x padded length (read from other threads, so no tensor work)."""
        mask = self.mask
        return 0 if mask is None else int(mask.shape[0] * mask.shape[1])

    def clear(self) -> None:
        self.rows, self.cache, self.mask = [], None, None

    def merge(self, rows: list[Row], cache: GrowingCache, mask: torch.Tensor) -> None:
        """Append freshly prefilled rows (their cache [B', kv_heads, L', head_dim], mask [B', L']), left-padding
        the shorter of the two along L."""
        if not self.rows or self.cache is None or self.mask is None:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            return
        length = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers, strict=True):
            old.assign(torch.cat([_left_pad(old.keys, 2, length), _left_pad(new.keys, 2, length)], dim=0),
                       torch.cat([_left_pad(old.values, 2, length), _left_pad(new.values, 2, length)], dim=0))
        self.mask = torch.cat([_left_pad(self.mask, 1, length), _left_pad(mask, 1, length)], dim=0)
        self.rows.extend(rows)

    def grow_mask(self) -> torch.Tensor:
        """One more attended column for every row (the token this decode step writes): [B, L+1]."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        return self.mask

    def remove(self, indices: list[int]) -> None:
        """Drop rows by index, and the leading columns that are padding for every row left."""
        keep = [i for i in range(len(self.rows)) if i not in set(indices)]
        if not keep:
            self.clear()
            return
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int((mask.sum(0) > 0).nonzero()[0])
        for layer in self.cache.layers:
            layer.assign(layer.keys.index_select(0, index)[:, :, start:],
                         layer.values.index_select(0, index)[:, :, start:])
        self.mask = mask[:, start:]
        self.rows = [self.rows[i] for i in keep]
