"""Low-bit copies of the backbone's linear layers for serving on a CPU (MOE_BACKBONE_QUANT).

Why: decode on a CPU is bound by the weight bytes a step reads (SmolLM2-135M in fp32: 540 MB per step, whatever
the batch). A served pass (`MultiLoraModel.routing`, i.e. every engine step and `moe eval qa`) reads a packed
low-bit copy of each linear layer instead. The fp32 weights stay where they are, so everything else that runs the
backbone computes exactly what it did: the router's feature pass (the gate was trained on fp32 features), expert
training (experts are trained on the full-precision backbone), a plain forward. The LoRA experts' A and B stay
fp32 and run as their own small matmuls beside the quantized base (as QLoRA serves them).

The kernel is fbgemm's fp16-weight GEMM (bundled with PyTorch's x86 builds): weights packed as fp16, inputs and
accumulation fp32, so the answers' NLL is unchanged to 4 digits while a step reads half the bytes. Lower bits were
measured and refused (docs/design-notes.md): fbgemm's int8 linear quantizes each call's input with one 7-bit scale
per tensor, and SmolLM2's activation outliers raised the answer NLL by half; torch's weight-only int8/int4 CPU
kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) ran slower than fp32 at batch 16 and no faster than
fp16 at batch 1 on this AVX2 CPU, torchao's int8 configs slower than fp32 at both.

Memory: the packed copy (half the fp32 linear bytes, 269 MB for SmolLM2) sits beside the fp32 model; adapters cost
what they did. torch 2.13 flags the fbgemm fp16 ops as deprecated: a torch without them serves `auto` as `none`.
"""

from __future__ import annotations

import warnings
from typing import Protocol

import torch
from torch import nn

QUANT_MODES = ("auto", "none", "fp16")
"""What MOE_BACKBONE_QUANT accepts."""
CPU_DEFAULT = "fp16"
"""What `auto` means on a CPU with fbgemm; the GPU keeps its bf16 backbone (`none`)."""


PACKED_MAX_ROWS = 40
"""Rows (tokens in a pass, all sequences together) up to which a pass reads the packed copy. fbgemm's fp16 GEMM
unpacks weights per call and beats fp32 sgemm only while the pass is bound by weight bytes: on this 2-core AVX2
CPU, SmolLM2's decoder matmuls ran 4.9x faster at 1 row, 1.4x at 16, 1.1x at 32, and slower from 64 on (0.83x;
0.71x at 640, a batched prefill). Wider passes (prefills, NLL scoring) read the fp32 weights, which stay anyway."""


def packed_wins(x: torch.Tensor) -> bool:
    """Whether a pass with input x [..., in] should read the packed copy (see PACKED_MAX_ROWS)."""
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


def resolve_quant(mode: str, device: torch.device) -> str:
    """The mode a model on `device` is served with: `auto` is fp16 on a CPU with fbgemm, else `none`. A low-bit
    mode the device cannot run is refused by name (fbgemm kernels are CPU-only)."""
    if mode not in QUANT_MODES:
        raise ValueError(f"MOE_BACKBONE_QUANT={mode!r} is not supported; use one of {', '.join(QUANT_MODES)}")
    if mode == "auto":
        return CPU_DEFAULT if device.type == "cpu" and fbgemm_available() else "none"
    if mode != "none" and (device.type != "cpu" or not fbgemm_available()):
        raise ValueError(f"MOE_BACKBONE_QUANT={mode!r} runs on a CPU with fbgemm (x86) only, not on {device.type}; "
                         "use 'auto' or 'none'")
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


_KERNELS: dict[str, type[Fp16Linear]] = {"fp16": Fp16Linear}


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
        if not packed_wins(x):
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
