"""CPU anchor: the product's engine on the fp32 and on the low-bit backbone (MOE_BACKBONE_QUANT), bare and with the
4 shipped experts mixed, against llama.cpp on the shipped GGUF; and what the low-bit backbone costs in answer NLL.

    python -m bench.cpu_anchor [--quant fp16] [--new-tokens 64] [--batch 16] [--repeats 3] [--qa-pairs 40]

Engines, each on its own copy of the fp32 backbone: fp32 bare, fp32 with the 4 experts, quantized bare, quantized
with the 4 experts (batch rows spread over them, a single stream uses its prompt's domain expert). Every run
generates exactly --new-tokens greedy tokens (EOS ignored); decode tokens/s come from the engine's counters (prefill
excluded), and prefill seconds beside them. Single stream: one request at a time; batch: --batch requests at once.
The variants run interleaved, once per repeat: on a shared machine only ratios measured in the same run mean
anything. Headline figures are each variant's best repeat (interference only ever slows a run); medians of the
per-repeat ratios beside them.

llama.cpp: the same prompt token ids through llama-cpp-python on the shipped GGUF (Q4_1), with torch's thread
count, greedy, EOS masked, single stream only (its Python API decodes one sequence); skipped with a line when
`llama_cpp` is not importable.

Answer NLL: mean token NLL of real answers (bench/data/quality/qa.jsonl, --qa-pairs spread over its domains)
through the served pass (`MultiLoraModel.routing`), bare and with the answer's domain expert, fp32 vs quantized.

Last line: one JSON object; `ratios` holds the headline comparisons.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from bench.engine import chat_prompts, engine_on_copy, run_engine
from core.device import release_openmp_pool
from core.settings import Settings
from experts.adapters import LoraWeights, load_lora_weights
from experts.backbone import load_backbone, packaged_gguf_path
from experts.data import ChatExample, tokenize_example
from experts.engine import GenerationEngine
from experts.multi_lora import MultiLoraModel
from experts.seed import split_digest
from experts.training import batch_nll, collate

DEFAULT_ADAPTERS = Path(__file__).resolve().parent.parent / "experts" / "default_adapters"
QA_FILE = Path(__file__).resolve().parent / "data" / "quality" / "qa.jsonl"
DOMAINS = ("medical", "finance", "legal", "support")  # chat_prompts takes a quarter of the batch from each


def default_experts() -> list[LoraWeights]:
    return [load_lora_weights(DEFAULT_ADAPTERS / name, name) for name in DOMAINS]


def qa_pairs(count: int, domains: Sequence[str]) -> list[tuple[str, str, str]]:
    """(question, answer, domain): up to `count` pairs, spread evenly over the file's domains that have an expert,
    hash-chosen so every run scores the same ones."""
    by_domain: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    for line in QA_FILE.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("domain") in domains:
            by_domain[row["domain"]].append((row["question"], row["answer"], row["domain"]))
    for rows in by_domain.values():
        rows.sort(key=lambda r: split_digest(r[0]))
    chosen: list[tuple[str, str, str]] = []
    while len(chosen) < count and any(by_domain.values()):
        for rows in by_domain.values():
            if rows and len(chosen) < count:
                chosen.append(rows.pop(0))
    return chosen


@torch.no_grad()
def answer_nll(multi: MultiLoraModel, tokenizer, pairs: Sequence[tuple[str, str, str]], max_length: int = 384,
               batch_size: int = 4) -> dict[str, float]:
    """Token-weighted mean NLL of the answers through served passes that read the low-bit weights at every width
    (what a decode step reads; a served prefill reads fp32): bare, and with each answer's domain expert."""
    examples = []
    for question, answer, domain in pairs:
        chat = ChatExample(({"role": "user", "content": question}, {"role": "assistant", "content": answer}))
        example = tokenize_example(tokenizer, chat, max_length)
        if example is not None:
            examples.append((example, domain))
    sums, counts = defaultdict(float), defaultdict(int)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = collate([e for e, _ in chunk], tokenizer.pad_token_id, torch.device("cpu"))
        for way, mixtures in (("bare", [[] for _ in chunk]), ("expert", [[(d, 1.0)] for _, d in chunk])):
            with multi.routing(mixtures, low_bit_only=True):  # every position as a decode step reads the weights
                loss, count = batch_nll(multi.model, batch)
            sums[way] += float(loss)
            counts[way] += count
    return {way: round(sums[way] / max(counts[way], 1), 4) for way in sums}


def llama_cpp_single(prompts: Sequence[list[int]], new_tokens: int, threads: int) -> float | None:
    """Decode tokens/s of llama.cpp on the shipped GGUF, one prompt at a time; None when llama_cpp is missing."""
    try:
        import llama_cpp
    except ImportError:
        print("llama.cpp: skipped (llama_cpp is not importable; llama-cpp-python builds from source)", flush=True)
        return None
    llm = llama_cpp.Llama(model_path=str(packaged_gguf_path()), n_ctx=2048, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    eos = llm.token_eos()

    def mask_eos(_ids, scores):
        scores[eos] = -float("inf")
        return scores

    tokens, seconds = 0, 0.0
    for prompt in prompts:
        stream = llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True,
                              logits_processor=llama_cpp.LogitsProcessorList([mask_eos]))
        next(stream)  # prefill and the first token
        started, made = time.perf_counter(), 1
        for _token in stream:
            made += 1
            if made == new_tokens:
                break
        seconds += time.perf_counter() - started
        tokens += made - 1
    return tokens / seconds


def single_stream(engine: GenerationEngine, prompts: Sequence[list[int]], mixtures, new_tokens: int) -> dict:
    """One request at a time; decode tokens/s and prefill seconds over all of them."""
    before = dict(engine.stats)
    for prompt, mixture in zip(prompts, mixtures, strict=True):
        run_engine(engine, [prompt], [mixture], new_tokens)
    decode = (engine.stats["decode_tokens"] - before["decode_tokens"]) / (engine.stats["decode_s"] - before["decode_s"])
    return {"decode": decode, "prefill_s": engine.stats["prefill_s"] - before["prefill_s"]}


def measure(engines: dict[str, GenerationEngine], workloads: dict[str, tuple[Callable, tuple]],
            repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Run every (engine, workload) once per repeat, interleaved; decode tokens/s and prefill seconds per run."""
    results: dict[str, list[float]] = defaultdict(list)
    prefill: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats):
        for workload, (run, args) in workloads.items():
            for name, engine in engines.items():
                mixtures = args[1] if "mixed4" in name else [[] for _ in args[0]]
                out = run(engine, args[0], mixtures, *args[2:])
                results[f"{name}_{workload}"].append(out["decode"])
                prefill[f"{name}_{workload}"].append(out["prefill_s"])
                release_openmp_pool()
    return results, prefill


def build_engines(settings: Settings, quant: str, batch: int) -> tuple[dict[str, GenerationEngine], object]:
    backbone = load_backbone(settings)
    experts = default_experts()
    engines = {}
    for label, mode in (("fp32", "none"), ("quant", quant)):
        local = settings.model_copy(update={"backbone_quant": mode, "max_batch_size": batch})
        engines[f"{label}_bare"] = engine_on_copy(backbone, local, [])
        engines[f"{label}_mixed4"] = engine_on_copy(backbone, local, experts)
    release_openmp_pool()  # copies and packing ran on this thread; the engine threads own the cores from here
    return engines, backbone


def report(results: dict[str, list[float]], prefill: dict[str, list[float]], nll: dict, engines: dict, backbone,
           args, llama: float | None) -> dict:
    best = {k: round(max(v), 1) for k, v in results.items()}
    prefill_best = {k: round(min(v), 3) for k, v in prefill.items()}

    def ratio(a: str, b: str) -> float:
        return round(best[a] / best[b], 3)

    def paired(a: str, b: str) -> float:
        return round(statistics.median(x / y for x, y in zip(results[a], results[b], strict=True)), 3)

    pairs = {"quant_vs_fp32_single": ("quant_bare_single", "fp32_bare_single"),
             "quant_vs_fp32_batch": ("quant_bare_batch", "fp32_bare_batch"),
             "mixed4_vs_quant_bare_batch": ("quant_mixed4_batch", "quant_bare_batch"),
             "mixed4_vs_quant_bare_single": ("quant_mixed4_single", "quant_bare_single"),
             "fp32_mixed4_vs_fp32_bare_batch": ("fp32_mixed4_batch", "fp32_bare_batch")}
    ratios = {name: ratio(*pair) for name, pair in pairs.items()}
    for workload in ("single", "batch"):  # prefill speed, quantized engine vs fp32 (wide passes read fp32)
        ratios[f"quant_vs_fp32_prefill_{workload}"] = round(
            prefill_best[f"fp32_bare_{workload}"] / max(1e-9, prefill_best[f"quant_bare_{workload}"]), 3)
    ratios["quant_single_vs_llama_cpp"] = None if llama is None else round(best["quant_bare_single"] / llama, 3)
    if nll:
        for way in ("bare", "expert"):
            ratios[f"nll_quant_vs_fp32_{way}"] = round(nll["quant"][way] / nll["fp32"][way], 4)
    per_expert = {k: engines[f"{k}_mixed4"].multi.adapter_bytes() // len(DOMAINS) for k in ("fp32", "quant")}
    ratios["bytes_per_expert_quant_vs_fp32"] = round(per_expert["quant"] / per_expert["fp32"], 4)
    return {
        "quant": args.quant, "threads": torch.get_num_threads(), "batch": args.batch, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "decode_tokens_per_s": best | {"llama_cpp_single": llama and round(llama, 1)},
        "prefill_s": prefill_best,
        "nll": nll, "bytes_per_expert": per_expert,
        "backbone_bytes_fp32": sum(p.numel() * p.element_size() for p in backbone.model.parameters()),
        "quantized_linear_bytes": engines["quant_bare"].multi.quantized_bytes(),
        "wide_copy_bytes": engines["quant_bare"].multi.wide_bytes(),  # AMX CPUs only (experts.quant.WIDE_MODE)
        "ratios": ratios, "paired_median_ratios": {name: paired(*pair) for name, pair in pairs.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quant", default="fp16", choices=["fp16", "int8", "int4"], help="the low-bit mode to compare")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--single-prompts", type=int, default=2, help="prompts run one at a time per repeat")
    parser.add_argument("--qa-pairs", type=int, default=40, help="answers scored for the NLL; 0 skips it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    engines, backbone = build_engines(Settings(), args.quant, args.batch)
    prompts = chat_prompts(backbone.tokenizer, args.batch)
    mixed = [[(DOMAINS[i * len(DOMAINS) // len(prompts)], 1.0)] for i in range(len(prompts))]
    singles = list(range(0, len(prompts), max(1, len(prompts) // args.single_prompts)))[: args.single_prompts]
    workloads = {"single": (single_stream, ([prompts[i] for i in singles], [mixed[i] for i in singles],
                                            args.new_tokens)),
                 "batch": (run_engine, (prompts, mixed, args.new_tokens))}
    try:  # a failed run must not leave the engine threads holding the process
        for engine in engines.values():
            run_engine(engine, prompts[:2], [[], []], 4)  # warm-up
        results, prefill = measure(engines, workloads, args.repeats)
    finally:
        for engine in engines.values():
            engine.stop()
    nll = {}
    if args.qa_pairs:
        pairs = qa_pairs(args.qa_pairs, DOMAINS)
        nll = {label: answer_nll(engines[f"{label}_mixed4"].multi, backbone.tokenizer, pairs)
               for label in ("fp32", "quant")}
        nll["pairs"] = len(pairs)
    llama = llama_cpp_single([prompts[i] for i in singles], args.new_tokens, torch.get_num_threads())
    print(json.dumps(report(results, prefill, nll, engines, backbone, args, llama)))


if __name__ == "__main__":
    main()
