"""Fused low-bit siblings (experts.multi_lora.fused): q/k/v and gate/up share one packed copy, each member takes its
slice once, and the adapters' A rows ride on the copy (int8/int4) without touching the bare path."""

from __future__ import annotations

import copy

import pytest
import torch

from experts import quant as quant_module
from experts.adapters import load_lora_weights
from experts.multi_lora import MultiLoraModel
from experts.multi_lora import manager as manager_module
from experts.multi_lora.fused import FusedLowBit, SiblingSlice
from experts.quant import WIDE_MIN_ROWS, fbgemm_available, low_bit_cpu
from tests.test_multi_lora import _random_adapter
from tests.test_quant import TOLERANCE

pytestmark = pytest.mark.skipif(not fbgemm_available(), reason="fbgemm (x86 CPU kernels) not in this torch build")
NEEDS_LOW_BIT = pytest.mark.skipif(not low_bit_cpu(), reason="int8/int4 kernels are served on AVX512 CPUs only")
MODES = pytest.mark.parametrize("mode", ["fp16", pytest.param("int8", marks=NEEDS_LOW_BIT),
                                         pytest.param("int4", marks=NEEDS_LOW_BIT)])
ROW_MODES = pytest.mark.parametrize("mode", [pytest.param("int8", marks=NEEDS_LOW_BIT),
                                             pytest.param("int4", marks=NEEDS_LOW_BIT)])
MIXTURES = [[("a", 1.0)], [("b", 0.7), ("c", 0.3)], [], [("c", 1.0)]]


@pytest.fixture
def adapters(backbone, tmp_path):
    return {name: _random_adapter(backbone.model, tmp_path, name, rank=rank, seed=seed)
            for name, rank, seed in (("a", 4, 1), ("b", 8, 2), ("c", 4, 3))}


def _served(multi: MultiLoraModel, ids: torch.Tensor, mixtures) -> torch.Tensor:
    with torch.no_grad(), multi.routing(mixtures):
        return multi.model(input_ids=ids).logits


@MODES
def test_siblings_share_one_copy_and_match_separate_copies(backbone, monkeypatch, mode):
    """q/k/v (and gate/up) read one stacked copy; the bare served pass equals one over separate copies: each output
    row is quantized on its own, so stacking changes no code."""
    ids = torch.randint(0, backbone.model.config.vocab_size, (3, 6))
    fused = MultiLoraModel(copy.deepcopy(backbone.model), quant=mode)
    attention = [fused.layers[f"model.layers.0.self_attn.{name}_proj"].quant for name in "qkv"]
    assert all(isinstance(part, SiblingSlice) for part in attention)
    assert len({id(part.fused) for part in attention}) == 1 and [p.index for p in attention] == [0, 1, 2]
    monkeypatch.setattr(manager_module, "SHARED_INPUT_GROUPS", ())
    separate = MultiLoraModel(copy.deepcopy(backbone.model), quant=mode)
    alone = separate.layers["model.layers.0.self_attn.q_proj"].quant
    assert not isinstance(alone, SiblingSlice) or len(alone.fused.sizes) == 1  # int8/int4: a copy of its own
    torch.testing.assert_close(_served(fused, ids, [[]] * 3), _served(separate, ids, [[]] * 3), rtol=0, atol=1e-5)
    assert abs(fused.quantized_bytes() - separate.quantized_bytes()) <= 0.01 * separate.quantized_bytes()


def test_a_member_slice_is_handed_out_once():
    """A member changes its slice in place (the LoRA term); calling it again recomputes instead of handing back the
    changed slice; another input recomputes too."""
    torch.manual_seed(0)
    linears = [torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 32, bias=False)]
    fused = FusedLowBit(linears, "fp16")
    first, second = fused.members()
    x = torch.randn(2, 64)
    expected = [x @ linear.weight.t() for linear in linears]
    out = first(x)
    torch.testing.assert_close(out, expected[0], rtol=0, atol=1e-2)
    out.add_(100.0)
    torch.testing.assert_close(second(x), expected[1], rtol=0, atol=1e-2)  # untouched by the first's change
    torch.testing.assert_close(first(x), expected[0], rtol=0, atol=1e-2)  # recomputed, not the changed slice
    with pytest.raises(ValueError, match="one input width"):
        FusedLowBit([torch.nn.Linear(64, 8), torch.nn.Linear(32, 8)], "fp16")


@ROW_MODES
def test_lora_a_rides_on_the_low_bit_copy(backbone, adapters, monkeypatch, mode):
    """Stacked passes read h = x A^T from the low-bit copy with A's rows appended: within tolerance of the fp32 A
    path; the bare rows and an adapter-free model are untouched (the base codes are a prefix view); removing
    every adapter drops the riding rows. (One copy per layer: a CPU without AMX.)"""
    monkeypatch.setattr(quant_module, "amx_cpu", lambda: False)
    ids = torch.randint(0, backbone.model.config.vocab_size, (4, 6))
    untouched = _served(MultiLoraModel(copy.deepcopy(backbone.model), quant=mode), ids, [[]] * 4)
    multi = MultiLoraModel(copy.deepcopy(backbone.model), quant=mode)
    for name, path in adapters.items():
        multi.add_adapter(load_lora_weights(path, name))
    assert multi.kernel_for(MIXTURES) == "stacked"
    assert multi.groups and all(group.riding is not None for group in multi.groups)
    rows = {id(g.riding): g.riding.rows for g in multi.groups}
    assert sorted(set(rows.values())) == sorted({len(g.members) * 3 * 8 for g in multi.groups})  # G x S x r
    riding = _served(multi, ids, MIXTURES)
    bare_bytes = multi.adapter_bytes() - sum(g.riding.riding_bytes for g in multi.groups)
    assert multi.adapter_bytes() > bare_bytes > 0
    torch.testing.assert_close(_served(multi, ids, [[]] * 4), untouched, rtol=0, atol=0)
    for group in multi.groups:  # the same stacks read through fp32 A instead
        group.riding = None
    fp32_a = _served(multi, ids, MIXTURES)
    # 1.5x the base tolerance: the tiny model's random adapters move logits by ~1.0, the worst case for 4-bit A
    torch.testing.assert_close(riding, fp32_a, rtol=0, atol=1.5 * TOLERANCE[mode])
    assert not torch.equal(riding, fp32_a)  # the riding pass did read the low-bit A
    for name in adapters:
        multi.remove_adapter(name)
    fused = {layer.quant.fused for layer in multi.layers.values() if isinstance(layer.quant, SiblingSlice)}
    assert fused and all(f.riding is None for f in fused)
    for copy_ in (f.packed for f in fused):  # the base codes own their storage again: no A rows left behind
        codes = copy_.packed if mode == "int4" else copy_.weight
        assert codes.untyped_storage().nbytes() == codes.numel() * codes.element_size()
    torch.testing.assert_close(_served(multi, ids, [[]] * 4), untouched, rtol=0, atol=0)


@NEEDS_LOW_BIT
def test_wide_passes_read_a_bf16_copy_on_amx(backbone, adapters, monkeypatch):
    """On an AMX CPU an int4 model keeps a bf16 copy per decoder layer that passes of WIDE_MIN_ROWS rows or more
    read (oneDNN runs it on AMX, the int4 kernel does not); narrower passes read int4 exactly as before, with the A
    rows riding; wide passes read fp32 A. Without AMX there is one copy."""
    vocab = backbone.model.config.vocab_size
    narrow, wide = torch.randint(0, vocab, (1, WIDE_MIN_ROWS - 1)), torch.randint(0, vocab, (4, WIDE_MIN_ROWS))
    with torch.no_grad():
        reference = backbone.model(input_ids=wide).logits
    monkeypatch.setattr(quant_module, "amx_cpu", lambda: False)
    one = MultiLoraModel(copy.deepcopy(backbone.model), quant="int4")
    assert one.wide_bytes() == 0
    monkeypatch.setattr(quant_module, "amx_cpu", lambda: True)
    monkeypatch.setattr(quant_module, "bf16_cpu", lambda: True)  # AMX CPUs have bf16 dot products
    two = MultiLoraModel(copy.deepcopy(backbone.model), quant="int4")
    assert two.wide_bytes() > 0
    torch.testing.assert_close(_served(two, narrow, [[]]), _served(one, narrow, [[]]), rtol=0, atol=0)
    served = _served(two, wide, [[]] * 4)
    torch.testing.assert_close(served, reference, rtol=0, atol=TOLERANCE["int4"])
    assert not torch.equal(served, _served(one, wide, [[]] * 4))  # the wide pass read the other copy
    scored = {}
    for label, multi in (("one", one), ("two", two)):  # scoring as decode steps read: the int4 copy at any width
        with torch.no_grad(), multi.routing([[]] * 4, low_bit_only=True):
            scored[label] = multi.model(input_ids=wide).logits
    torch.testing.assert_close(scored["two"], scored["one"], rtol=0, atol=0)
    fp32 = MultiLoraModel(copy.deepcopy(backbone.model))
    for multi in (fp32, two):
        for name, path in adapters.items():
            multi.add_adapter(load_lora_weights(path, name))
    for group in two.groups:  # A rides on the int4 copy only: wide passes read fp32 A (bytes per expert < 2%)
        width = group.leader.in_features
        assert group.riding.rides(torch.zeros(WIDE_MIN_ROWS - 1, width))
        assert not group.riding.rides(torch.zeros(WIDE_MIN_ROWS, width))
    torch.testing.assert_close(_served(two, wide, MIXTURES), _served(fp32, wide, MIXTURES), rtol=0,
                               atol=1.5 * TOLERANCE["int4"])
