"""The adapted layers: `MultiLoraLinear` wraps one nn.Linear and holds every loaded adapter's weights for it
stacked by slot; `InputGroup` shares one down-projection among sibling layers that read the same input (q/k/v
of attention, gate/up of the MLP). Both read the pass's routing from the shared `GateState`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from experts.multi_lora.fused import FusedLowBit, SiblingSlice
from experts.multi_lora.metadata import GateState, LoraKernel
from experts.quant import packed_wins

if TYPE_CHECKING:
    from experts.quant import QuantizedLinear


class InputGroup:
    """The A matrices of sibling layers that read one input, stored as one [G, S, r, in] tensor appended under
    the first member's (the leader's) base weight: W_aug = [W_leader; A_1; ...; A_G] ([out + G*S*r, in]).
    With every slot stacked, the leader's one contiguous matmul yields its base output and the whole group's
    down-projections together; decode on a CPU is bound by streaming weights, and one long stream beats a
    big one plus a small cold one. A narrow pass over a low-bit copy (MOE_BACKBONE_QUANT: decode steps) cannot
    use W_aug's base rows: it reads the packed base, and the A rows of W_aug as one small fp32 matmul per group;
    wide passes (prefills) take W_aug whole, as on fp32."""

    def __init__(self, members: list[MultiLoraLinear], state: GateState) -> None:
        self.members = members
        self.state = state
        self.lora_a: torch.Tensor | None = None  # [G, S, r, in], rows of the leader's W_aug
        self.augmented: torch.Tensor | None = None  # W_aug [out_leader + G*S*r, in]
        self.split_sizes: list[int] = []  # [out_leader, G*S*r]: W_aug's output split
        self.compact_a: torch.Tensor | None = None  # [G*U*r, in] for the used slots of a compact pass
        self.riding: FusedLowBit | None = None  # the members' low-bit copy, with lora_a's rows appended
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
            self.augmented, self.lora_a = None, lora_a
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
        mask = self.state.mask_for(len(self.members), h.shape[0])
        masked = h if mask is None else h * mask
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
        self.quant: QuantizedLinear | None = None  # low-bit copy of base, read by quantized passes only

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

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        """W x + b: from the low-bit copy where this pass reads it (_low_bit), else F.linear on the wrapped weights
        (not self.base(x): one module call less per layer and step)."""
        if self._low_bit(x):
            if self.state.low_bit_only and isinstance(self.quant, SiblingSlice):
                return self.quant(x, narrow=True)  # scored as decode steps read it: the narrow copy at any width
            return self.quant(x)
        return nn.functional.linear(x, self.base.weight, self.base.bias)

    def _low_bit(self, x: torch.Tensor) -> bool:
        """Whether this pass reads the low-bit copy: a quantized pass narrow enough for it to win, or any width
        when the pass asks for the low-bit weights only (GateState.low_bit_only)."""
        state = self.state
        return self.quant is not None and state.quantized and (state.low_bit_only or packed_wins(x, self.quant.mode))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.state.kernel
        if kernel is None or self.flat_bt is None:
            return self._base(x)
        if kernel is LoraKernel.GATHERED:
            return self._gathered(x)
        group = self.group
        x2 = x.reshape(-1, x.shape[-1])  # [N*T, in], a view for the contiguous hidden states
        parts = group.cached(x)
        if parts is None:
            if (kernel is LoraKernel.STACKED and self.group_index == 0 and group.augmented is not None
                    and not self._low_bit(x)):
                # the base output and the whole group's down-projection from one matmul over W_aug
                y, h = nn.functional.linear(x2, group.augmented).split(group.split_sizes, dim=1)
                if self.base.bias is not None:
                    y = y + self.base.bias
                y.addmm_(group.remember(x, h)[0], self.flat_bt)
                return y.view(*x.shape[:-1], -1)
            riding = group.riding
            if (kernel is LoraKernel.STACKED and riding is not None and self._low_bit(x)
                    and riding.rides(x, narrow=self.state.low_bit_only)):
                # the low-bit W_aug: the members' base outputs (kept for _base) and h from one packed matmul
                h = riding.output_riding(x)  # [..., G*S*r]
                parts = group.remember(x, h.reshape(-1, h.shape[-1]))
            else:
                # a wide pass over the fp32 base by a sibling that runs first, a compact pass, or a low-bit copy
                # nothing rides on: A on its own (the A rows of W_aug, read as [G*S*r, in]), h [N*T, G*U*r]
                a = group.lora_a.view(-1, x2.shape[-1]) if kernel is LoraKernel.STACKED else group.compact_a
                parts = group.remember(x, nn.functional.linear(x2, a))  # G x [N*T, U*r]
        # the base term from the original x: fused low-bit siblings (experts.multi_lora.fused) key their shared
        # output on the tensor object, and x2 is a new view per call; reshape stays a view of their column slice
        y = self._base(x).reshape(-1, self.out_features)  # [N*T, out]
        y.addmm_(parts[self.group_index], self.flat_bt if kernel is LoraKernel.STACKED else self.compact_bt)
        return y.view(*x.shape[:-1], -1)

    def _gathered(self, x: torch.Tensor) -> torch.Tensor:
        state = self.state
        y = self._base(x)
        a = self.lora_a[state.slot_ids]  # [N, k, r, in]
        bt = self.lora_bt[state.slot_ids]  # [N, k, r, out]
        h = torch.einsum("nti,nkri->ntkr", x, a) * state.weights[:, None, :, None]
        return y + torch.einsum("ntkr,nkro->nto", h, bt)
