"""Correctness: the batched multi-LoRA layer against peft's mixed batch on the same device and dtype."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bench.gpu_check.models import MIX, Models
from experts.kv_cache import GrowingCache
from experts.multi_lora import Mixture, MultiLoraModel

TOLERANCES = {torch.bfloat16: (0.02, 0.06), torch.float32: (1e-4, 1e-4)}
"""dtype -> (atol, rtol): max |ours - peft| over the logits must stay within atol + rtol * max |peft logits|.
bf16 keeps 8 mantissa bits and ours sums in another order (fused [W; A] matmul, addmm_) than peft: on a CPU,
SmolLM2-135M's shape in bf16 differs by 0.055-0.063 (max |logits| 2.3, tolerance 0.158), while routing the
top-2 row with swapped gates differs by 1.27 and the experts move the logits by 1.95."""
CHECK_MIXTURES: list[Mixture] = [[("e1", 1.0)], list(MIX), [], [("e0", 1.0)]]  # top-1, top-2, no expert, top-1
PEFT_NAMES = ["e1", "mix", "__base__", "e0"]  # the same rows in peft's adapter_names


@torch.no_grad()
def ours_logits(multi: MultiLoraModel, ids: torch.Tensor, mixtures: Sequence[Mixture]) -> tuple[torch.Tensor, ...]:
    """Full forward logits [B, T, V], and the last position's [B, V] from a prefill of T-1 tokens plus one
    cached decode step (the engine's path), both float32."""
    mask = torch.ones_like(ids)
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    cache = GrowingCache()
    with multi.routing(mixtures):
        full = multi.model(input_ids=ids, attention_mask=mask).logits.float()
        multi.model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                    past_key_values=cache, use_cache=True)
        step = multi.model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=positions[:, -1:],
                           past_key_values=cache, use_cache=True).logits[:, -1].float()
    return full, step


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(f"{(a - b).abs().max().item():.3g}")


@torch.no_grad()
def check_correctness(m: Models, device: torch.device, dtype: torch.dtype) -> dict:
    """Rows of CHECK_MIXTURES through each kernel of ours vs peft: logits of 8 random tokens ([4, 8, V]) and of
    a cached decode step ([4, V]); passes when every error is within tolerance and the experts matter."""
    ids = torch.randint(3, m.vocab, (len(CHECK_MIXTURES), 8), generator=torch.Generator().manual_seed(7)).to(device)
    reference = m.peft(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=PEFT_NAMES).logits.float()
    base, _ = ours_logits(m.bare, ids, [[] for _ in CHECK_MIXTURES])
    atol, rtol = TOLERANCES[dtype]
    tolerance = atol + rtol * reference.abs().max().item()
    errors, kernels = {}, {}
    for label, multi, compact_max in (("stacked", m.multi4, None), ("compact", m.multi32, None),
                                      ("gathered", m.multi32, 0)):
        saved = multi.compact_max_columns
        multi.compact_max_columns = saved if compact_max is None else compact_max  # 0 forces the gathered kernel
        try:
            kernels[label] = str(multi.kernel_for(CHECK_MIXTURES))
            full, step = ours_logits(multi, ids, CHECK_MIXTURES)
        finally:
            multi.compact_max_columns = saved
        errors[label] = max(_max_abs(full, reference), _max_abs(step, reference[:, -1]))
    with_expert = [i for i, mixture in enumerate(CHECK_MIXTURES) if mixture]
    effect = _max_abs(reference[with_expert], base[with_expert])  # how far the experts move the logits
    # Each label's kernel really ran, and the experts move the logits by more than the tolerance: a layer that
    # ignored them would be off by exactly that much on their rows, so it must fail.
    passed = all(e <= tolerance for e in errors.values()) and kernels == {k: k for k in errors}
    return {"max_abs_err": errors, "kernels": kernels, "tolerance": float(f"{tolerance:.3g}"), "atol": atol,
            "rtol": rtol, "lora_effect": effect, "base_row_err": _max_abs(base[2], reference[2]),
            "passed": passed and effect > tolerance}
