"""The batched multi-LoRA layer: one forward pass carries rows that use different experts and
different top-k mixtures.

For every adapted linear layer and every row n:  y[n] = W x[n] + sum_i g[n, i] * B_i (A_i x[n]).

Two kernels, both without a Python loop over adapters:
* stacked (few slots): h = x @ A_cat^T  ([N,T,in] x [S*r, in]^T -> [N,T,S*r]), multiply by the per-row
  gate mask repeated over the rank ([N,1,S*r]), then one matmul with B_cat ([S*r, out]).
  Cost grows with the number of slots S, not with the mixture size.
* gathered (many slots): gather each row's k adapters (A[idx]: [N,k,r,in], B^T[idx]: [N,k,r,out]) and
  contract them with two einsums. Cost grows with k, not with S.

Each layer keeps one copy of the weights: A as [S, r, in] and B transposed as [S, r, out]; the stacked
kernel uses flat views of the same storage.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from experts.adapters import LoraWeights

logger = logging.getLogger(__name__)

Mixture = Sequence[tuple[str, float]]
"""A row's experts and gate weights, e.g. [("medical", 0.8), ("legal", 0.2)]; empty = bare backbone."""

STACKED_MAX_COLUMNS = 128
"""Use the stacked kernel while slots x rank stays at or below this many columns."""


@dataclass
class GateState:
    """What the current forward pass routes; shared by every MultiLoraLinear of one model."""

    dense_mask: torch.Tensor | None = None
    """[N, 1, S*r] gate weight of each row for each slot, repeated over the rank (stacked kernel)."""
    slot_ids: torch.Tensor | None = None
    """[N, k] slot index per row and mixture position (gathered kernel)."""
    weights: torch.Tensor | None = None
    """[N, k] gate weight per row and mixture position; 0 for padding positions."""

    @property
    def active(self) -> bool:
        return self.dense_mask is not None or self.slot_ids is not None


class MultiLoraLinear(nn.Module):
    """Wraps one nn.Linear; holds the stacked LoRA weights of every loaded adapter for that layer."""

    def __init__(self, base: nn.Linear, state: GateState) -> None:
        super().__init__()
        self.base = base
        self.state = state
        self.lora_a: torch.Tensor | None = None  # [S, r, in]
        self.lora_bt: torch.Tensor | None = None  # [S, r, out], B transposed, scaling folded in

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # keeps code that inspects `.weight` working
        return self.base.weight

    def set_stack(self, lora_a: torch.Tensor | None, lora_bt: torch.Tensor | None) -> None:
        self.lora_a, self.lora_bt = lora_a, lora_bt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        state = self.state
        if self.lora_a is None or not state.active:
            return y
        if state.dense_mask is not None:
            slots, rank, _ = self.lora_a.shape
            h = nn.functional.linear(x, self.lora_a.view(slots * rank, -1)) * state.dense_mask  # [N, T, S*r]
            return y + torch.matmul(h, self.lora_bt.view(slots * rank, -1))
        a = self.lora_a[state.slot_ids]  # [N, k, r, in]
        bt = self.lora_bt[state.slot_ids]  # [N, k, r, out]
        h = torch.einsum("nti,nkri->ntkr", x, a) * state.weights[:, None, :, None]
        return y + torch.einsum("ntkr,nkro->nto", h, bt)


class MultiLoraModel:
    """Holds many LoRA adapters on one backbone in slots and routes each batch row to its mixture."""

    def __init__(self, model: nn.Module, stacked_max_columns: int = STACKED_MAX_COLUMNS) -> None:
        self.model = model
        self.state = GateState()
        self.stacked_max_columns = stacked_max_columns
        self.layers: dict[str, MultiLoraLinear] = {}
        self.slots: list[LoraWeights | None] = []
        self.rank = 0

    # ---- adapters ----------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return [w.name for w in self.slots if w is not None]

    def slot_of(self, name: str) -> int:
        for index, weights in enumerate(self.slots):
            if weights is not None and weights.name == name:
                return index
        raise KeyError(name)

    def _wrap(self, path: str) -> MultiLoraLinear:
        if path in self.layers:
            return self.layers[path]
        parent_path, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_path)
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{path} is not nn.Linear")
        layer = MultiLoraLinear(base, self.state)
        setattr(parent, child, layer)
        self.layers[path] = layer
        return layer

    def add_adapter(self, weights: LoraWeights) -> int:
        """Load (or replace) an adapter; returns its slot. Rebuilds the stacks of every layer (~ms)."""
        with contextlib.suppress(KeyError):
            self.slots[self.slot_of(weights.name)] = None
        free = next((i for i, w in enumerate(self.slots) if w is None), None)
        if free is None:
            self.slots.append(weights)
            free = len(self.slots) - 1
        else:
            self.slots[free] = weights
        for path in weights.modules:
            self._wrap(path)
        self._rebuild()
        return free

    def remove_adapter(self, name: str) -> None:
        self.slots[self.slot_of(name)] = None
        while self.slots and self.slots[-1] is None:
            self.slots.pop()
        self._rebuild()

    def _rebuild(self) -> None:
        live = [w for w in self.slots if w is not None]
        self.rank = max((w.rank for w in live), default=0)
        num_slots = len(self.slots)
        for path, layer in self.layers.items():
            if num_slots == 0:
                layer.set_stack(None, None)
                continue
            ref = layer.base.weight
            # Zero-padded to the largest rank: zero rows/columns add nothing to the output.
            lora_a = torch.zeros(num_slots, self.rank, layer.in_features, dtype=ref.dtype, device=ref.device)
            lora_bt = torch.zeros(num_slots, self.rank, layer.out_features, dtype=ref.dtype, device=ref.device)
            for slot, weights in enumerate(self.slots):
                if weights is None or path not in weights.modules:
                    continue
                a, b = weights.modules[path]
                lora_a[slot, : a.shape[0]] = a.to(ref.device, ref.dtype)
                lora_bt[slot, : b.shape[1]] = b.t().to(ref.device, ref.dtype)
            layer.set_stack(lora_a, lora_bt)

    def adapter_bytes(self) -> int:
        return sum(
            (layer.lora_a.numel() + layer.lora_bt.numel()) * layer.lora_a.element_size()
            for layer in self.layers.values()
            if layer.lora_a is not None
        )

    # ---- routing -----------------------------------------------------------------------
    def use_stacked(self) -> bool:
        return len(self.slots) * max(self.rank, 1) <= self.stacked_max_columns

    def set_mixtures(self, mixtures: Sequence[Mixture]) -> None:
        """Route row n of the next forward passes to mixtures[n]. Unknown names raise KeyError."""
        state = self.state
        state.dense_mask = state.slot_ids = state.weights = None
        if not self.slots or not any(mixtures):
            return
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        rows = len(mixtures)
        if self.use_stacked():
            dense = torch.zeros(rows, len(self.slots), dtype=dtype)
            for row, mixture in enumerate(mixtures):
                for name, weight in mixture:
                    dense[row, self.slot_of(name)] += weight
            mask = dense.repeat_interleave(self.rank, dim=1)  # [N, S*r]
            state.dense_mask = mask.unsqueeze(1).to(device)
            return
        k = max(len(m) for m in mixtures)
        slot_ids = torch.zeros(rows, k, dtype=torch.long)
        weights = torch.zeros(rows, k, dtype=dtype)
        for row, mixture in enumerate(mixtures):
            for position, (name, weight) in enumerate(mixture):
                slot_ids[row, position] = self.slot_of(name)
                weights[row, position] = weight
        state.slot_ids, state.weights = slot_ids.to(device), weights.to(device)

    def clear(self) -> None:
        self.state.dense_mask = self.state.slot_ids = self.state.weights = None

    @contextlib.contextmanager
    def routing(self, mixtures: Sequence[Mixture]) -> Iterator[None]:
        self.set_mixtures(mixtures)
        try:
            yield
        finally:
            self.clear()
