"""The low-bit serving copy of the backbone (MOE_BACKBONE_QUANT): served passes match the fp32 backbone within
stated tolerances, bare and with multi-LoRA rows, for every kernel; everything outside a served pass (router
features, a plain forward) is bit-identical to fp32; training refuses a quantized model; the setting refuses
what it cannot run.

Tolerances on the logits of the tiny random Llama (logits within about +-1.1), about 3x the measured worst case:
fp16 weights with fp32 inputs 1e-3 (measured 2e-4); int8 weights per row with bf16 inputs 0.02 (7e-3); 4-bit
weights in groups of 32 with bf16 inputs 0.2 (0.08: the tiny model's random weights are the worst case for 4 bits,
a trained model's answer NLL is bench.cpu_anchor's figure). int8/int4 run only on an AVX512 CPU (as served)."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from pydantic import ValidationError

from core.settings import Settings
from experts import quant as quant_module
from experts.adapters import load_lora_weights
from experts.engine import GenerationEngine, GenerationRequest, SamplingParams
from experts.multi_lora import MultiLoraModel
from experts.quant import (
    APPENDABLE_MODES,
    NARROW_MAX_ROWS,
    PACKED_MAX_ROWS,
    Int8DynamicLinear,
    Int8Linear,
    PackedLinear,
    fbgemm_available,
    low_bit_cpu,
    refuse_quantized,
    resolve_quant,
)
from experts.training import TrainConfig, train_lora
from router.features import FeatureEncoder
from tests.test_multi_lora import KERNELS, _random_adapter

pytestmark = pytest.mark.skipif(not fbgemm_available(), reason="fbgemm (x86 CPU kernels) not in this torch build")

TOLERANCE = {"fp16": 1e-3, "int8": 0.02, "int4": 0.2}
MIN_COMPARED = {"fp16": 12, "int8": 12, "int4": 12}
"""Greedy steps compared before the first near-tie (of 24), at least."""
NEEDS_LOW_BIT = pytest.mark.skipif(not low_bit_cpu(), reason="int8/int4 kernels are served on AVX512 CPUs only")
MODES = pytest.mark.parametrize("mode", ["fp16", pytest.param("int8", marks=NEEDS_LOW_BIT),
                                         pytest.param("int4", marks=NEEDS_LOW_BIT)])


@pytest.fixture
def adapters(backbone, tmp_path):
    return {name: _random_adapter(backbone.model, tmp_path, name, rank=rank, seed=seed)
            for name, rank, seed in (("a", 4, 1), ("b", 8, 2), ("c", 4, 3))}


def test_setting_refuses_what_it_cannot_run(tmp_path, monkeypatch):
    for value in ("q4_1", "bf16", "INT8"):
        with pytest.raises(ValidationError, match="backbone_quant"):
            Settings(home=tmp_path, backbone_quant=value)
    monkeypatch.setenv("MOE_BACKBONE_QUANT", "int3")
    with pytest.raises(ValidationError, match="backbone_quant"):
        Settings(home=tmp_path)
    monkeypatch.setenv("MOE_BACKBONE_QUANT", "int4")
    assert Settings(home=tmp_path).backbone_quant == "int4"
    for value in ("fp16", "int8", "int4"):
        with pytest.raises(ValidationError, match=f"MOE_BACKBONE_QUANT='{value}' runs on a CPU only"):
            Settings(home=tmp_path, device="cuda", backbone_quant=value)
    assert Settings(home=tmp_path, device="cuda", backbone_quant="auto").backbone_quant == "auto"
    assert resolve_quant("auto", torch.device("cuda")) == "none"  # the GPU keeps its bf16 backbone
    assert resolve_quant("none", torch.device("cpu")) == "none"
    with pytest.raises(ValueError, match="not on cuda"):
        resolve_quant("fp16", torch.device("cuda"))
    with pytest.raises(ValueError, match="'q4' is not supported"):
        resolve_quant("q4", torch.device("cpu"))


def test_auto_picks_by_cpu_and_bf16_modes_need_avx512(monkeypatch):
    """`auto` is int4 on an AVX512 CPU, with bf16 dot products or without, fp16 elsewhere (AVX2); int8/int4 asked
    for on an AVX2 CPU are refused by name (their kernels ran slower than fp32 at batch 16 there)."""
    for bf16, avx512 in ((True, False), (False, True)):
        monkeypatch.setattr(quant_module, "bf16_cpu", lambda bf16=bf16: bf16)
        monkeypatch.setattr(quant_module, "avx512_cpu", lambda avx512=avx512: avx512)
        assert resolve_quant("auto", torch.device("cpu")) == "int4"
        assert resolve_quant("int8", torch.device("cpu")) == "int8"
    monkeypatch.setattr(quant_module, "bf16_cpu", lambda: False)
    monkeypatch.setattr(quant_module, "avx512_cpu", lambda: False)
    assert resolve_quant("auto", torch.device("cpu")) == "fp16"
    assert resolve_quant("fp16", torch.device("cpu")) == "fp16"
    for mode in ("int8", "int4"):
        with pytest.raises(ValueError, match=f"MOE_BACKBONE_QUANT='{mode}' needs a CPU with AVX512"):
            resolve_quant(mode, torch.device("cpu"))


@NEEDS_LOW_BIT
def test_without_bf16_dot_products_wide_int4_passes_read_the_fp32_weights(backbone, monkeypatch):
    """On an AVX512 CPU without bf16 dot products the int4 kernel beats fp32 on decode-wide passes only
    (NARROW_MAX_ROWS): a prefill reads the fp32 weights, bit-identical to the plain model; a decode step reads
    int4; scoring with low_bit_only reads int4 at every width, as decode steps do."""
    monkeypatch.setattr(quant_module, "bf16_cpu", lambda: False)
    # 42 rows: wider than NARROW_MAX_ROWS and than the w8a8 LM head's PACKED_MAX_ROWS
    ids = torch.randint(0, backbone.model.config.vocab_size, (3, max(NARROW_MAX_ROWS, PACKED_MAX_ROWS) // 3 + 1))
    with torch.no_grad():
        reference = backbone.model(input_ids=ids).logits
    multi = MultiLoraModel(backbone.model, quant="int4")
    with torch.no_grad():
        with multi.routing([[], [], []]):
            wide = backbone.model(input_ids=ids).logits
        with multi.routing([[], [], []]):
            narrow = backbone.model(input_ids=ids[:, :4]).logits
        with multi.routing([[], [], []], low_bit_only=True):
            forced = backbone.model(input_ids=ids).logits
    torch.testing.assert_close(wide, reference, rtol=0, atol=0)
    for served, expected in ((narrow, reference[:, :4]), (forced, reference)):
        torch.testing.assert_close(served, expected, rtol=0, atol=TOLERANCE["int4"])
        assert not torch.equal(served, expected)
    monkeypatch.setattr(quant_module, "bf16_cpu", lambda: True)  # with them: the copy at every width
    with torch.no_grad(), multi.routing([[], [], []]):
        assert not torch.equal(backbone.model(input_ids=ids).logits, reference)


@MODES
def test_bare_forward_matches_fp32_and_plain_passes_stay_exact(backbone, mode):
    ids = torch.randint(0, backbone.model.config.vocab_size, (3, 9))
    with torch.no_grad():
        reference = backbone.model(input_ids=ids).logits
    multi = MultiLoraModel(backbone.model, quant=mode)
    assert multi.quantized_bytes() > 0
    assert type(backbone.model.lm_head).__name__ == "MultiLoraLinear"  # the LM head is served low-bit too
    with torch.no_grad():
        with multi.routing([[], [], []]):
            served = backbone.model(input_ids=ids).logits
        plain = backbone.model(input_ids=ids).logits
    torch.testing.assert_close(served, reference, rtol=0, atol=TOLERANCE[mode])
    assert not torch.equal(served, reference)  # the served pass did read the low-bit copy
    torch.testing.assert_close(plain, reference, rtol=0, atol=0)  # outside a served pass: the fp32 weights


def test_wide_passes_read_the_fp32_weights(backbone):
    """A prefill wider than PACKED_MAX_ROWS (where fp32 sgemm beats the fp16 kernel) reads the fp32 weights:
    bit-identical to the plain model; a decode-wide pass reads the copy."""
    ids = torch.randint(0, backbone.model.config.vocab_size, (3, PACKED_MAX_ROWS))  # 3 x 40 rows
    with torch.no_grad():
        reference = backbone.model(input_ids=ids).logits
    multi = MultiLoraModel(backbone.model, quant="fp16")
    with torch.no_grad():
        with multi.routing([[], [], []]):
            wide = backbone.model(input_ids=ids).logits
        with multi.routing([[], [], []]):
            narrow = backbone.model(input_ids=ids[:, :4]).logits
    torch.testing.assert_close(wide, reference, rtol=0, atol=0)
    torch.testing.assert_close(narrow, reference[:, :4], rtol=0, atol=TOLERANCE["fp16"])
    assert not torch.equal(narrow, reference[:, :4])
    with torch.no_grad(), multi.routing([[], [], []], low_bit_only=True):  # scoring as decode steps read
        forced = backbone.model(input_ids=ids).logits
    torch.testing.assert_close(forced, reference, rtol=0, atol=TOLERANCE["fp16"])
    assert not torch.equal(forced, reference)


@pytest.mark.parametrize(("kernel", "tolerance"), [("fp16", 1e-3), ("bf16", 2e-2)])
def test_router_copy_reads_low_bit_for_one_prompt_and_fp32_for_a_batch(backbone, kernel, tolerance):
    """The ingress's own truncated router copy (RoutingService(own_backbone=True)) packs its kept layers (fp16, or
    bf16 on an AMX CPU: router_copy_kernel): one prompt's features are within tolerance of fp32, a batch wide enough
    for fp32 sgemm is exact."""
    texts = ["my order never arrived", "headache and fever since yesterday"] * 12
    reference = FeatureEncoder(copy.deepcopy(backbone.model), backbone.tokenizer, [1, 2]).encode(texts)
    encoder = FeatureEncoder(backbone.model, backbone.tokenizer, [1, 2])
    with pytest.raises(ValueError, match="truncate"):
        encoder.pack(kernel)
    encoder.truncate()
    assert encoder.pack(kernel) > 0
    packed = [m for m in backbone.model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 7 * len(backbone.model.model.layers)  # q, k, v, o, gate, up, down of each kept layer
    one = encoder.encode(texts[:1], batch_size=1)
    torch.testing.assert_close(one, reference[:1], rtol=0, atol=tolerance)
    assert not torch.equal(one, reference[:1])
    torch.testing.assert_close(encoder.encode(texts, batch_size=24), reference, rtol=0, atol=0)  # 24 x >=4 rows
    with pytest.raises(ValueError, match="trained on the full-precision backbone"):
        refuse_quantized(backbone.model)


@MODES
@KERNELS
def test_multi_lora_rows_match_fp32(backbone, adapters, mode, stacked_max_columns, compact_max_columns, kernel):
    """Mixed rows (top-1, top-2, bare) on the quantized base against the same rows on the fp32 base. The LoRA B's
    are fp32 in both; a stacked pass over int8/int4 reads A from the low-bit copy too (A rows ride on it:
    experts.multi_lora.fused), so its tolerance adds half a base tolerance (worst case measured 0.28 on int4)."""
    ids = torch.randint(0, backbone.model.config.vocab_size, (4, 7))
    mixtures = [[("a", 1.0)], [("b", 0.7), ("c", 0.3)], [], [("c", 1.0)]]
    outputs = {}
    for quant in ("none", mode):
        model = copy.deepcopy(backbone.model)
        multi = MultiLoraModel(model, stacked_max_columns, compact_max_columns, quant=quant)
        for name, path in adapters.items():
            multi.add_adapter(load_lora_weights(path, name))
        assert multi.kernel_for(mixtures) == kernel
        with torch.no_grad(), multi.routing(mixtures):
            outputs[quant] = model(input_ids=ids).logits
        with torch.no_grad(), multi.routing([[]] * 4):
            outputs[quant + "-bare"] = model(input_ids=ids).logits
    tolerance = TOLERANCE[mode] * (1.5 if kernel == "stacked" and mode in APPENDABLE_MODES else 1.0)
    torch.testing.assert_close(outputs[mode], outputs["none"], rtol=0, atol=tolerance)
    # the experts still change the output as much as they do on fp32 (not silently dropped)
    delta_fp32 = outputs["none"] - outputs["none-bare"]
    delta_quant = outputs[mode] - outputs[mode + "-bare"]
    assert delta_fp32[[0, 1, 3]].abs().max() > 4 * TOLERANCE[mode]  # 1.0 on the tiny model: above any tolerance
    torch.testing.assert_close(delta_quant, delta_fp32, rtol=0, atol=2 * tolerance)


def test_memory_per_expert_is_unchanged(backbone, adapters):
    """Stacks only for the layers an adapter adapts: the LM head and other wrapped-for-quant layers get none."""
    sizes = {}
    for quant in ("none", "fp16"):
        multi = MultiLoraModel(copy.deepcopy(backbone.model), quant=quant)
        for name, path in adapters.items():
            multi.add_adapter(load_lora_weights(path, name))
        sizes[quant] = multi.adapter_bytes()
        assert multi.layers["lm_head"].lora_a is None if quant == "fp16" else "lm_head" not in multi.layers
    assert sizes["fp16"] == sizes["none"] > 0


def test_router_features_stay_fp32_on_a_served_model(backbone):
    """A process that routes and serves on one model (the CLI, `moe eval`) reads fp32 features: the router was
    trained on them."""
    texts = ["my order never arrived", "headache and fever since yesterday"]
    before = FeatureEncoder(copy.deepcopy(backbone.model), backbone.tokenizer, [1, 2]).encode(texts)
    MultiLoraModel(backbone.model, quant="fp16")
    after = FeatureEncoder(backbone.model, backbone.tokenizer, [1, 2]).encode(texts)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_training_refuses_a_quantized_backbone(backbone):
    MultiLoraModel(backbone.model, quant="fp16")
    with pytest.raises(ValueError, match="trained on the full-precision backbone"):
        refuse_quantized(backbone.model)
    with pytest.raises(ValueError, match="trained on the full-precision backbone"):
        train_lora(backbone.model, [], TrainConfig(), pad_id=0)


def test_a_second_engine_takes_over_the_wrappers(backbone):
    """Pools built one after another on one backbone (bench.quality does): the later one re-wraps the earlier
    one's layers and reuses their packed copies."""
    first = MultiLoraModel(backbone.model, quant="fp16")
    second = MultiLoraModel(backbone.model, quant="fp16")
    path = "model.layers.0.mlp.down_proj"
    assert second.layers[path] is not first.layers[path]
    assert second.layers[path].quant is first.layers[path].quant
    assert backbone.model.get_submodule(path) is second.layers[path]


def _greedy_with_margins(multi: MultiLoraModel, mixture, prompt: list[int], steps: int) -> tuple[list, list]:
    """Greedy tokens through served passes, and each step's top-1 minus top-2 logit."""
    ids, tokens, margins = torch.tensor([prompt]), [], []
    with torch.no_grad():
        for _ in range(steps):
            with multi.routing([mixture]):
                top = multi.model(input_ids=ids).logits[0, -1].topk(2)
            tokens.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            ids = torch.cat([ids, top.indices[:1].view(1, 1)], dim=1)
    return tokens, margins


@MODES
def test_engine_greedy_tokens_agree_where_margins_allow(backbone, settings, adapters, mode):
    """The quantized engine's greedy tokens (one batch of bare and expert rows) equal fp32's up to the first step
    whose fp32 top-2 margin is within twice the logit tolerance (a flip there is rounding, not a bug)."""
    reference = MultiLoraModel(copy.deepcopy(backbone.model))
    settings.backbone_quant = mode
    engine = GenerationEngine(backbone, settings)
    for name, path in adapters.items():
        reference.add_adapter(load_lora_weights(path, name))
        engine.add_adapter(load_lora_weights(path, name))
    assert engine.multi.quant == mode
    tok = backbone.tokenizer
    prompts = [tok(t, add_special_tokens=False)["input_ids"]
               for t in ("my order never arrived", "headache and fever since", "roth ira or", "the quick brown")]
    mixtures = [[], [("a", 1.0)], [], [("b", 0.6), ("c", 0.4)]]
    engine.eos_ids = set()
    params = SamplingParams(max_tokens=6, temperature=0, stop=(), logprobs=0)

    async def complete_all() -> list:
        return await asyncio.gather(*(engine.complete(GenerationRequest(p, m, params))
                                      for p, m in zip(prompts, mixtures, strict=True)))

    engine.start()
    try:
        events = asyncio.run(complete_all())  # one batch: the rows decode together
    finally:
        engine.stop()
    compared = 0
    for prompt, mixture, event in zip(prompts, mixtures, events, strict=True):
        expected, margins = _greedy_with_margins(reference, mixture, prompt, 6)
        served = [item.token_id for item in event.logprobs]
        for step, margin in enumerate(margins):
            if margin < 2 * TOLERANCE[mode]:
                break
            assert served[step] == expected[step], (prompt, mixture, step, margin)
            compared += 1
    assert compared >= MIN_COMPARED[mode]


@NEEDS_LOW_BIT
def test_int4_keeps_the_lm_head_at_int8(backbone):
    """int4 serves the decoder's linear layers in 4 bits and the LM head in int8 weights x int8 activations
    (experts.quant.HEAD_MODE)."""
    multi = MultiLoraModel(backbone.model, quant="int4")
    modes = {path: layer.quant.mode for path, layer in multi.layers.items()}
    assert modes.pop("lm_head") == "w8a8"
    assert set(modes.values()) == {"int4"}
    again = MultiLoraModel(backbone.model, quant="int4")  # a second model on the same weights reuses the copies
    assert again.layers["lm_head"].quant is multi.layers["lm_head"].quant


@NEEDS_LOW_BIT
def test_bf16_modes_read_the_low_bit_copy_at_every_width(backbone, monkeypatch):
    """int8/int4 beat fp32 at every width measured on CPUs with bf16 dot products: a prefill wider than
    PACKED_MAX_ROWS reads the copy too (within tolerance of fp32, not equal to it)."""
    monkeypatch.setattr(quant_module, "bf16_cpu", lambda: True)
    ids = torch.randint(0, backbone.model.config.vocab_size, (3, PACKED_MAX_ROWS))
    with torch.no_grad():
        reference = backbone.model(input_ids=ids).logits
    multi = MultiLoraModel(backbone.model, quant="int8")
    with torch.no_grad(), multi.routing([[], [], []]):
        wide = backbone.model(input_ids=ids).logits
    torch.testing.assert_close(wide, reference, rtol=0, atol=TOLERANCE["int8"])
    assert not torch.equal(wide, reference)


@NEEDS_LOW_BIT
@pytest.mark.parametrize("rows", [1, 5, 16, 33])
def test_int8_dynamic_linear_matches_fp32_and_weight_only_int8(rows):
    """The int4 mode's LM head (int8 weights x per-row int8 activations, torch._int_mm) at any width: within 2% of
    fp32's output range on a 49152-wide head shaped like SmolLM2's; the int8 weight-only kernel's error and its own
    are of one size (the activation rounding adds about as much as the weight rounding)."""
    torch.manual_seed(rows)
    linear = torch.nn.Linear(576, 4096, bias=True)
    x = torch.randn(rows, 576) * torch.linspace(0.2, 3.0, 576)  # uneven channels, as hidden states have
    with torch.no_grad():
        reference = linear(x)
        dynamic = Int8DynamicLinear(linear)(x)
        weight_only = Int8Linear(linear)(x)
    assert dynamic.dtype == torch.float32 and dynamic.shape == reference.shape
    scale = reference.abs().max()
    dynamic_error = (dynamic - reference).abs().max() / scale
    weight_only_error = (weight_only - reference).abs().max() / scale
    assert dynamic_error < 0.02  # measured 0.010-0.0125
    assert dynamic_error < 3 * weight_only_error  # measured 1.8-2.2x
    assert not torch.equal(dynamic, reference)



def test_router_copy_kernel_follows_the_cpu(monkeypatch):
    """bf16 through oneDNN on an AMX CPU (fbgemm's fp16 ran slower than fp32 there), else fbgemm's fp16."""
    from router import service

    monkeypatch.setattr(service, "amx_cpu", lambda: True)
    assert service.router_copy_kernel() == "bf16"
    monkeypatch.setattr(service, "amx_cpu", lambda: False)
    assert service.router_copy_kernel() == "fp16"
    monkeypatch.setattr(service, "fbgemm_available", lambda: False)
    assert service.router_copy_kernel() is None
