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

On a CPU the base term W x of a served pass comes from a low-bit copy of W (experts.quant,
MOE_BACKBONE_QUANT), one per input group (`fused`: q/k/v and gate/up stacked by rows, one packed matmul). The
B's stay fp32; in a stacked pass over an int8/int4 copy the group's A rows ride on it (appended output rows, the
low-bit W_aug), otherwise the A's are an fp32 stack of their own.

Modules: `metadata` (the kernel enum and the per-pass routing tensors), `layers` (MultiLoraLinear and the
shared-input groups), `fused` (the groups' shared low-bit copies), `manager` (MultiLoraModel: adapter slots,
stacking, per-pass preparation).
"""

from experts.multi_lora.layers import InputGroup, MultiLoraLinear
from experts.multi_lora.manager import COMPACT_MAX_COLUMNS, SHARED_INPUT_GROUPS, STACKED_MAX_COLUMNS, MultiLoraModel
from experts.multi_lora.metadata import GateState, LoraKernel, Mixture

__all__ = ["COMPACT_MAX_COLUMNS", "SHARED_INPUT_GROUPS", "STACKED_MAX_COLUMNS", "GateState", "InputGroup",
           "LoraKernel", "Mixture", "MultiLoraLinear", "MultiLoraModel"]
