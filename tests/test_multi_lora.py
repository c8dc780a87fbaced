"""The batched multi-LoRA layer matches peft's per-adapter outputs, for top-1, top-2 and no-expert rows,
with both kernels."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from experts.adapters import load_lora_weights
from experts.multi_lora import MultiLoraModel

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _random_adapter(base, folder: Path, name: str, rank: int, seed: int) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
    )
    path = folder / name
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture
def adapters(backbone, tmp_path):
    return {
        "a": _random_adapter(backbone.model, tmp_path, "a", rank=4, seed=1),
        "b": _random_adapter(backbone.model, tmp_path, "b", rank=8, seed=2),
        "c": _random_adapter(backbone.model, tmp_path, "c", rank=4, seed=3),
    }


def _peft_logits(base, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir)
    with torch.no_grad():
        return model(input_ids=ids).logits


KERNELS = pytest.mark.parametrize(
    ("stacked_max_columns", "compact_max_columns", "kernel"),
    [(1024, 1024, "stacked"), (0, 1024, "compact"), (0, 0, "gathered")], ids=["stacked", "compact", "gathered"],
)


@KERNELS
def test_mixed_batch_matches_peft(backbone, adapters, stacked_max_columns, compact_max_columns, kernel):
    base = copy.deepcopy(backbone.model)
    ids = torch.randint(0, backbone.model.config.vocab_size, (4, 7))
    expected = {name: _peft_logits(base, path, ids) for name, path in adapters.items()}
    with torch.no_grad():
        bare = base(input_ids=ids).logits

    engine = MultiLoraModel(backbone.model, stacked_max_columns, compact_max_columns)
    for name, path in adapters.items():
        engine.add_adapter(load_lora_weights(path, name))
    mixtures = [[("a", 1.0)], [("b", 1.0)], [], [("c", 1.0)]]
    assert engine.kernel_for(mixtures) == kernel
    with torch.no_grad(), engine.routing(mixtures):
        out = backbone.model(input_ids=ids).logits
    torch.testing.assert_close(out[0], expected["a"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1], expected["b"][1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[2], bare[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[3], expected["c"][3], rtol=1e-4, atol=1e-4)
    # after the context, the model is the bare backbone again
    with torch.no_grad():
        torch.testing.assert_close(backbone.model(input_ids=ids).logits, bare, rtol=1e-5, atol=1e-5)


@KERNELS
def test_top2_mixture_is_weighted_sum_of_deltas(backbone, adapters, stacked_max_columns, compact_max_columns, kernel):
    """A top-2 row equals W x + 0.7 * delta_a + 0.3 * delta_b at every adapted layer; checked on a
    single adapted layer where the combination is exactly linear."""
    engine = MultiLoraModel(backbone.model, stacked_max_columns, compact_max_columns)
    weights = {name: load_lora_weights(path, name) for name, path in adapters.items()}
    for w in weights.values():
        engine.add_adapter(w)
    path = "model.layers.0.self_attn.q_proj"
    layer = engine.layers[path]
    x = torch.randn(2, 3, layer.in_features)

    def delta(name):
        a, b = weights[name].modules[path]
        return x @ a.t() @ b.t()

    with torch.no_grad(), engine.routing([[("a", 0.7), ("b", 0.3)], [("c", 1.0)]]):
        y = layer(x)
    base = layer.base(x)
    torch.testing.assert_close(y[0], (base + 0.7 * delta("a") + 0.3 * delta("b"))[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[1], (base + delta("c"))[1], rtol=1e-5, atol=1e-5)


def test_remove_and_replace_adapter(backbone, adapters):
    engine = MultiLoraModel(backbone.model)
    engine.add_adapter(load_lora_weights(adapters["a"], "a"))
    engine.add_adapter(load_lora_weights(adapters["b"], "b"))
    engine.remove_adapter("a")
    assert engine.adapter_names == ["b"]
    slot = engine.add_adapter(load_lora_weights(adapters["c"], "c"))
    assert slot == 0  # the freed slot is reused
    with pytest.raises(KeyError):
        engine.set_mixtures([[("a", 1.0)]])
    assert engine.adapter_bytes() > 0


def test_siblings_share_one_projection_and_bare_weights_survive(backbone, adapters):
    """q/k/v read one input: the group's A runs once per input tensor; a sibling called alone with another input
    still gets its own correct delta; removing every adapter leaves the base weights exactly as they were."""
    original = {n: p.detach().clone() for n, p in backbone.model.named_parameters()}
    engine = MultiLoraModel(backbone.model)
    weights = {name: load_lora_weights(path, name) for name, path in adapters.items()}
    for w in weights.values():
        engine.add_adapter(w)
    prefix = "model.layers.1.self_attn."
    q, k = engine.layers[prefix + "q_proj"], engine.layers[prefix + "k_proj"]
    assert q.group is k.group and len(q.group.members) == 3
    x, other = torch.randn(2, 3, q.in_features), torch.randn(2, 3, q.in_features)

    def expected(layer, path, inp, name):
        a, b = weights[name].modules[path]
        return layer.base(inp) + inp @ a.t() @ b.t()

    with torch.no_grad(), engine.routing([[("b", 1.0)], [("a", 1.0)]]):
        q_out = q(x)
        cached = q.group.cached(x)
        k_out = k(x)
        assert q.group.cached(x) is cached  # k reused q's projection of the same tensor
        k_other = k(other)  # a different input: computed afresh
    for out, layer, path, inp in ((q_out, q, prefix + "q_proj", x), (k_out, k, prefix + "k_proj", x),
                                  (k_other, k, prefix + "k_proj", other)):
        torch.testing.assert_close(out[0], expected(layer, path, inp, "b")[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1], expected(layer, path, inp, "a")[1], rtol=1e-5, atol=1e-5)
    for name in list(engine.adapter_names):
        engine.remove_adapter(name)
    for n, p in backbone.model.named_parameters():
        torch.testing.assert_close(p, original[n.replace(".base.", ".")], rtol=0, atol=0)


def test_compact_stacks_follow_the_batch_expert_set(backbone, adapters):
    """The compact kernel gathers the used slots once per expert set; a later pass with another set (rows
    joined or left) must gather again and still match peft, and the gathered stacks stay bounded."""
    base = copy.deepcopy(backbone.model)
    ids = torch.randint(0, backbone.model.config.vocab_size, (2, 5))
    expected = {name: _peft_logits(base, path, ids) for name, path in adapters.items()}
    engine = MultiLoraModel(backbone.model, stacked_max_columns=0, compact_max_columns=1024)
    for name, path in adapters.items():
        engine.add_adapter(load_lora_weights(path, name))
    per_slot = load_lora_weights(adapters["b"], "b").num_parameters * 4  # fp32, every slot padded to rank 8
    for first, second in (("a", "b"), ("c", "a"), ("b", "b")):
        mixtures = [[(first, 1.0)], [(second, 1.0)]]
        assert engine.kernel_for(mixtures) == "compact"
        with torch.no_grad(), engine.routing(mixtures):
            out = backbone.model(input_ids=ids).logits
        torch.testing.assert_close(out[0], expected[first][0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out[1], expected[second][1], rtol=1e-4, atol=1e-4)
        assert 0 < engine.compact_cache_bytes() <= len({first, second}) * per_slot
