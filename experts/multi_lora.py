"""The batched multi-LoRA layer: one forward pass carries rows that use different experts and
different top-k mixtures.

For every adapted linear layer and every row n:  y[n] = W x[n] + sum_i g[n, i] * B_i (A_i x[n]).

Kernels, none of them a Python loop over adapters:
* stacked: h = x @ A_cat^T  ([N*T, in] x [U*r, in]^T -> [N*T, U*r]), times the per-row gate mask repeated
  over the rank, then y += h @ B_cat ([U*r, out]) fused into one `addmm_`. U is every slot while
  slots x rank stays small (views of the stored weights, no copy); with many slots it is only the slots the
  current batch uses, gathered once and reused for every decode step while the batch's expert set holds
  (continuous batching keeps it for many steps). Cost grows with U, not with the mixture size.
* gathered (fallback when even the used slots are too many): gather each row's k adapters
  (A[idx]: [N,k,r,in], B^T[idx]: [N,k,r,out]) and contract them with two einsums. Cost grows with k.

Sibling projections that read the same input (q/k/v of attention, gate/up of the MLP) form a group: their
A's are stored concatenated, so the group's down-projection is one matmul instead of three (or two),
computed by whichever member runs first and reused by the others for the same input tensor.

Decode on a CPU is bound by reading weights and by the per-call cost of small ops, so what matters is how
many adapter bytes a step touches and how many small kernels it launches. Everything that depends only on
the batch's routing (kernel choice, the [N, U*r] gate mask, the compact stacks) is prepared once per pass
in `set_mixtures`; a layer's forward is then a few tensor ops on 2-D views, no per-row Python.
docs/benchmarks.md has the measurements.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from experts.adapters import LoraWeights

logger = logging.getLogger(__name__)

Mixture = Sequence[tuple[str, float]]
"""A row's experts and gate weights, e.g. [("medical", 0.8), ("legal", 0.2)]; empty = bare backbone."""

STACKED_MAX_COLUMNS = 128
"""Stack every slot (no copy) while slots x rank stays at or below this many columns."""
COMPACT_MAX_COLUMNS = 256
"""Above that, stack only the slots the batch uses while they take at most this many columns; else gather."""

SHARED_INPUT_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Sibling projections that read the same input tensor (Llama, Mistral, Qwen, ... naming)."""


@dataclass
class GateState:
    """What the current forward pass routes; shared by every MultiLoraLinear of one model. Everything a layer
    needs per pass is prepared here once (set_mixtures), so a layer's forward is a handful of tensor ops:
    a decode step calls ~200 adapted layers, and on a CPU their Python and dispatch overhead, not the adapter
    FLOPs, is what a step pays for LoRA."""

    kernel: str | None = None
    """'stacked', 'compact' or 'gathered' for this pass; None = the bare backbone."""
    dense_mask: torch.Tensor | None = None
    """[N, U*r] gate weight of each row for each stacked slot, repeated over the rank (stacked/compact)."""
    slot_ids: torch.Tensor | None = None
    """[N, k] slot index per row and mixture position (gathered kernel)."""
    weights: torch.Tensor | None = None
    """[N, k] gate weight per row and mixture position; 0 for padding positions."""
    row_masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    """(group size G, tokens N*T) -> dense_mask tiled G times and repeated per token ([N*T, G*U*r])."""

    def mask_for(self, group_size: int, tokens: int) -> torch.Tensor:
        key = (group_size, tokens)
        mask = self.row_masks.get(key)
        if mask is None:
            mask = self.dense_mask.repeat(1, group_size)  # [N, G*U*r]
            rows = mask.shape[0]
            if tokens != rows:  # prefill: T tokens per row, rows are contiguous in x.view(-1, in)
                mask = mask.repeat_interleave(tokens // rows, dim=0)
            self.row_masks[key] = mask
        return mask


class InputGroup:
    """The A matrices of sibling layers that read one input, stored as one [G, S, r, in] tensor appended under
    the first member's (the leader's) base weight: W_aug = [W_leader; A_1; ...; A_G] ([out + G*S*r, in]).
    With every slot stacked, the leader's one contiguous matmul yields its base output and the whole group's
    down-projections together; decode on a CPU is bound by streaming weights, and one long stream beats a
    big one plus a small cold one."""

    def __init__(self, members: list[MultiLoraLinear], state: GateState) -> None:
        self.members = members
        self.state = state
        self.lora_a: torch.Tensor | None = None  # [G, S, r, in], rows of the leader's W_aug
        self.augmented: torch.Tensor | None = None  # W_aug [out_leader + G*S*r, in]
        self.split_sizes: list[int] = []  # [out_leader, G*S*r]: W_aug's output split
        self.compact_a: torch.Tensor | None = None  # [G*U*r, in] for the used slots of a compact pass
        self._input: torch.Tensor | None = None
        self._input_version = -1
        self._parts: tuple[torch.Tensor, ...] = ()  # G x [N*T, U*r], gate mask applied

    @property
    def leader(self) -> MultiLoraLinear:
        return self.members[0]

    def set_stack(self, lora_a: torch.Tensor | None) -> None:
        """lora_a [G, S, r, in] or None; re-homes the leader's base weight into W_aug (no second copy)."""
        leader = self.leader.base
        out_features = leader.out_features
        weight = leader.weight.data
        if lora_a is None:
            self.augmented = self.lora_a = None
            if weight.untyped_storage().nbytes() > weight.numel() * weight.element_size():
                leader.weight.data = weight.clone()  # release the old A rows
        else:
            rows = lora_a.shape[0] * lora_a.shape[1] * lora_a.shape[2]  # G*S*r
            augmented = torch.empty(out_features + rows, leader.in_features, dtype=lora_a.dtype,
                                    device=lora_a.device)
            augmented[:out_features] = weight
            augmented[out_features:] = lora_a.reshape(rows, leader.in_features)
            leader.weight.data = augmented[:out_features]  # a contiguous prefix: the bare path is unchanged
            self.augmented = augmented
            self.lora_a = augmented[out_features:].view(lora_a.shape)
            self.split_sizes = [out_features, rows]
        self.compact_a = None
        self.forget()
        for index, member in enumerate(self.members):
            member.group_index = index

    def compact(self, index: torch.Tensor) -> None:
        """Gather the used slots' A rows ([G*U*r, in])."""
        self.compact_a = self.lora_a.index_select(1, index).reshape(-1, self.lora_a.shape[-1])

    def forget(self) -> None:
        self._input, self._parts = None, ()

    def remember(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Apply the gate mask to the group's down-projection h [N*T, G*U*r] and split it per member."""
        masked = h * self.state.mask_for(len(self.members), h.shape[0])
        parts = (masked,) if len(self.members) == 1 else masked.split(h.shape[1] // len(self.members), dim=1)
        self._input, self._input_version, self._parts = x, x._version, parts
        return parts

    def cached(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The masked projections of this very input tensor, if a sibling computed them already (the siblings
        are called with the same tensor object; `_version` guards against in-place changes)."""
        if self._input is x and self._input_version == x._version:
            return self._parts
        return None


class MultiLoraLinear(nn.Module):
    """Wraps one nn.Linear; holds the stacked LoRA weights of every loaded adapter for that layer."""

    def __init__(self, base: nn.Linear, state: GateState) -> None:
        super().__init__()
        self.base = base
        self.state = state
        self.group: InputGroup | None = None
        self.group_index = 0
        self.lora_a: torch.Tensor | None = None  # [S, r, in] (a view into the group's storage)
        self.lora_bt: torch.Tensor | None = None  # [S, r, out], B transposed, scaling folded in
        self.flat_bt: torch.Tensor | None = None  # [S*r, out], a view of lora_bt
        self.compact_bt: torch.Tensor | None = None  # [U*r, out] for the used slots of a compact pass

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
        self.flat_bt = None if lora_bt is None else lora_bt.view(-1, lora_bt.shape[-1])
        self.compact_bt = None

    def compact(self, index: torch.Tensor) -> None:
        """Gather the used slots' B^T rows ([U*r, out])."""
        self.compact_bt = self.lora_bt.index_select(0, index).reshape(-1, self.lora_bt.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.state.kernel
        if kernel is None or self.flat_bt is None:
            # F.linear on the wrapped weights, not self.base(x): one module call less per layer and step
            return nn.functional.linear(x, self.base.weight, self.base.bias)
        if kernel == "gathered":
            return self._gathered(x)
        group = self.group
        x2 = x.reshape(-1, x.shape[-1])  # [N*T, in], a view for the contiguous hidden states
        parts = group.cached(x)
        if parts is None:
            if kernel == "stacked" and self.group_index == 0:
                # the base output and the whole group's down-projection from one matmul over W_aug
                y, h = nn.functional.linear(x2, group.augmented).split(group.split_sizes, dim=1)
                if self.base.bias is not None:
                    y = y + self.base.bias
                y.addmm_(group.remember(x, h)[0], self.flat_bt)
                return y.view(*x.shape[:-1], -1)
            a = group.lora_a.view(-1, x2.shape[-1]) if kernel == "stacked" else group.compact_a
            parts = group.remember(x, nn.functional.linear(x2, a))  # G x [N*T, U*r]
        y = nn.functional.linear(x2, self.base.weight, self.base.bias)  # [N*T, out]
        y.addmm_(parts[self.group_index], self.flat_bt if kernel == "stacked" else self.compact_bt)
        return y.view(*x.shape[:-1], -1)

    def _gathered(self, x: torch.Tensor) -> torch.Tensor:
        state = self.state
        y = nn.functional.linear(x, self.base.weight, self.base.bias)
        a = self.lora_a[state.slot_ids]  # [N, k, r, in]
        bt = self.lora_bt[state.slot_ids]  # [N, k, r, out]
        h = torch.einsum("nti,nkri->ntkr", x, a) * state.weights[:, None, :, None]
        return y + torch.einsum("ntkr,nkro->nto", h, bt)


class MultiLoraModel:
    """Holds many LoRA adapters on one backbone in slots and routes each batch row to its mixture."""

    def __init__(
        self, model: nn.Module, stacked_max_columns: int = STACKED_MAX_COLUMNS,
        compact_max_columns: int = COMPACT_MAX_COLUMNS,
    ) -> None:
        self.model = model
        self.state = GateState()
        self.stacked_max_columns = stacked_max_columns
        self.compact_max_columns = compact_max_columns
        self.layers: dict[str, MultiLoraLinear] = {}
        self.groups: list[InputGroup] = []
        self.slots: list[LoraWeights | None] = []
        self._slot_index: dict[str, int] = {}
        self._compacted: tuple[int, ...] | None = None  # the slots the compact stacks hold now
        self.rank = 0
        self._reference = next(model.parameters())  # device and dtype of the backbone

    # ---- adapters ----------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return [w.name for w in self.slots if w is not None]

    def slot_of(self, name: str) -> int:
        return self._slot_index[name]

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

    def _make_groups(self) -> list[list[str]]:
        """Wrapped layers grouped by shared input: known sibling sets under one parent; the rest alone."""
        by_parent: dict[str, dict[str, str]] = {}
        for path in self.layers:
            parent, _, child = path.rpartition(".")
            by_parent.setdefault(parent, {})[child] = path
        groups: list[list[str]] = []
        for children in by_parent.values():
            taken: set[str] = set()
            for names in SHARED_INPUT_GROUPS:
                members = [children[n] for n in names if n in children]
                widths = {self.layers[p].in_features for p in members}
                if len(members) > 1 and len(widths) == 1:
                    groups.append(members)
                    taken.update(members)
            groups += [[p] for p in children.values() if p not in taken]
        return groups

    def _rebuild(self) -> None:
        self._slot_index = {w.name: i for i, w in enumerate(self.slots) if w is not None}
        self._compacted = None  # set_stack drops the compact stacks
        live = [w for w in self.slots if w is not None]
        self.rank = max((w.rank for w in live), default=0)
        num_slots = len(self.slots)
        self.groups = []
        self.clear()
        for paths in self._make_groups():
            members = [self.layers[p] for p in paths]
            group = InputGroup(members, self.state)
            self.groups.append(group)
            ref = members[0].base.weight
            if num_slots == 0:
                group.set_stack(None)
                for layer in members:
                    layer.group = group
                    layer.set_stack(None, None)
                continue
            # Zero-padded to the largest rank: zero rows/columns add nothing to the output.
            lora_a = torch.zeros(len(members), num_slots, self.rank, members[0].in_features, dtype=ref.dtype,
                                 device=ref.device)
            stacks_bt = []
            for index, (path, layer) in enumerate(zip(paths, members, strict=True)):
                lora_bt = torch.zeros(num_slots, self.rank, layer.out_features, dtype=ref.dtype, device=ref.device)
                for slot, weights in enumerate(self.slots):
                    if weights is None or path not in weights.modules:
                        continue
                    a, b = weights.modules[path]
                    lora_a[index, slot, : a.shape[0]] = a.to(ref.device, ref.dtype)
                    lora_bt[slot, : b.shape[1]] = b.t().to(ref.device, ref.dtype)
                stacks_bt.append(lora_bt)
            group.set_stack(lora_a)  # copies A under the leader's weight; members get views of it
            for index, layer in enumerate(members):
                layer.group = group
                layer.set_stack(group.lora_a[index], stacks_bt[index])

    def adapter_bytes(self) -> int:
        return sum(
            (layer.lora_a.numel() + layer.lora_bt.numel()) * layer.lora_a.element_size()
            for layer in self.layers.values()
            if layer.lora_a is not None
        )

    def compact_cache_bytes(self) -> int:
        """Bytes of the gathered stacks of the slots a batch uses (many-slot case only; bounded by
        COMPACT_MAX_COLUMNS columns per layer, whatever the number of experts)."""
        tensors = [g.compact_a for g in self.groups] + [layer.compact_bt for layer in self.layers.values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    # ---- routing -----------------------------------------------------------------------
    def use_stacked(self) -> bool:
        """True when every slot is stacked (no gathering at all)."""
        return len(self.slots) * max(self.rank, 1) <= self.stacked_max_columns

    def kernel_for(self, mixtures: Sequence[Mixture]) -> str:
        """'stacked' (all slots), 'compact' (the used slots) or 'gathered' for this batch."""
        return self._kernel([[(self._slot_index[name], w) for name, w in m] for m in mixtures])

    def _kernel(self, slots: Sequence[Sequence[tuple[int, float]]]) -> str:
        if self.use_stacked():
            return "stacked"
        used = {s for mixture in slots for s, _ in mixture}
        return "compact" if len(used) * max(self.rank, 1) <= self.compact_max_columns else "gathered"

    def set_mixtures(self, mixtures: Sequence[Mixture]) -> None:
        """Route row n of the next forward passes to mixtures[n]. Unknown names raise KeyError."""
        state = self.state
        self.clear()
        if not self.slots or not any(mixtures):
            return
        index = self._slot_index
        slots = [[(index[name], weight) for name, weight in mixture] for mixture in mixtures]  # KeyError if unknown
        ref = self._reference
        kernel = self._kernel(slots)
        if kernel == "gathered":
            k = max(len(m) for m in slots)
            slot_ids = [[s for s, _ in m] + [0] * (k - len(m)) for m in slots]
            weights = [[w for _, w in m] + [0.0] * (k - len(m)) for m in slots]
            state.slot_ids = torch.tensor(slot_ids, dtype=torch.long, device=ref.device)
            state.weights = torch.tensor(weights, dtype=ref.dtype, device=ref.device)
        else:
            columns = list(range(len(self.slots)))
            if kernel == "compact":
                used = tuple(sorted({s for m in slots for s, _ in m}))
                columns = list(used)
                if used != self._compacted:  # gathered once; reused while the batch's expert set holds
                    index = torch.tensor(used, device=ref.device)
                    for group in self.groups:
                        group.compact(index)
                    for layer in self.layers.values():
                        if layer.lora_bt is not None:
                            layer.compact(index)
                    self._compacted = used
            position = {slot: i for i, slot in enumerate(columns)}
            dense = [[0.0] * len(columns) for _ in slots]
            for row, mixture in zip(dense, slots, strict=True):
                for slot, weight in mixture:
                    row[position[slot]] += weight
            # [N, U*r]: each slot's gate weight repeated over its rank columns
            state.dense_mask = torch.tensor(dense, dtype=ref.dtype, device=ref.device).repeat_interleave(
                self.rank, dim=1
            )
        state.kernel = kernel

    def clear(self) -> None:
        state = self.state
        state.kernel = state.dense_mask = state.slot_ids = state.weights = None
        state.row_masks = {}
        for group in self.groups:
            group.forget()

    @contextlib.contextmanager
    def routing(self, mixtures: Sequence[Mixture]) -> Iterator[None]:
        self.set_mixtures(mixtures)
        try:
            yield
        finally:
            self.clear()
