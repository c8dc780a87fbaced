"""The models one size is measured on: a Llama backbone from its config with random weights, 32 random LoRA
experts, and the copies each variant runs on (bare, 4 and 32 experts in the multi-LoRA layer, peft)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from experts.multi_lora import Mixture, MultiLoraModel

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, EXPERTS = 8, 32
A_STD, B_STD = 0.02, 0.1
"""Random LoRA scale: the update B A x is ~30% of W x per layer (init std 0.02), so the experts change the
logits far beyond bf16 rounding and the correctness check can tell a wrong layer from a right one."""
LLAMA_COMMON = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "rms_norm_eps": 1e-5,
                "max_position_embeddings": 8192, "attn_implementation": "sdpa"}
CONFIGS: dict[str, dict] = {
    "135m": {**LLAMA_COMMON, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
             "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
             "rope_theta": 100000.0},  # SmolLM2-135M
    "1b": {**LLAMA_COMMON, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True,
           "rope_theta": 500000.0},  # Llama-3.2-1B shape (1.24B parameters), default rope
    "tiny": {**LLAMA_COMMON, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": True},
}
MIX: Mixture = (("e2", 0.7), ("e3", 0.3))
"""The top-2 mixture the correctness check routes a row to; peft holds it as one adapter, "mix"."""

@dataclasses.dataclass
class RandomLora:
    """Duck type of experts.adapters.LoraWeights (that module pulls pydantic settings in)."""

    name: str
    rank: int
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]  # path -> (A [r, in], B [out, r], scaling folded in)


@dataclasses.dataclass
class Models:
    """One size's model copies: bare, 4 and 32 experts in the multi-LoRA layer, peft with the same 4."""

    bare: MultiLoraModel
    multi4: MultiLoraModel
    multi32: MultiLoraModel
    peft: PeftModel
    vocab: int


def build_backbone(size: str, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """Random weights from the config, initialised on the device itself (1B on a CPU first would take long)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**CONFIGS[size]))
    return model.to(dtype).eval().requires_grad_(False)


def random_adapters(model: torch.nn.Module, count: int) -> list[RandomLora]:
    """`count` rank-8 experts on every target projection, drawn on the model's device in its dtype."""
    ref = next(model.parameters())
    generator = torch.Generator(device=ref.device).manual_seed(1)
    adapters = []
    for index in range(count):
        modules = {}
        for path, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and path.rsplit(".", 1)[-1] in TARGETS:
                draw = {"generator": generator, "device": ref.device, "dtype": ref.dtype}
                modules[path] = (torch.randn(RANK, module.in_features, **draw) * A_STD,
                                 torch.randn(module.out_features, RANK, **draw) * B_STD)
        adapters.append(RandomLora(f"e{index}", RANK, modules))
    return adapters


def peft_with(model: torch.nn.Module, adapters: Sequence[RandomLora], dtype: torch.dtype) -> PeftModel:
    """peft on `model` holding the given experts, plus MIX as one adapter "mix" of rank k*r:
    B_cat (A_cat x) = sum_i B_i (g_i A_i x), A_cat = [g_1 A_1; ...] ([k*r, in]), B_cat = [B_1, ...] ([out, k*r]).
    lora_alpha = r makes peft's scaling 1: ours has the scaling folded into B already."""
    def config(rank: int) -> LoraConfig:
        return LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(TARGETS))

    wrapped = get_peft_model(model, config(RANK), adapter_name=adapters[0].name)
    for weights in adapters[1:]:
        wrapped.add_adapter(weights.name, config(RANK))
    wrapped.add_adapter("mix", config(len(MIX) * RANK))
    by_name = {w.name: w for w in adapters}
    inner = wrapped.base_model.model
    with torch.no_grad():
        for path in adapters[0].modules:
            layer = inner.get_submodule(path)
            for weights in adapters:
                a, b = weights.modules[path]
                layer.lora_A[weights.name].weight.copy_(a)
                layer.lora_B[weights.name].weight.copy_(b)
            layer.lora_A["mix"].weight.copy_(torch.cat([g * by_name[n].modules[path][0] for n, g in MIX]))
            layer.lora_B["mix"].weight.copy_(torch.cat([by_name[n].modules[path][1] for n, _ in MIX], dim=1))
    # peft keeps bf16 adapters in fp32 by default; the same dtype as ours makes the race and the check fair
    return wrapped.to(dtype).eval()


def build_models(size: str, device: torch.device, dtype: torch.dtype) -> Models:
    base = build_backbone(size, device, dtype)
    adapters = random_adapters(base, EXPERTS)
    multi4, multi32 = MultiLoraModel(copy.deepcopy(base)), MultiLoraModel(copy.deepcopy(base))
    for weights in adapters:
        if len(multi4.adapter_names) < 4:
            multi4.add_adapter(weights)
        multi32.add_adapter(weights)
    reference = peft_with(copy.deepcopy(base), adapters[:4], dtype)
    return Models(MultiLoraModel(base), multi4, multi32, reference, base.config.vocab_size)


