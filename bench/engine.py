"""Engine benchmark: decode throughput of a batch of 16 requests spread over 4 (and 32) LoRA experts in the
batched multi-LoRA engine, against the bare backbone and against peft's mixed `adapter_names` batch, all in
this run; memory per added expert.

    python -m bench.engine [--new-tokens 32] [--repeats 5]

Each variant has its own copy of the backbone: the baseline is an untouched model in the same engine (no
wrapped layers at all), so nothing the multi-LoRA layer changes can flatter it. Variants run interleaved,
once per repeat. Headline figures are each variant's best repeat (timeit's convention: on a shared machine
interference only ever slows a run); the medians of the per-repeat ratios are reported beside them.
Every run generates exactly --new-tokens per row (EOS ignored) so all variants do the same work.
Decode tokens/s excludes the prefill (engine counters; for peft, a 1-token run's time is subtracted);
end-to-end tokens/s includes it. Last line: one JSON object with tokens/s and ratios.
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

from core.device import release_openmp_pool
from core.settings import Settings
from experts.adapters import LoraWeights
from experts.backbone import Backbone, load_backbone
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


def chat_prompts(tokenizer, batch: int) -> list[list[int]]:
    """`batch` validation prompts, a quarter from each default domain, as chat-templated token ids."""
    texts = []
    for domain in ("medical", "finance", "legal", "support"):
        texts += seed_prompts(domain)[1][: batch // 4]
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"] for t in texts]


def run_engine(engine: GenerationEngine, prompts, mixtures, new_tokens: int) -> dict[str, float]:
    """One batch; returns decode and end-to-end tokens/s."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0)
    requests = [GenerationRequest(p, m, params) for p, m in zip(prompts, mixtures, strict=True)]
    before = dict(engine.stats)
    started = time.perf_counter()
    results = engine.generate_many(requests)
    elapsed = time.perf_counter() - started
    assert all(r.completion_tokens == new_tokens for r in results), [r.completion_tokens for r in results]
    decode_tokens = engine.stats["decode_tokens"] - before["decode_tokens"]
    decode_s = engine.stats["decode_s"] - before["decode_s"]
    return {"decode": decode_tokens / decode_s, "end_to_end": sum(r.completion_tokens for r in results) / elapsed,
            "prefill_s": engine.stats["prefill_s"] - before["prefill_s"]}


@torch.no_grad()
def run_peft_mixed(peft_model, tokenizer, prompts, names, new_tokens: int) -> dict[str, float]:
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")

    def timed(tokens: int) -> float:
        started = time.perf_counter()
        out = peft_model.generate(**batch, adapter_names=names, max_new_tokens=tokens, min_new_tokens=tokens,
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert out.shape[1] - batch["input_ids"].shape[1] == tokens
        return time.perf_counter() - started

    first = timed(1)  # prefill plus one token
    total = timed(new_tokens)
    rows = len(prompts)
    return {"decode": (new_tokens - 1) * rows / max(total - first, 1e-9), "end_to_end": new_tokens * rows / total}


def engine_on_copy(backbone: Backbone, settings: Settings, adapters: list[LoraWeights]) -> GenerationEngine:
    model = copy.deepcopy(backbone.model)
    engine = GenerationEngine(Backbone(model, backbone.tokenizer, backbone.name, backbone.fingerprint), settings)
    for weights in adapters:
        engine.add_adapter(weights)
    engine.eos_ids = set()  # every row generates exactly --new-tokens
    return engine.start()


def main() -> None:
    # long: a benchmark script, one measurement after another, read top to bottom
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    settings = Settings(max_batch_size=args.batch)
    backbone = load_backbone(settings)
    tok = backbone.tokenizer
    prompts = chat_prompts(tok, args.batch)
    adapters = [random_adapter(backbone.model, f"e{i}", 8, i) for i in range(32)]
    bare_engine = engine_on_copy(backbone, settings, [])
    four_engine = engine_on_copy(backbone, settings, adapters[:4])
    many_engine = engine_on_copy(backbone, settings, adapters)
    four = [w.name for w in adapters[:4]]
    bare = [[] for _ in prompts]
    mixed4 = [[(four[i % 4], 1.0)] for i in range(len(prompts))]
    mixed32 = [[(adapters[(i * 2) % 32].name, 1.0)] for i in range(len(prompts))]  # 16 rows, 16 distinct experts
    kernel_32 = many_engine.multi.kernel_for(mixed32)

    # peft's own mixed batch: four LoRA adapters, adapter_names per row (transformers generate).
    reference = copy.deepcopy(backbone.model)
    peft_model = get_peft_model(reference, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS), adapter_name="e0")
    for name in four[1:]:
        peft_model.add_adapter(name, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    assert isinstance(peft_model, PeftModel)
    peft_model.eval()
    names = [four[i % 4] for i in range(len(prompts))]

    release_openmp_pool()  # model copies and adapters were built on this thread; from here each variant's
    # thread holds the only OpenMP pool while it runs (see core.device.release_openmp_pool)
    for engine, mixtures in ((bare_engine, bare), (four_engine, mixed4), (many_engine, mixed32)):
        run_engine(engine, prompts, mixtures, 4)  # warm-up
    results: dict[str, list[dict[str, float]]] = {"bare": [], "multi_lora_4": [], "multi_lora_32": [],
                                                  "peft_mixed_4": []}
    for _ in range(args.repeats):
        results["bare"].append(run_engine(bare_engine, prompts, bare, args.new_tokens))
        results["multi_lora_4"].append(run_engine(four_engine, prompts, mixed4, args.new_tokens))
        results["multi_lora_32"].append(run_engine(many_engine, prompts, mixed32, args.new_tokens))
        results["peft_mixed_4"].append(run_peft_mixed(peft_model, tok, prompts, names, args.new_tokens))
        release_openmp_pool()  # the engines' threads must not share the cores with this thread's OpenMP pool
    for engine in (bare_engine, four_engine, many_engine):
        engine.stop()

    def best(name: str, kind: str) -> float:
        return max(r[kind] for r in results[name])

    def ratio(a: str, b: str, kind: str = "decode") -> float:
        return round(best(a, kind) / best(b, kind), 3)

    def paired(a: str, b: str, kind: str = "decode") -> float:
        return round(statistics.median(x[kind] / y[kind] for x, y in zip(results[a], results[b], strict=True)), 3)

    backbone_bytes = sum(p.numel() * p.element_size() for p in backbone.model.parameters())
    bytes_4 = four_engine.multi.adapter_bytes() // 4
    bytes_32 = many_engine.multi.adapter_bytes() // 32
    report = {
        "batch": len(prompts), "new_tokens": args.new_tokens, "repeats": args.repeats,
        "decode_tokens_per_s": {k: round(best(k, "decode"), 1) for k in results},
        "end_to_end_tokens_per_s": {k: round(best(k, "end_to_end"), 1) for k in results},
        "kernel_4": four_engine.multi.kernel_for(mixed4), "kernel_32": kernel_32,
        "bytes_per_expert": bytes_4,
        "compact_cache_bytes_32": many_engine.multi.compact_cache_bytes(),
        "ratios": {
            "multi4_vs_bare": ratio("multi_lora_4", "bare"),
            "multi4_vs_peft_mixed": ratio("multi_lora_4", "peft_mixed_4"),
            "multi32_vs_bare": ratio("multi_lora_32", "bare"),
            "end_to_end_multi4_vs_bare": ratio("multi_lora_4", "bare", "end_to_end"),
            "end_to_end_multi32_vs_bare": ratio("multi_lora_32", "bare", "end_to_end"),
            "end_to_end_multi4_vs_peft_mixed": ratio("multi_lora_4", "peft_mixed_4", "end_to_end"),
            "memory_per_expert_vs_backbone": round(bytes_32 / backbone_bytes, 4),
        },
        "paired_median_ratios": {
            "multi4_vs_bare": paired("multi_lora_4", "bare"),
            "multi4_vs_peft_mixed": paired("multi_lora_4", "peft_mixed_4"),
            "multi32_vs_bare": paired("multi_lora_32", "bare"),
        },
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
