"""Decode attention over a left-padded batch, one SDPA call per group of rows with similar lengths.

Why: the running batch is left-padded to its longest row ([B, kv_heads, L, head_dim] keys and values per layer), and
SDPA's CPU kernel reads every position, masked or not. With 16 rows of 37-295 prompt tokens most of the positions a
decode step attends over are padding; attention was 23.5 of ~83 ms of a batch-16 int4 decode step. Rows are grouped
in their batch order (an admission is merged in shortest-first: scheduler.prefill_groups), and each group attends
over its own columns only. Registered with transformers' AttentionInterface under DECODE_ATTENTION; any other pass
(a prefill, no mask, one row) is plain SDPA.
"""

from __future__ import annotations

import threading

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from experts.engine.batch import row_groups

DECODE_ATTENTION = "moe_grouped_sdpa"
"""The attention implementation's registered name."""

_last = threading.local()  # per engine thread: the last mask seen and its groups (one mask serves every layer)


def _groups_for(mask: torch.Tensor) -> list[tuple[int, int, int]]:
    """Groups for a [B, 1, 1, L] bool decode mask, computed once per mask (every layer of a step gets the same)."""
    if getattr(_last, "mask", None) is not mask:
        starts = mask[:, 0, -1].to(torch.uint8).argmax(dim=-1).tolist()  # first True per row
        _last.mask, _last.groups = mask, row_groups(starts, mask.shape[-1])
    return _last.groups


def grouped_decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, H, 1, D], key/value [B, kv_heads, L, D], mask [B, 1, 1, L] bool -> [B, 1, H, D] (SDPA's layout)."""
    if (query.shape[2] != 1 or query.shape[0] < 2 or attention_mask is None or attention_mask.dtype != torch.bool
            or attention_mask.shape[1:3] != (1, 1)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    groups = _groups_for(attention_mask)
    if len(groups) == 1 and groups[0][2] == 0:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = [
        sdpa_attention_forward(module, query[a:b], key[a:b, :, s:], value[a:b, :, s:], attention_mask[a:b, ..., s:],
                               **kwargs)[0]
        for a, b, s in groups
    ]
    return torch.cat(outputs, dim=0), None


def use_grouped_decode_attention(model: PreTrainedModel) -> None:
    """Switch an SDPA `model` to DECODE_ATTENTION (same masks as SDPA); a no-op for a model already on it."""
    if DECODE_ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(DECODE_ATTENTION, grouped_decode_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(DECODE_ATTENTION, sdpa_mask)
    if model.config._attn_implementation != DECODE_ATTENTION:
        model.set_attn_implementation(DECODE_ATTENTION)
