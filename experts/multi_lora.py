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

Decode on a CPU is bound by reading weights, so what matters is how many adapter bytes a step touches and
how many small kernels it launches; docs/benchmarks.md has the measurements.
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
    """What the current forward pass routes; shared by every MultiLoraLinear of one model."""

    dense_mask: torch.Tensor | None = None
    """[N, 1, U*r] gate weight of each row for each stacked slot, repeated over the rank (stacked kernel)."""
    used_slots: tuple[int, ...] | None = None
    """The slots stacked this pass, in order; None = every slot (the stored stacks, no copy)."""
    slot_ids: torch.Tensor | None = None
    """[N, k] slot index per row and mixture position (gathered kernel)."""
    weights: torch.Tensor | None = None
    """[N, k] gate weight per row and mixture position; 0 for padding positions."""
    group_masks: dict[int, torch.Tensor] = field(default_factory=dict)
    """Group size G -> dense_mask tiled G times ([N, 1, G*U*r]), built on first use per pass."""

    @property
    def active(self) -> bool:
        return self.dense_mask is not None or self.slot_ids is not None

    def mask_for(self, group_size: int) -> torch.Tensor:
        mask = self.group_masks.get(group_size)
        if mask is None:
            mask = self.group_masks[group_size] = self.dense_mask.repeat(1, 1, group_size)
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
        self._compact: tuple[tuple[int, ...], torch.Tensor] | None = None  # used slots -> [G*U*r, in]
        self._input: torch.Tensor | None = None
        self._input_version = -1
        self._projection: torch.Tensor | None = None  # [N*T, G*U*r], gate mask applied

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
        self._compact = None
        self.forget()
        for index, member in enumerate(self.members):
            member.group_index = index

    def forget(self) -> None:
        self._input = self._projection = None

    def flat_a(self) -> torch.Tensor:
        """[G*U*r, in] for the slots stacked this pass."""
        groups, slots, rank, width = self.lora_a.shape
        used = self.state.used_slots
        if used is None:
            return self.lora_a.view(groups * slots * rank, width)
        if self._compact is None or self._compact[0] != used:
            index = torch.tensor(used, device=self.lora_a.device)
            self._compact = (used, self.lora_a.index_select(1, index).reshape(-1, width))
        return self._compact[1]

    def _remember(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        rows = self.state.dense_mask.shape[0]
        # [N*T, G*U*r] viewed as [N, T, G*U*r] so the per-row mask broadcasts over the tokens
        h = (h.view(rows, -1, h.shape[-1]) * self.state.mask_for(len(self.members))).view(h.shape[0], -1)
        self._input, self._input_version, self._projection = x, x._version, h
        return h

    def cached(self, x: torch.Tensor) -> torch.Tensor | None:
        """The masked projection of this very input tensor, if a sibling computed it already (the siblings
        are called with the same tensor object; `_version` guards against in-place changes)."""
        if self._input is x and self._input_version == x._version:
            return self._projection
        return None

    def projection(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, T, in] -> masked h [N*T, G*U*r] for the whole group (one small matmul)."""
        h = self.cached(x)
        if h is None:
            h = self._remember(x, nn.functional.linear(x.reshape(-1, x.shape[-1]), self.flat_a()))
        return h

    def leader_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The leader's base output [N, T, out] (a view) and the group's masked h, from one matmul."""
        out_features = self.leader.out_features
        z = nn.functional.linear(x, self.augmented, None)  # [N, T, out + G*S*r]
        if self.leader.base.bias is not None:
            z[..., :out_features] += self.leader.base.bias
        h = z[..., out_features:].reshape(-1, z.shape[-1] - out_features)
        return z[..., :out_features], self._remember(x, h)


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
        self._compact_bt: tuple[tuple[int, ...], torch.Tensor] | None = None

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
        self._compact_bt = None

    def _flat_bt(self) -> torch.Tensor:
        slots, rank, width = self.lora_bt.shape
        used = self.state.used_slots
        if used is None:
            return self.lora_bt.view(slots * rank, width)
        if self._compact_bt is None or self._compact_bt[0] != used:
            index = torch.tensor(used, device=self.lora_bt.device)
            self._compact_bt = (used, self.lora_bt.index_select(0, index).reshape(-1, width))
        return self._compact_bt[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.state
        if self.lora_a is None or not state.active:
            # F.linear on the wrapped weights, not self.base(x): one module call less per layer and step
            return nn.functional.linear(x, self.base.weight, self.base.bias)
        if state.dense_mask is not None:
            group = self.group
            h = group.cached(x)
            if h is None and self.group_index == 0 and state.used_slots is None:
                y, h = group.leader_forward(x)  # base output and the group's h in one matmul
            else:
                y = nn.functional.linear(x, self.base.weight, self.base.bias)
                h = group.projection(x) if h is None else h  # [N*T, G*U*r]
            columns = state.dense_mask.shape[-1]
            own = h[:, self.group_index * columns : (self.group_index + 1) * columns]  # [N*T, U*r]
            y2d = y.view(-1, y.shape[-1])
            y2d.addmm_(own, self._flat_bt())
            return y
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
        total = sum(g._compact[1].numel() * g._compact[1].element_size() for g in self.groups if g._compact)
        return total + sum(
            layer._compact_bt[1].numel() * layer._compact_bt[1].element_size()
            for layer in self.layers.values() if layer._compact_bt
        )

    # ---- routing -----------------------------------------------------------------------
    def use_stacked(self) -> bool:
        """True when every slot is stacked (no gathering at all)."""
        return len(self.slots) * max(self.rank, 1) <= self.stacked_max_columns

    def kernel_for(self, mixtures: Sequence[Mixture]) -> str:
        """'stacked' (all slots), 'compact' (the used slots) or 'gathered' for this batch."""
        if self.use_stacked():
            return "stacked"
        used = {self.slot_of(name) for mixture in mixtures for name, _ in mixture}
        return "compact" if len(used) * max(self.rank, 1) <= self.compact_max_columns else "gathered"

    def set_mixtures(self, mixtures: Sequence[Mixture]) -> None:
        """Route row n of the next forward passes to mixtures[n]. Unknown names raise KeyError."""
        state = self.state
        self.clear()
        if not self.slots or not any(mixtures):
            return
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        rows = len(mixtures)
        kernel = self.kernel_for(mixtures)
        if kernel != "gathered":
            used = None
            columns = list(range(len(self.slots)))
            if kernel == "compact":
                used = tuple(sorted({self.slot_of(name) for mixture in mixtures for name, _ in mixture}))
                columns = list(used)
            position = {slot: i for i, slot in enumerate(columns)}
            dense = torch.zeros(rows, len(columns), dtype=dtype)
            for row, mixture in enumerate(mixtures):
                for name, weight in mixture:
                    dense[row, position[self.slot_of(name)]] += weight
            mask = dense.repeat_interleave(self.rank, dim=1)  # [N, U*r]
            state.dense_mask = mask.unsqueeze(1).to(device)
            state.used_slots = used
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
        state = self.state
        state.dense_mask = state.slot_ids = state.weights = state.used_slots = None
        state.group_masks = {}
        for group in self.groups:
            group.forget()

    @contextlib.contextmanager
    def routing(self, mixtures: Sequence[Mixture]) -> Iterator[None]:
        self.set_mixtures(mixtures)
        try:
            yield
        finally:
            self.clear()
