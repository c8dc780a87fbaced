"""Timing: decode steps of the variants interleaved step by step (bench.decode_steps' approach, with CUDA
synchronisation), the continuous-batching engine's decode tokens/s, and the global time guard."""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch
from peft import PeftModel
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from bench.gpu_check.models import EXPERTS, LLAMA_COMMON, Models
from experts.engine import GenerationEngine, GenerationRequest, SamplingParams
from experts.engine.batch import left_padded
from experts.kv_cache import GrowingCache
from experts.multi_lora import MultiLoraModel


@dataclasses.dataclass
class EngineSettings:
    """The three settings the engine's scheduler reads (core.settings needs pydantic-settings)."""

    max_batch_size: int
    max_queue: int = 4096
    batch_wait_ms: int = 20


@dataclasses.dataclass
class InjectedBackbone:
    """What GenerationEngine reads of experts.backbone.Backbone: the model, a tokenizer, the device."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerFast

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


class Clock:
    """The global time guard: a measurement starts only while the longest one so far still fits."""

    def __init__(self, budget_s: float) -> None:
        self.started = time.perf_counter()
        self.budget_s = budget_s
        self.longest = 0.0
        self.skipped: list[str] = []
        self.truncated: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def over(self) -> bool:
        return self.elapsed() > self.budget_s

    def allows(self, label: str) -> bool:
        if self.elapsed() + self.longest <= self.budget_s:
            return True
        self.skipped.append(label)
        print(f"time guard: skipping {label} ({self.elapsed():.0f} s of {self.budget_s:.0f} s used)", flush=True)
        return False

    def done(self, started: float) -> None:
        self.longest = max(self.longest, time.perf_counter() - started)


def sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels are asynchronous: time only what has finished
        torch.cuda.synchronize(device)


class Variant:
    """One model copy in the decode race with its rows' routing, its batch state and its step timings."""

    def __init__(self, multi: MultiLoraModel | PeftModel, routes: list) -> None:
        self.multi, self.routes = multi, routes  # mixtures for ours, adapter names for peft
        self.seconds: list[float] = []

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                  "past_key_values": self.cache, "use_cache": True, "logits_to_keep": 1}
        if isinstance(self.multi, PeftModel):
            out = self.multi(**kwargs, adapter_names=self.routes)
        else:
            with self.multi.routing(self.routes):
                out = self.multi.model(**kwargs)
        return out.logits[:, -1, :].argmax(dim=-1, keepdim=True)  # [B, 1] greedy next tokens

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> None:
        self.cache, self.mask = GrowingCache(), mask
        self.next_ids = self.forward(ids, mask, positions)
        self.positions = positions[:, -1:]

    def step(self, device: torch.device) -> None:
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)  # [B, L+1]
        self.positions = self.positions + 1
        sync(device)
        started = time.perf_counter()
        self.next_ids = self.forward(self.next_ids, self.mask, self.positions)
        sync(device)
        self.seconds.append(time.perf_counter() - started)


def random_prompts(batch: int, vocab: int) -> list[list[int]]:
    """Prompts of 32..95 random tokens, like chat-templated requests; seeded, the same for every variant."""
    generator = torch.Generator().manual_seed(batch)
    lengths = torch.randint(32, 96, (batch,), generator=generator).tolist()
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


def paired(slow: list[float], fast: list[float]) -> float:
    """Median over steps of slow_seconds / fast_seconds: the throughput of `fast` over `slow`."""
    return round(statistics.median(s / f for s, f in zip(slow, fast, strict=True)), 3)


def measure_decode(m: Models, batch: int, steps: int, rounds: int, device: torch.device, clock: Clock) -> dict:
    """`rounds` of a fresh prefill then `steps` decode steps, each step advancing every variant in turn: a slow
    spell of the machine lands on all of them. Row i uses expert i % 4 (multi4, peft4) or i % 32 (multi32)."""
    rows = range(batch)
    four, many = [[(f"e{i % 4}", 1.0)] for i in rows], [[(f"e{i % EXPERTS}", 1.0)] for i in rows]
    variants = {"bare": Variant(m.bare, [[] for _ in rows]), "multi4": Variant(m.multi4, four),
                "multi32": Variant(m.multi32, many), "peft4": Variant(m.peft, [f"e{i % 4}" for i in rows])}
    prompts = left_padded(random_prompts(batch, m.vocab), LLAMA_COMMON["pad_token_id"])
    ids, mask, positions = (t.to(device) for t in prompts)  # [B, L] each, left-padded as the engine batches
    for round_index in range(rounds + 1):  # round 0 warms up (cuBLAS handles, allocator) and is not kept
        if round_index > 1 and clock.over():
            clock.truncated.append(f"decode/b{batch}: {round_index - 1} of {rounds} rounds")
            break
        for variant in variants.values():
            variant.prefill(ids, mask, positions)
        for _ in range(steps if round_index else 2):
            for variant in variants.values():
                variant.step(device)
        if not round_index:
            for variant in variants.values():
                variant.seconds.clear()
    s = {name: v.seconds for name, v in variants.items()}
    for variant in variants.values():
        variant.cache = None  # free the KV cache before the engine runs
    return {"median_step_ms": {k: round(statistics.median(v) * 1000, 2) for k, v in s.items()},
            "steps_timed": len(s["bare"]),
            "distinct_experts": {"multi4": min(batch, 4), "multi32": min(batch, EXPERTS)},
            "kernels": {"multi4": str(m.multi4.kernel_for(four)), "multi32": str(m.multi32.kernel_for(many))},
            "ratios": {"multi4_vs_bare": paired(s["bare"], s["multi4"]),
                       "multi32_vs_bare": paired(s["bare"], s["multi32"]),
                       "multi4_vs_peft4": paired(s["peft4"], s["multi4"])}}


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A real fast tokenizer over the whole vocabulary (ids -> "t<id>"), so the engine pays its usual
    detokenisation per row and step; no tokenizer files exist on the GPU machine."""
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=words, eos_token="t2", pad_token="t2")


def engine_tokens_per_s(engine: GenerationEngine, prompts: list[list[int]], mixtures: list, tokens: int) -> float:
    """One batch through the engine; decode tokens/s from its counters (prefill excluded)."""
    before = dict(engine.stats)
    params = SamplingParams(max_tokens=tokens, temperature=0)
    engine.generate_many([GenerationRequest(p, mix, params) for p, mix in zip(prompts, mixtures, strict=True)])
    # The engine adds a step to its counters after the step's events went out: wait for the last one. Each row
    # gets its first token from the prefill and the other tokens - 1 from decode steps.
    expected, deadline = before["decode_tokens"] + len(prompts) * (tokens - 1), time.perf_counter() + 10
    while engine.stats["decode_tokens"] < expected and time.perf_counter() < deadline:
        time.sleep(0.001)
    return (engine.stats["decode_tokens"] - before["decode_tokens"]) / (engine.stats["decode_s"] - before["decode_s"])


def measure_engine(m: Models, batch: int, steps: int, rounds: int) -> dict:
    """Each engine runs on a variant's model copy and MultiLoraModel; the engines take turns, best of rounds
    (timeit's convention: interference only ever slows a run). The sampler's .tolist() syncs each step."""
    tokens = max(steps, 2)  # the first token comes from the prefill: at least one decode step to time
    tokenizer = word_tokenizer(m.vocab)
    rows = range(batch)
    setups = {"bare": (m.bare, [[] for _ in rows]), "multi4": (m.multi4, [[(f"e{i % 4}", 1.0)] for i in rows]),
              "multi32": (m.multi32, [[(f"e{i % EXPERTS}", 1.0)] for i in rows])}
    prompts = random_prompts(batch, m.vocab)
    engines = {}
    for name, (multi, _) in setups.items():
        engine = GenerationEngine(InjectedBackbone(multi.model, tokenizer), EngineSettings(batch), multi=multi)
        engine.eos_ids = set()  # every row decodes exactly `tokens` tokens: the same work for every variant
        engines[name] = engine.start()
    try:
        for name, engine in engines.items():
            engine_tokens_per_s(engine, prompts, setups[name][1], 2)  # warm-up
        runs: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(rounds):  # interleaved, so a slow spell of the machine lands on every variant
            for name, engine in engines.items():
                runs[name].append(engine_tokens_per_s(engine, prompts, setups[name][1], tokens))
        best = {name: max(values) for name, values in runs.items()}
    finally:
        for engine in engines.values():
            engine.stop()
    return {"decode_tokens_per_s": {k: round(v, 1) for k, v in best.items()},
            "ratios": {"multi4_vs_bare": round(best["multi4"] / best["bare"], 3),
                       "multi32_vs_bare": round(best["multi32"] / best["bare"], 3)}}


