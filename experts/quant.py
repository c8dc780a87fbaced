"""Low-bit copies of the backbone's linear layers for serving on a CPU (MOE_BACKBONE_QUANT).

Why: decode on a CPU is bound by the weight bytes a step reads (SmolLM2-135M in fp32: 540 MB per step, whatever
the batch). A served pass (`MultiLoraModel.routing`, i.e. every engine step and `moe eval qa`) reads a packed
low-bit copy of each linear layer instead. The fp32 weights stay where they are, so everything else that runs the
backbone computes exactly what it did: the router's feature pass (the gate was trained on fp32 features), expert
training (experts are trained on the full-precision backbone), a plain forward. The LoRA experts' B stay fp32 and
run as their own small matmuls beside the quantized base (as QLoRA serves them); their A rows ride on the int8/int4
copies in stacked passes (experts.multi_lora.fused: one packed matmul yields W x and A x; NLL +0.02%).

Kernels, chosen per CPU by measurement (`resolve_quant`, docs/design-notes.md):
- `int4` (`auto` on an AVX512 CPU; with bf16 dot products, AVX512-BF16 or AMX, at every width, without them for
  passes of up to NARROW_MAX_ROWS rows): 4-bit weights in groups of 32 with a scale
  and an offset each (llama.cpp's Q4_1 layout), bf16 inputs, torch's `_weight_int4pack_mm_for_cpu`; the LM head in
  int8 weights times per-row int8 activations (HEAD_MODE, `_int_mm`). 95 MB per step for SmolLM2; real answers'
  NLL +0.1% bare, +0.4% with experts.
- `int8`: int8 weights with one scale per output row, bf16 inputs, `_weight_int8pack_mm` (135 MB; NLL +0.2%/+0.4%).
- `fp16` (`auto` on AVX2 CPUs): fbgemm's fp16-weight GEMM, fp32 inputs and accumulation (269 MB; NLL
  unchanged to 4 digits). On AVX2 the int8/int4 kernels ran slower than fp32 at batch 16, so they are refused
  there; fbgemm's own int8 linear (one 7-bit input scale per tensor) raised the NLL by half. On an AVX512 CPU
  without bf16 dot products (an Ice Lake Xeon) fbgemm's fp16 ran 0.84x fp32 at one row and int4 1.71x.

On a CPU with AMX tiles an int4 model keeps a second copy per decoder layer, bf16 weights (`Bf16Linear`, run by
oneDNN on AMX-BF16), that passes of WIDE_MIN_ROWS rows or more read (batched decode, prefill): the int4 kernel does
not use AMX and falls behind from 8 rows on there (WIDE_MODE).

Memory: the packed copy sits beside the fp32 model (and the wide copy on AMX: 212 MB for SmolLM2's decoder). torch
2.13 flags the fbgemm fp16 ops as deprecated: a torch without them serves `auto` as `none` on an AVX2 CPU.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

QUANT_MODES = ("auto", "none", "fp16", "int8", "int4")
"""What MOE_BACKBONE_QUANT accepts."""
BF16_CPU_DEFAULT = "int4"
"""What `auto` means on an AVX512 CPU, with or without bf16 dot products: see resolve_quant."""
CPU_DEFAULT = "fp16"
"""What `auto` means on other x86 CPUs (AVX2) with fbgemm; the GPU keeps its bf16 backbone (`none`)."""
APPENDABLE_MODES = ("int8", "int4")
"""Modes whose packed copies can take appended output rows (experts.multi_lora.fused: LoRA A rows ride on them)."""
BF16_MODES = ("int8", "int4")
"""Modes whose kernels take bf16 inputs: measured slower than fp32 at batch 16 on AVX2, and from about 32 rows on an
AVX512 CPU without bf16 dot products (NARROW_MAX_ROWS)."""


PACKED_MAX_ROWS = 40
"""Rows (tokens in a pass, all sequences together) up to which an fp16 pass reads the packed copy. fbgemm's fp16
GEMM unpacks weights per call and beat fp32 sgemm on the 2-core AVX2 CPU it was chosen on only while the pass was
bound by weight bytes: SmolLM2's decoder matmuls ran 4.9x faster at 1 row, 1.4x at 16, 1.1x at 32, and slower from
64 on (0.83x; 0.71x at 640, a batched prefill). Wider passes (prefills, NLL scoring) read the fp32 weights, which
stay anyway. On CPUs with bf16 dot products the bf16-input modes (int8, int4) beat fp32 at every width measured
(int4 6.2x at 1 row, 1.7x at 448 on a 2-core AVX512-BF16 EPYC) and have no limit; without them, NARROW_MAX_ROWS."""


NARROW_MAX_ROWS = 32
"""Rows up to which an int8/int4 pass reads the packed copy on an AVX512 CPU without bf16 dot products (an Ice Lake
Xeon); wider passes (prefills) read the fp32 weights, which stay anyway. Measured there on SmolLM2-135M's decode
steps, each mode on its own model copy, steps interleaved (docs/design-notes.md): int4 against fp32 1.71x at 1 row,
1.91x at 4, 1.72x at 8, 1.20x at 16, 1.08x at 32; a 16-prompt prefill through int4 took 1.74x the fp32 time."""


def packed_wins(x: torch.Tensor, mode: str = "fp16") -> bool:
    """Whether a pass with input x [..., in] should read a `mode` copy (PACKED_MAX_ROWS, NARROW_MAX_ROWS)."""
    if mode in BF16_MODES:
        return bf16_cpu() or x.numel() <= NARROW_MAX_ROWS * x.shape[-1]
    return x.numel() <= PACKED_MAX_ROWS * x.shape[-1]


class QuantizedLinear(Protocol):
    """A packed copy of one nn.Linear: x [..., in] float32 -> y [..., out] float32, bias included."""

    mode: str
    nbytes: int
    """Bytes of the packed weight, which a call reads whole."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch, "fbgemm_linear_fp16_weight_fp32_activation")


@functools.cache
def bf16_cpu() -> bool:
    """Whether this CPU has bf16 dot products (AVX512-BF16 or AMX): the int8/int4 kernels then beat fp32 at every
    width. Cached: every served layer asks (packed_wins)."""
    # private torch probes (torch.cpu); a torch without them is treated as a CPU without bf16 dot products
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


@functools.cache
def avx512_cpu() -> bool:
    """Whether torch's CPU kernels run AVX512 code here (Skylake-SP and later Xeons, Zen 4): the int8/int4 kernels
    beat fp32 on narrow passes even without bf16 dot products; on AVX2 they did not."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def low_bit_cpu() -> bool:
    """Whether this CPU runs the int8/int4 kernels fast enough to serve them (AVX512, or bf16 dot products)."""
    return bf16_cpu() or avx512_cpu()


def amx_cpu() -> bool:
    """Whether this CPU has AMX tiles (oneDNN runs int8 x int8 and bf16 GEMMs on them; the int4 kernel does not)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe is not None and probe())


def resolve_quant(mode: str, device: torch.device) -> str:
    """The mode a model on `device` is served with. `auto`: int4 on an AVX512 CPU (with or without bf16 dot
    products), fp16 on another x86 CPU (fbgemm), none on CUDA; chosen by measurement (docs/design-notes.md). A mode
    the device cannot run fast is refused by name."""
    if mode not in QUANT_MODES:
        raise ValueError(f"MOE_BACKBONE_QUANT={mode!r} is not supported; use one of {', '.join(QUANT_MODES)}")
    if mode == "auto":
        if device.type != "cpu":
            return "none"
        if low_bit_cpu():
            return BF16_CPU_DEFAULT
        return CPU_DEFAULT if fbgemm_available() else "none"
    if mode != "none" and device.type != "cpu":
        raise ValueError(f"MOE_BACKBONE_QUANT={mode!r} runs on a CPU only, not on {device.type}; use 'auto' or "
                         "'none' (the GPU serves bf16)")
    if mode == "fp16" and not fbgemm_available():
        raise ValueError("MOE_BACKBONE_QUANT='fp16' needs fbgemm (x86 builds of torch); use 'auto' or 'none'")
    if mode in BF16_MODES and not low_bit_cpu():
        raise ValueError(f"MOE_BACKBONE_QUANT={mode!r} needs a CPU with AVX512 (AVX512-BF16 or AMX serve it best): on "
                         "AVX2 its kernel ran 0.8x fp32 at batch 16 (docs/design-notes.md); use 'auto' or 'fp16'")
    return mode


class Fp16Linear:
    """fbgemm's fp16-weight linear: weights stored fp16 (packed), activations and accumulation fp32."""

    mode = "fp16"

    def __init__(self, linear: nn.Linear) -> None:
        weight = linear.weight.detach().float()
        # no zero bias for bias-free layers (all of SmolLM2's): the op would add it, one more pass over the output
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        with warnings.catch_warnings():
            # torch >= 2.12 flags these fbgemm ops as deprecated (warned once per process: the first call is here)
            warnings.filterwarnings("ignore", message=".*fbgemm.*deprecated.*")
            self.packed = torch.fbgemm_pack_gemm_matrix_fp16(weight)
            self(torch.zeros(1, weight.shape[1]))
        self.nbytes = 2 * weight.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fbgemm_linear_fp16_weight_fp32_activation(x, self.packed, self.bias)


INT4_GROUP = 32
"""Inputs per 4-bit group (llama.cpp's Q4_1 uses 32)."""


class Int8Linear:
    """Weight-only int8 (one scale per output row), bf16 inputs (torch's `_weight_int8pack_mm`); the output comes
    back fp32. Fast only on a CPU with bf16 dot products (AVX512-BF16 or AMX): see `bf16_cpu`."""

    mode = "int8"

    def __init__(self, linear: nn.Linear) -> None:
        weight = linear.weight.detach().float()  # [out, in]
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127  # [out]
        self.weight = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(torch.bfloat16)
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        self.nbytes = self.weight.numel() + 2 * self.scale.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # [N, in]: the kernel takes 2-D inputs
        y = torch._weight_int8pack_mm(x2, self.weight, self.scale).float().view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    def appended(self, rows: torch.Tensor) -> Int8Linear:
        """A copy whose output also holds `rows` x ([R, in] fp32 rows quantized alike); this copy's weights become a
        prefix view of the new one's, so the base rows are stored once."""
        extra = Int8Linear(_as_linear(rows))
        out = copy.copy(self)
        out.weight = torch.cat([self.weight, extra.weight])
        out.scale = torch.cat([self.scale, extra.scale])
        out.bias = None if self.bias is None else torch.cat([self.bias, rows.new_zeros(rows.shape[0])])
        out.nbytes = self.nbytes + extra.nbytes
        self.weight, self.scale = out.weight[: self.weight.shape[0]], out.scale[: self.scale.shape[0]]
        return out

    def release(self) -> None:
        """Own storage again after `appended` (the rows appended to it are dropped with the extended copy)."""
        self.weight, self.scale = self.weight.clone(), self.scale.clone()


class Int4Linear:
    """4-bit weights in groups of INT4_GROUP inputs, each group with its own scale and offset (llama.cpp's Q4_1
    layout), bf16 inputs (torch's `_weight_int4pack_mm_for_cpu`); the output comes back fp32. Layers whose input
    width is not a multiple of the group keep int8 (Int8Linear)."""

    mode = "int4"

    def __init__(self, linear: nn.Linear) -> None:
        weight = linear.weight.detach().float()  # [out, in]
        out_features, in_features = weight.shape
        groups = weight.view(out_features, in_features // INT4_GROUP, INT4_GROUP)  # [out, in/g, g]
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)  # [out, in/g]
        scale = ((high - low) / 15).clamp(min=1e-8)
        # the kernel dequantizes w = (q - 8) * scale + zero, so the offset is stored at the code 8
        zero = low + 8 * scale
        codes = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
        self.packed = torch._convert_weight_to_int4pack_for_cpu(codes.view(out_features, in_features), 1)
        self.scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        self.nbytes = out_features * in_features // 2 + 2 * self.scales_and_zeros.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # [N, in]: the kernel takes 2-D inputs
        y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, INT4_GROUP, self.scales_and_zeros)
        y = y.float().view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    def appended(self, rows: torch.Tensor) -> Int4Linear:
        """A copy whose output also holds `rows` x ([R, in] fp32, R a multiple of ROW_ALIGN, quantized alike). The
        packed layout is row-major per output row (packing the rows apart and concatenating equals packing them
        together), so this copy's codes become a prefix view of the new one's and are stored once; its scales
        ([in/g, out, 2]) stay a contiguous copy of their own (the kernel reads them whole)."""
        extra = Int4Linear(_as_linear(rows))
        out = copy.copy(self)
        out.packed = torch.cat([self.packed, extra.packed])
        out.scales_and_zeros = torch.cat([self.scales_and_zeros, extra.scales_and_zeros], dim=1)
        out.bias = None if self.bias is None else torch.cat([self.bias, rows.new_zeros(rows.shape[0])])
        out.nbytes = self.nbytes + extra.nbytes
        self.packed = out.packed[: self.packed.shape[0]]
        return out

    def release(self) -> None:
        """Own storage again after `appended` (the rows appended to it are dropped with the extended copy)."""
        self.packed = self.packed.clone()


class Bf16Linear:
    """bf16 weights, bf16 inputs, fp32 output (`F.linear` through oneDNN, which runs it on AMX-BF16 where the CPU
    has it). The wide-pass copy on AMX CPUs (WIDE_MODE)."""

    mode = "bf16"

    def __init__(self, linear: nn.Linear) -> None:
        self.weight = linear.weight.detach().to(torch.bfloat16).contiguous()  # [out, in]
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        self.nbytes = 2 * self.weight.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x.to(torch.bfloat16), self.weight).float()
        return y if self.bias is None else y + self.bias


class Int8DynamicLinear:
    """int8 weights (one scale per output row) times int8 activations (one scale per input row, computed per
    call): torch's `_int_mm` (an int8 x int8 -> int32 GEMM on VNNI), llama.cpp's way of running its Q8 matmuls.
    For the LM head of the int4 mode (HEAD_MODE): at 16 rows the weight-only `_weight_int8pack_mm` ran 3.5x
    slower than this (12.0 vs 3.4 ms for SmolLM2's 49152 x 576 head; 1.6x at 1 row)."""

    mode = "w8a8"

    def __init__(self, linear: nn.Linear) -> None:
        weight = linear.weight.detach().float()  # [out, in]
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127  # [out]
        self.weight_t = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous().t()
        self.scale = scale  # [out] fp32
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        self.nbytes = self.weight_t.numel() + 4 * self.scale.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).float()  # [N, in]: the kernel takes 2-D inputs
        row_scale = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127  # [N, 1]
        codes = torch.round(x2 / row_scale).clamp_(-127, 127).to(torch.int8)
        # int32 [N, out] times the weight rows' scales (-> fp32), then the input rows'
        y = torch.mul(torch._int_mm(codes, self.weight_t), self.scale).mul_(row_scale).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    def appended(self, rows: torch.Tensor) -> Int8DynamicLinear:
        """As Int4Linear.appended: the codes ([out, in] under weight_t) become a prefix view of the new copy's."""
        extra = Int8DynamicLinear(_as_linear(rows))
        out = copy.copy(self)
        codes = torch.cat([self.weight_t.t(), extra.weight_t.t()])  # [out + R, in]
        out.weight_t = codes.t()
        out.scale = torch.cat([self.scale, extra.scale])
        out.bias = None if self.bias is None else torch.cat([self.bias, rows.new_zeros(rows.shape[0])])
        out.nbytes = self.nbytes + extra.nbytes
        self.weight_t = codes[: self.scale.shape[0]].t()
        return out

    def release(self) -> None:
        """Own storage again after `appended`."""
        self.weight_t = self.weight_t.t().clone().t()


ROW_ALIGN = 16
"""`_convert_weight_to_int4pack_for_cpu` packs output rows in multiples of 16: appended rows are padded to it."""


def _as_linear(rows: torch.Tensor) -> nn.Linear:
    """A bias-free nn.Linear holding `rows` ([out, in]) as its weight (what the copies' constructors take)."""
    linear = nn.Linear(rows.shape[1], rows.shape[0], bias=False)
    linear.weight.data = rows.detach().float()
    return linear


def _int4(linear: nn.Linear) -> QuantizedLinear:
    return Int4Linear(linear) if linear.in_features % INT4_GROUP == 0 else Int8Linear(linear)


_KERNELS: dict[str, Callable[[nn.Linear], QuantizedLinear]] = {
    "fp16": Fp16Linear, "int8": Int8Linear, "int4": _int4, "w8a8": Int8DynamicLinear, "bf16": Bf16Linear}
HEAD_MODE = {"int4": "w8a8"}
"""The LM head's kernel where it differs from the decoder layers': a 4-bit head raised the real answers' NLL by
2.1% (bare) and 2.6% (with experts), int8 weights by 0.1% and 0.2%, int8 weights times int8 activations by 0.13%
and 0.43% (docs/design-notes.md), and the last runs 3.5x faster at batch 16 (Int8DynamicLinear); llama.cpp's Q4
files keep their output layer at higher precision too."""


WIDE_MODE = {"int4": "bf16"}
"""On an AMX CPU, the second copy a decoder layer keeps for wide passes (WIDE_MIN_ROWS rows or more: prefills, big
decode batches). Measured on a 2-core AMX Xeon, SmolLM2-135M, `python -m bench.cpu_anchor --quant int4`: the int4
kernel does not use AMX and its cost grows with the rows (a batch-16 prefill through it took 1.7x the fp32 engine's
time); with bf16 weights for passes of 8 rows or more, batch-16 prefill ran 1.85x faster than fp32 (0.97 s against
2.97 s through int4), answer NLL +0.22% / +0.29% (bare / with experts), while batch-16 decode
gained nothing (222 vs 230-238 tok/s: a step streams 212 MB of bf16 instead of 95 MB of int4). int8 weights x int8
activations as the wide copy made batch-16 decode 1.50x fp32 (vs 1.36-1.39x) but cost 1.6% NLL. So bf16, from 32
rows, where it wins at real (cold-cache) weights. The EPYCs without AMX keep one copy."""
WIDE_MIN_ROWS = 32
"""Rows (tokens of a pass, all sequences together) from which a layer with a wide copy reads it: a batch-16 decode
step stays on int4 (with the experts' A rows riding on it), a prefill of 32 tokens or more goes wide."""


def wide_mode(mode: str) -> str | None:
    """The wide-pass copy's kernel for a model served in `mode` on this CPU, or None (one copy)."""
    return WIDE_MODE.get(mode) if amx_cpu() else None


def layer_mode(mode: str, is_head: bool) -> str:
    """The kernel a layer gets in `mode`: the LM head may take a wider one (HEAD_MODE)."""
    return HEAD_MODE.get(mode, mode) if is_head else mode


def quantize_linear(linear: nn.Linear, mode: str) -> QuantizedLinear:
    """A packed copy of `linear` (fp32 weights on the CPU) in `mode` ('fp16')."""
    if mode not in _KERNELS:
        raise ValueError(f"no low-bit kernel {mode!r}; use one of {', '.join(_KERNELS)}")
    if linear.weight.device.type != "cpu":
        raise ValueError(f"low-bit serving runs on the CPU, the weights are on {linear.weight.device.type}")
    return _KERNELS[mode](linear)


class PackedLinear(nn.Module):
    """An nn.Linear with a low-bit copy beside it, for a backbone copy that only runs plain forward passes (the
    router's own truncated copy): narrow passes read the copy, wide ones the fp32 weights (PACKED_MAX_ROWS)."""

    def __init__(self, linear: nn.Linear, mode: str) -> None:
        super().__init__()
        self.base = linear
        self.packed = quantize_linear(linear, mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not packed_wins(x, self.packed.mode):
            return self.base(x)
        shape = x.shape  # [..., in]; the fbgemm kernel takes 2-D inputs
        return self.packed(x.reshape(-1, shape[-1])).view(*shape[:-1], self.base.out_features)


def pack_linears(module: nn.Module, mode: str) -> int:
    """Wrap every nn.Linear under `module` in a PackedLinear in `mode`; returns the packed copies' bytes."""
    packed = 0
    for parent in [m for m in module.modules() if not isinstance(m, PackedLinear)]:
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                replacement = PackedLinear(child, mode)
                setattr(parent, name, replacement)
                packed += replacement.packed.nbytes
    return packed


def refuse_quantized(model: nn.Module) -> None:
    """Training must see the full-precision backbone: refuse a model whose layers carry a low-bit serving copy
    (a backbone an engine serves); load a fresh one (load_backbone never quantizes)."""
    from experts.multi_lora.layers import MultiLoraLinear  # here: the multi-LoRA manager imports this module

    for path, module in model.named_modules():
        if isinstance(module, PackedLinear) or (isinstance(module, MultiLoraLinear) and module.quant is not None):
            raise ValueError(f"{path or 'the model'} holds a low-bit serving copy (MOE_BACKBONE_QUANT): experts are "
                             "trained on the full-precision backbone; load a fresh one with load_backbone")
