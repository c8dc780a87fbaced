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


@pytest.mark.parametrize("stacked_max_columns", [1024, 0], ids=["stacked", "gathered"])
def test_mixed_batch_matches_peft(backbone, adapters, stacked_max_columns):
    base = copy.deepcopy(backbone.model)
    ids = torch.randint(0, backbone.model.config.vocab_size, (4, 7))
    expected = {name: _peft_logits(base, path, ids) for name, path in adapters.items()}
    with torch.no_grad():
        bare = base(input_ids=ids).logits

    engine = MultiLoraModel(backbone.model, stacked_max_columns=stacked_max_columns)
    for name, path in adapters.items():
        engine.add_adapter(load_lora_weights(path, name))
    assert engine.use_stacked() == (stacked_max_columns > 0)
    mixtures = [[("a", 1.0)], [("b", 1.0)], [], [("c", 1.0)]]
    with torch.no_grad(), engine.routing(mixtures):
        out = backbone.model(input_ids=ids).logits
    torch.testing.assert_close(out[0], expected["a"][0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1], expected["b"][1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[2], bare[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[3], expected["c"][3], rtol=1e-4, atol=1e-4)
    # after the context, the model is the bare backbone again
    with torch.no_grad():
        torch.testing.assert_close(backbone.model(input_ids=ids).logits, bare, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stacked_max_columns", [1024, 0], ids=["stacked", "gathered"])
def test_top2_mixture_is_weighted_sum_of_deltas(backbone, adapters, stacked_max_columns):
    """A top-2 row equals W x + 0.7 * delta_a + 0.3 * delta_b at every adapted layer; checked on a
    single adapted layer where the combination is exactly linear."""
    engine = MultiLoraModel(backbone.model, stacked_max_columns=stacked_max_columns)
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
