"""Verb: `moe eval qa --input FILE.jsonl [--json]`.

For each line (`question`, `answer`, optional `domain`) it scores the mean token NLL of the answer given the
chat-templated question three ways in one batched forward pass through the multi-LoRA layer: the routed
mixture, the bare backbone, and the expert named by `domain`. Figures are token-weighted means (nats/token)
per domain and overall.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from core.errors import DataFormatError
from experts.data import ChatExample, tokenize_example
from experts.multi_lora import Mixture, MultiLoraModel
from experts.training import collate
from router.service import RoutingService

WAYS = ("routed", "base", "expert")


@dataclass
class QAItem:
    question: str
    answer: str
    domain: str | None


def load_qa(path: Path) -> list[QAItem]:
    if not path.is_file():
        raise DataFormatError(f"Input file {path} does not exist.")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{path.name} line {number}: not valid JSON ({exc.msg}).") from exc
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row[k].strip()
                                                for k in ("question", "answer")):
            raise DataFormatError(f"{path.name} line {number}: needs non-empty 'question' and 'answer'.")
        domain = row.get("domain")
        if domain is not None and not isinstance(domain, str):
            raise DataFormatError(f"{path.name} line {number}: 'domain' must be a string.")
        items.append(QAItem(row["question"], row["answer"], domain))
    if not items:
        raise DataFormatError(f"{path.name} has no lines.")
    return items


@torch.no_grad()
def _nll_per_row(model, tokenizer, multi: MultiLoraModel, examples, mixtures: Sequence[Mixture]):
    batch = collate(examples, tokenizer.pad_token_id, next(model.parameters()).device)
    with multi.routing(mixtures):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    labels = batch.labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
    )  # [B, L-1]
    counts = (labels != -100).sum(-1)
    return losses.sum(-1).tolist(), counts.tolist()


def evaluate_qa(items: list[QAItem], routing: RoutingService, multi: MultiLoraModel, tokenizer,
                max_length: int = 512, batch_size: int = 4) -> dict:
    decisions = routing.route([i.question for i in items])
    loaded = set(multi.adapter_names)
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    lines: dict[str, int] = defaultdict(int)
    for start in tqdm(range(0, len(items), batch_size), desc="eval qa", unit="batch"):
        chunk = items[start : start + batch_size]
        examples, mixtures, keys = [], [], []
        for item, decision in zip(chunk, decisions[start : start + batch_size], strict=True):
            example = tokenize_example(tokenizer, ChatExample(({"role": "user", "content": item.question},
                                                              {"role": "assistant", "content": item.answer})),
                                       max_length)
            if example is None:
                continue
            domain = item.domain or "(none)"
            lines[domain] += 1
            ways = {"routed": decision.mixture, "base": []}
            if item.domain in loaded:
                ways["expert"] = [(item.domain, 1.0)]
            for way, mixture in ways.items():
                examples.append(example)
                mixtures.append(mixture)
                keys.append((domain, way))
        if not examples:
            continue
        loss_sums, token_counts = _nll_per_row(multi.model, tokenizer, multi, examples, mixtures)
        for (domain, way), loss, n in zip(keys, loss_sums, token_counts, strict=True):
            for group in (domain, "overall"):
                sums[group][way] += loss
                counts[group][way] += n

    def summary(group: str, n: int) -> dict:
        out = {way: (sums[group][way] / counts[group][way] if counts[group][way] else None) for way in WAYS}
        return {**{k: (round(v, 4) if v is not None and math.isfinite(v) else None) for k, v in out.items()}, "n": n}

    return {"domains": {d: summary(d, n) for d, n in sorted(lines.items())},
            "overall": summary("overall", sum(lines.values()))}


def format_table(result: dict) -> str:
    def cell(value):
        return f"{value:8.3f}" if value is not None else "       -"

    rows = [f"{'domain':<14}{'n':>5} {'routed':>8} {'base':>8} {'expert':>8}"]
    for name, stats in [*result["domains"].items(), ("overall", result["overall"])]:
        rows.append(f"{name:<14}{stats['n']:>5} {cell(stats['routed'])} {cell(stats['base'])} {cell(stats['expert'])}")
    return "\n".join(rows)
