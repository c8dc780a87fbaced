"""Per-batch LoRA metadata: which kernel a forward pass uses and the routing tensors its layers read. Built
once per pass (MultiLoraModel.set_mixtures), so a layer's forward is a handful of tensor ops: a decode step
calls ~200 adapted layers, and on a CPU their Python and dispatch overhead, not the adapter FLOPs, is what a
step pays for LoRA."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

Mixture = Sequence[tuple[str, float]]
"""A row's experts and gate weights, e.g. [("medical", 0.8), ("legal", 0.2)]; empty = bare backbone."""

SlotMixture = Sequence[tuple[int, float]]
"""A row's mixture with expert names resolved to slot indices."""


class LoraKernel(enum.StrEnum):
    """How a pass applies the adapters (compares equal to its string value)."""

    STACKED = "stacked"
    """Every slot stacked, views of the stored weights: cost grows with the number of slots U."""
    COMPACT = "compact"
    """Only the slots the batch uses, gathered once and reused while the batch's expert set holds."""
    GATHERED = "gathered"
    """Each row's k adapters gathered and contracted with einsums: cost grows with the mixture size k."""


def choose_kernel(num_slots: int, rank: int, slots: Sequence[SlotMixture], stacked_max_columns: int,
                  compact_max_columns: int) -> LoraKernel:
    """Stacked while slots x rank columns stay small, compact while the used slots' columns do, else gathered."""
    if num_slots * max(rank, 1) <= stacked_max_columns:
        return LoraKernel.STACKED
    used = {s for mixture in slots for s, _ in mixture}
    return LoraKernel.COMPACT if len(used) * max(rank, 1) <= compact_max_columns else LoraKernel.GATHERED


@dataclass
class GateState:
    """What the current forward pass routes; shared by every MultiLoraLinear of one model."""

    kernel: LoraKernel | None = None
    """The kernel of this pass; None = the bare backbone."""
    quantized: bool = False
    """Whether this pass reads the layers' low-bit copies (a served pass on a quantized backbone)."""
    low_bit_only: bool = False
    """Passes of any width read the low-bit copies (scoring text as decode steps see the weights); otherwise a
    pass wider than experts.quant.PACKED_MAX_ROWS (fp16) or NARROW_MAX_ROWS (int8/int4 on a CPU without bf16 dot
    products) reads the fp32 weights, and on an AMX CPU a pass of experts.quant.WIDE_MIN_ROWS rows or more reads the
    wide copy."""
    dense_mask: torch.Tensor | None = None
    """[N, U*r] gate weight of each row for each stacked slot, repeated over the rank (stacked/compact)."""
    slot_ids: torch.Tensor | None = None
    """[N, k] slot index per row and mixture position (gathered kernel)."""
    weights: torch.Tensor | None = None
    """[N, k] gate weight per row and mixture position; 0 for padding positions."""
    all_ones: bool = False
    """dense_mask is all ones: the layers skip the mask product (one op per group and layer)."""
    row_masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    """(group size G, tokens N*T) -> dense_mask tiled G times and repeated per token ([N*T, G*U*r])."""

    def mask_for(self, group_size: int, tokens: int) -> torch.Tensor | None:
        """None when every gate is 1 (every row uses the one stacked slot, e.g. a single stream): nothing to mask."""
        if self.all_ones:
            return None
        key = (group_size, tokens)
        mask = self.row_masks.get(key)
        if mask is None:
            mask = self.dense_mask.repeat(1, group_size)  # [N, G*U*r]
            rows = mask.shape[0]
            if tokens != rows:  # prefill: T tokens per row, rows are contiguous in x.view(-1, in)
                mask = mask.repeat_interleave(tokens // rows, dim=0)
            self.row_masks[key] = mask
        return mask

    def reset(self) -> None:
        self.kernel = self.dense_mask = self.slot_ids = self.weights = None
        self.quantized = self.low_bit_only = self.all_ones = False
        self.row_masks = {}

    def set_gathered(self, slots: Sequence[SlotMixture], reference: torch.Tensor) -> None:
        """Mixtures padded to the largest k with slot 0 at weight 0: slot_ids and weights [N, k]."""
        k = max(len(m) for m in slots)
        slot_ids = [[s for s, _ in m] + [0] * (k - len(m)) for m in slots]
        weights = [[w for _, w in m] + [0.0] * (k - len(m)) for m in slots]
        self.slot_ids = torch.tensor(slot_ids, dtype=torch.long, device=reference.device)
        self.weights = torch.tensor(weights, dtype=reference.dtype, device=reference.device)

    def set_dense(self, slots: Sequence[SlotMixture], columns: Sequence[int], rank: int,
                  reference: torch.Tensor) -> None:
        """dense_mask [N, U*r]: each row's gate weight for each stacked slot (`columns`), repeated over the rank."""
        position = {slot: i for i, slot in enumerate(columns)}
        dense = [[0.0] * len(columns) for _ in slots]
        for row, mixture in zip(dense, slots, strict=True):
            for slot, weight in mixture:
                row[position[slot]] += weight
        self.dense_mask = torch.tensor(dense, dtype=reference.dtype, device=reference.device).repeat_interleave(
            rank, dim=1
        )
        self.all_ones = all(value == 1.0 for row in dense for value in row)
