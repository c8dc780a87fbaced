"""bench.cpu_anchor's report on hand-made measurements: best-of-repeats ratios, paired medians, prefill speed
(fp32 seconds over quantized seconds) and the llama.cpp ratio when it was skipped."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from bench.cpu_anchor import DOMAINS, report


def _engine(adapter_bytes: int, quantized_bytes: int) -> SimpleNamespace:
    return SimpleNamespace(multi=SimpleNamespace(adapter_bytes=lambda: adapter_bytes,
                                                 quantized_bytes=lambda: quantized_bytes, wide_bytes=lambda: 99))


def test_report_ratios():
    decode = {"fp32_bare_single": [10.0, 12.0], "quant_bare_single": [30.0, 24.0],
              "fp32_mixed4_single": [9.0, 9.0], "quant_mixed4_single": [21.0, 18.0],
              "fp32_bare_batch": [100.0, 80.0], "quant_bare_batch": [150.0, 160.0],
              "fp32_mixed4_batch": [90.0, 90.0], "quant_mixed4_batch": [120.0, 128.0]}
    prefill = {name: [1.0, 2.0] for name in decode} | {"quant_bare_batch": [3.0, 2.5], "fp32_bare_batch": [2.0, 2.2]}
    engines = {"fp32_mixed4": _engine(4 * len(DOMAINS), 0), "quant_mixed4": _engine(4 * len(DOMAINS), 0),
               "quant_bare": _engine(0, 1234)}
    backbone = SimpleNamespace(model=torch.nn.Linear(2, 2, bias=False))
    args = SimpleNamespace(quant="fp16", batch=16, new_tokens=64, repeats=2)
    out = report(decode, prefill, {}, engines, backbone, args, llama=None)
    ratios = out["ratios"]
    assert ratios["quant_vs_fp32_single"] == 2.5  # best 30 / best 12
    assert ratios["quant_vs_fp32_batch"] == 1.6  # 160 / 100
    assert ratios["mixed4_vs_quant_bare_batch"] == 0.8  # 128 / 160
    assert ratios["quant_vs_fp32_prefill_batch"] == 0.8  # fastest fp32 2.0 s over fastest quantized 2.5 s
    assert ratios["quant_vs_fp32_prefill_single"] == 1.0
    assert ratios["quant_single_vs_llama_cpp"] is None
    assert ratios["bytes_per_expert_quant_vs_fp32"] == 1.0
    assert out["paired_median_ratios"]["quant_vs_fp32_single"] == 2.5  # median of 3.0 and 2.0
    assert out["quantized_linear_bytes"] == 1234 and out["backbone_bytes_fp32"] == 16 and out["wide_copy_bytes"] == 99
    assert "nll_quant_vs_fp32_bare" not in ratios
    with_llama = report(decode, prefill, {}, engines, backbone, args, llama=15.0)
    assert with_llama["ratios"]["quant_single_vs_llama_cpp"] == 2.0
