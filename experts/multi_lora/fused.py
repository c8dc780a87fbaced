"""One low-bit copy for sibling layers that read the same input (q/k/v of attention, gate/up of the MLP), with
their LoRA down-projections riding on it.

A served pass on a CPU reads each linear layer's packed low-bit copy (experts.quant). Read one by one, the
siblings cost three (or two) packed matmuls, three input casts and three calls' dispatch per layer; stacked by rows
they cost one: `W_fused = [W_q; W_k; W_v]` ([sum out, in]) quantized as one matrix. The int4/int8 layouts scale each
output row on its own (int4 per group of 32 inputs along the row), so the stacked copy holds exactly the codes the
separate copies held. vLLM's QKVParallelLinear and MergedColumnParallelLinear fuse the same siblings on a GPU.

The first member called computes the whole fused output; every member then takes its own column slice once
(`SiblingSlice.__call__`): a second call of the same member, or a call with another input, computes afresh, so a
slice a member has since changed in place (the LoRA term is added into it) is never handed out twice.

The adapters' A rows ride on the same copy (`attach`, int8/int4 only): the group's stacked A's ([G*S*r, in]) are
quantized alike and appended as output rows, so a stacked pass gets the members' base outputs and h = x A^T from
one packed matmul instead of two calls (the low-bit counterpart of the fp32 W_aug in layers.py). The base codes
stay a prefix view of the extended copy: bare passes read exactly the rows they read before.

On an AMX CPU a copy also holds a wide twin (experts.quant.WIDE_MODE: bf16) that passes of WIDE_MIN_ROWS rows or
more read (prefills); A rides on the narrow copy only, and wide passes read the fp32 A stack.

Measured on a 2-core Xeon with AMX (SmolLM2-135M, int4, paired decode steps of one process): q/k/v + gate/up of
one layer 124 -> 94 us at 1 row, 564 -> 536 us at 16 rows; whole bare steps 1.06x at 1 row, about even at 16; a
4-expert batch of 16 went from 0.815x to 0.831x the bare step (docs/design-notes.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from experts.quant import ROW_ALIGN, WIDE_MIN_ROWS, QuantizedLinear, quantize_linear


class FusedLowBit:
    """The low-bit copy of sibling layers' weights stacked by rows; hands each member its output slice."""

    def __init__(self, linears: Sequence[nn.Linear], mode: str, wide_mode: str | None = None) -> None:
        """`wide_mode`: a second copy that passes of WIDE_MIN_ROWS rows or more read (experts.quant.WIDE_MODE)."""
        widths = {linear.in_features for linear in linears}
        if len(widths) != 1:
            raise ValueError(f"fused siblings must read one input width, got {sorted(widths)}")
        if len({linear.bias is None for linear in linears}) != 1:
            raise ValueError("fused siblings must all have a bias or all have none")
        stacked = nn.Linear(widths.pop(), sum(linear.out_features for linear in linears),
                            bias=linears[0].bias is not None)
        with torch.no_grad():
            stacked.weight.copy_(torch.cat([linear.weight.detach().float() for linear in linears]))
            if stacked.bias is not None:
                stacked.bias.copy_(torch.cat([linear.bias.detach().float() for linear in linears]))
        self.packed: QuantizedLinear = quantize_linear(stacked, mode)
        self.wide: QuantizedLinear | None = None if wide_mode is None else quantize_linear(stacked, wide_mode)
        self.mode = mode
        self.nbytes = self.packed.nbytes  # what a narrow pass reads; the wide copy adds wide.nbytes stored
        self.sizes = [linear.out_features for linear in linears]
        self.riding: QuantizedLinear | None = None  # packed with the group's LoRA A rows appended (attach)
        self.rows = 0  # A rows riding (R), before padding to ROW_ALIGN
        self._riding_sizes: list[int] = []  # the riding copy's output split: members, R, padding
        self._input: torch.Tensor | None = None
        self._input_version = -1
        self._pending: list[torch.Tensor | None] = []  # per member: its slice of the last output, until taken

    def members(self) -> list[SiblingSlice]:
        return [SiblingSlice(self, index) for index in range(len(self.sizes))]

    def attach(self, rows: torch.Tensor | None) -> bool:
        """Let the group's LoRA down-projections ride on the packed copy: `rows` [R, in] (the stacked A's, fp32) are
        quantized alike and appended as output rows, so one packed matmul yields the members' base outputs and
        h = x A^T together (the low-bit counterpart of the fp32 W_aug). False (nothing rides) for None, or for a
        kernel whose packed layout cannot take rows (fp16, w8a8). 4-bit A moved the real answers' NLL with the
        domain's expert by 0.02% (docs/design-notes.md)."""
        had_rows = self.riding is not None
        self.riding, self.rows, self._riding_sizes = None, 0, []
        self.forget()
        append = getattr(self.packed, "appended", None)
        if rows is None or append is None:
            if had_rows:  # the base codes are a prefix view of the dropped extended copy: free its A rows
                self.packed.release()
            return False
        padding = -rows.shape[0] % ROW_ALIGN
        padded = torch.cat([rows.float(), rows.new_zeros(padding, rows.shape[1])]) if padding else rows.float()
        self.riding = append(padded)
        self.rows = rows.shape[0]
        self._riding_sizes = [*self.sizes, self.rows, padding]
        return True

    @property
    def riding_bytes(self) -> int:
        """Bytes the appended A rows add (what an adapter costs in the low-bit copy)."""
        return 0 if self.riding is None else self.riding.nbytes - self.packed.nbytes

    def rides(self, x: torch.Tensor, narrow: bool = False) -> bool:
        """Whether a stacked pass over x takes h from the riding copy (wide passes read the wide copy and fp32 A:
        rows riding there too would put an expert over 2% of the backbone's bytes). `narrow`: as output's."""
        return self.riding is not None and not self._wide(x, narrow)

    def _wide(self, x: torch.Tensor, narrow: bool = False) -> bool:
        return not narrow and self.wide is not None and x.numel() >= WIDE_MIN_ROWS * x.shape[-1]

    def forget(self) -> None:
        self._input, self._pending = None, []

    def output_riding(self, x: torch.Tensor) -> torch.Tensor:
        """h = x A^T ([..., R]) from the riding copy; the members' base parts wait for their SiblingSlice calls."""
        *parts, h, _padding = self.riding(x).split(self._riding_sizes, dim=-1)
        self._pending = parts
        self._input, self._input_version = x, x._version
        return h

    def output(self, x: torch.Tensor, index: int, narrow: bool = False) -> torch.Tensor:
        """Member `index`'s part of W_fused x ([..., out_index], a strided view of the fused [..., sum out]).
        `narrow`: read the narrow copy at any width (scoring text as decode steps read the weights)."""
        fresh = (self._input is x and self._input_version == x._version and len(self._pending) > index
                 and self._pending[index] is not None)
        if not fresh:
            packed = self.wide if self._wide(x, narrow) else self.packed
            self._pending = list(packed(x).split(self.sizes, dim=-1))
            self._input, self._input_version = x, x._version
        part, self._pending[index] = self._pending[index], None
        if not any(p is not None for p in self._pending):  # every member took its slice: drop the input reference
            self._input = None
        return part


class SiblingSlice:
    """One member's view of a FusedLowBit, shaped as the QuantizedLinear protocol (what MultiLoraLinear.quant holds)."""

    def __init__(self, fused: FusedLowBit, index: int) -> None:
        self.fused = fused
        self.index = index
        self.mode = fused.mode
        self.nbytes = fused.nbytes * fused.sizes[index] // sum(fused.sizes)  # this member's share of the rows

    def __call__(self, x: torch.Tensor, narrow: bool = False) -> torch.Tensor:
        return self.fused.output(x, self.index, narrow)
