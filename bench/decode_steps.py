"""Decode-step benchmark: what the multi-LoRA layer costs per decode step, with the variants interleaved
step by step instead of run by run.

    python -m bench.decode_steps [--steps 24] [--rounds 3] [--batch 16]

`bench.engine` runs each variant's whole batch in turn, so a neighbour's burst on this shared machine lands
on one variant and not the other; its ratios moved by 10-20 points between runs minutes apart
(docs/benchmarks.md). Here every
variant holds its own batch and KV cache, and the loop advances them one decode step each, in turn: a
burst spans all variants within ~0.5 s, and the median of the per-step ratios is stable to a point or two.
This measures the model forward of a decode step (the multi-LoRA layer and the KV cache, the engine's
`_forward` minus its bookkeeping), not sampling or the engine's threads.

Variants, each on its own copy of the backbone: `bare` (untouched, no wrapped layers), `multi_lora_4` (4
rank-8 experts on all seven projections, 4 rows each, stacked kernel), `multi_lora_32` (32 experts
registered, 16 rows over 16 distinct ones, compact kernel). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time

import torch

from bench.engine import chat_prompts, random_adapter
from core.device import release_openmp_pool
from core.settings import Settings
from experts.backbone import load_backbone
from experts.kv_cache import GrowingCache
from experts.multi_lora import Mixture, MultiLoraModel


class Variant:
    """One model copy with its adapters, its rows' mixtures, and the state of its current batch."""

    def __init__(self, model: torch.nn.Module, adapters, mixtures: list[Mixture]) -> None:
        self.model = model
        self.multi = MultiLoraModel(model)
        for weights in adapters:
            self.multi.add_adapter(weights)
        self.mixtures = mixtures
        self.seconds: list[float] = []

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with self.multi.routing(self.mixtures):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].argmax(dim=-1, keepdim=True)  # [B, 1] greedy next tokens

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.cache = GrowingCache()
        self.mask = mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.next_ids = self.forward(ids, mask, positions)
        self.positions = positions[:, -1:]

    def step(self) -> None:
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        self.positions = self.positions + 1
        started = time.perf_counter()
        self.next_ids = self.forward(self.next_ids, self.mask, self.positions)
        self.seconds.append(time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=24, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="fresh prefills, each followed by --steps steps")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    backbone = load_backbone(Settings())
    tok = backbone.tokenizer
    prompts = chat_prompts(tok, args.batch)
    length = max(map(len, prompts))
    ids = torch.full((len(prompts), length), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left-padded, as the engine batches them
        ids[row, length - len(prompt):] = torch.tensor(prompt)
        mask[row, length - len(prompt):] = 1

    adapters = [random_adapter(backbone.model, f"e{i}", 8, i) for i in range(32)]
    rows = range(len(prompts))
    variants = {
        "bare": Variant(copy.deepcopy(backbone.model), [], [[] for _ in rows]),
        "multi_lora_4": Variant(copy.deepcopy(backbone.model), adapters[:4], [[(f"e{i % 4}", 1.0)] for i in rows]),
        "multi_lora_32": Variant(copy.deepcopy(backbone.model), adapters,
                                 [[(f"e{(i * 2) % 32}", 1.0)] for i in rows]),  # 16 rows, 16 distinct experts
    }
    kernels = {name: v.multi.kernel_for(v.mixtures) for name, v in variants.items() if name != "bare"}
    release_openmp_pool()  # the copies were built on this thread; start the timed work with a fresh pool
    for _ in range(args.rounds):
        for variant in variants.values():
            variant.prefill(ids, mask)
        for _ in range(args.steps):
            for variant in variants.values():
                variant.step()
    bare = variants["bare"].seconds

    def paired(name: str) -> float:
        return round(statistics.median(b / x for b, x in zip(bare, variants[name].seconds, strict=True)), 3)

    report = {
        "batch": len(prompts), "steps": args.steps * args.rounds, "kernels": kernels,
        "median_step_ms": {k: round(statistics.median(v.seconds) * 1000, 1) for k, v in variants.items()},
        "paired_median_ratios": {"multi4_vs_bare": paired("multi_lora_4"), "multi32_vs_bare": paired("multi_lora_32")},
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
