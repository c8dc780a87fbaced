"""Engine benchmark: generation throughput of a batch of 16 requests spread over 4 (and 32) LoRA experts in
the batched multi-LoRA engine, against the bare backbone in the same engine and against peft's mixed
`adapter_names` batch (transformers generate), all in this run; memory per added expert.

    python -m bench.engine [--new-tokens 32] [--repeats 3]

Every run generates exactly --new-tokens per row (EOS ignored) so all variants do the same work.
Last line: one JSON object with tokens/s and ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from core.settings import Settings
from experts.adapters import LoraWeights
from experts.backbone import load_backbone
from experts.engine import GenerationEngine, GenerationRequest, SamplingParams
from experts.seed import seed_prompts

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_adapter(model, name: str, rank: int, seed: int) -> LoraWeights:
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and path.rsplit(".", 1)[-1] in TARGETS:
            a = torch.randn(rank, module.in_features, generator=generator) * 0.01
            b = torch.randn(module.out_features, rank, generator=generator) * 0.01
            modules[path] = (a, b)
    return LoraWeights(name=name, rank=rank, modules=modules)


def run_engine(engine: GenerationEngine, prompts, mixtures, new_tokens: int) -> float:
    params = SamplingParams(max_tokens=new_tokens, temperature=0)
    requests = [GenerationRequest(p, m, params) for p, m in zip(prompts, mixtures, strict=True)]
    started = time.perf_counter()
    results = engine.generate_many(requests)
    elapsed = time.perf_counter() - started
    assert all(r.completion_tokens == new_tokens for r in results), [r.completion_tokens for r in results]
    return sum(r.completion_tokens for r in results) / elapsed


@torch.no_grad()
def run_peft_mixed(peft_model, tokenizer, prompts, names, new_tokens: int) -> float:
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    started = time.perf_counter()
    out = peft_model.generate(**batch, adapter_names=names, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=tokenizer.pad_token_id)
    elapsed = time.perf_counter() - started
    return (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = Settings(max_batch_size=args.batch)
    backbone = load_backbone(settings)
    tok = backbone.tokenizer
    texts = []
    for domain in ("medical", "finance", "legal", "support"):
        texts += seed_prompts(domain)[1][: args.batch // 4]
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for t in texts]
    reference = copy.deepcopy(backbone.model)  # untouched copy for peft

    engine = GenerationEngine(backbone, settings).start()
    engine.eos_ids = set()  # every row generates exactly --new-tokens
    bare = [[] for _ in prompts]
    four = [f"e{i}" for i in range(4)]
    for i, name in enumerate(four):
        engine.add_adapter(random_adapter(backbone.model, name, 8, i))
    adapter_bytes_4 = engine.multi.adapter_bytes()
    mixed4 = [[(four[i % 4], 1.0)] for i in range(len(prompts))]
    results: dict[str, list[float]] = {"bare": [], "multi_lora_4": [], "multi_lora_32": [], "peft_mixed_4": []}
    run_engine(engine, prompts, bare, 4)  # warm-up
    for _ in range(args.repeats):
        results["bare"].append(run_engine(engine, prompts, bare, args.new_tokens))
        results["multi_lora_4"].append(run_engine(engine, prompts, mixed4, args.new_tokens))
    thirty_two = [f"e{i}" for i in range(32)]
    for i, name in enumerate(thirty_two[4:], start=4):
        engine.add_adapter(random_adapter(backbone.model, name, 8, i))
    adapter_bytes_32 = engine.multi.adapter_bytes()
    mixed32 = [[(thirty_two[(i * 2) % 32], 1.0)] for i in range(len(prompts))]
    for _ in range(args.repeats):
        results["multi_lora_32"].append(run_engine(engine, prompts, mixed32, args.new_tokens))
    kernel_32 = "stacked" if engine.multi.use_stacked() else "gathered"
    engine.stop()

    # peft's own mixed batch: four LoRA adapters, adapter_names per row.
    peft_model = get_peft_model(reference, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS), adapter_name="e0")
    for name in four[1:]:
        peft_model.add_adapter(name, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    assert isinstance(peft_model, PeftModel)
    peft_model.eval()
    names = [four[i % 4] for i in range(len(prompts))]
    for _ in range(args.repeats):
        results["peft_mixed_4"].append(run_peft_mixed(peft_model, tok, prompts, names, args.new_tokens))

    backbone_bytes = sum(p.numel() * p.element_size() for p in backbone.model.parameters())
    median = {k: round(statistics.median(v), 1) for k, v in results.items()}
    report = {
        "batch": len(prompts), "new_tokens": args.new_tokens, "tokens_per_s": median,
        "kernel_4": "stacked", "kernel_32": kernel_32,
        "bytes_per_expert": adapter_bytes_4 // 4,
        "ratios": {
            "multi4_vs_bare": round(median["multi_lora_4"] / median["bare"], 3),
            "multi4_vs_peft_mixed": round(median["multi_lora_4"] / median["peft_mixed_4"], 3),
            "multi32_vs_bare": round(median["multi_lora_32"] / median["bare"], 3),
            "memory_per_expert_vs_backbone": round(adapter_bytes_32 / 32 / backbone_bytes, 4),
        },
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
