"""Verb: route a JSONL file of texts (`moe route --input FILE.jsonl [--output FILE]`).

Reads lines with `text`; writes lines with `text`, `experts` (names, best first), `weights`, `confidence`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

from experts.data import load_texts
from router.service import RoutingService


def route_lines(routing: RoutingService, texts: list[str], top_k: int | None = None,
                batch_size: int = 64) -> Iterable[dict]:
    decisions = routing.route(texts, top_k=top_k, progress=len(texts) > batch_size, batch_size=batch_size)
    for text, decision in zip(texts, decisions, strict=True):
        yield {
            "text": text,
            "experts": [name for name, _ in decision.experts],
            "weights": [round(weight, 4) for _, weight in decision.experts],
            "confidence": round(decision.confidence, 4),
        }


def route_file(routing: RoutingService, input_path: Path, output_path: Path | None, top_k: int | None = None) -> int:
    texts = load_texts(input_path, field="text")  # validates every line before any work
    rows = route_lines(routing, texts, top_k)
    if output_path is None:
        for row in rows:
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        return len(texts)
    partial = output_path.with_name(output_path.name + ".partial")
    with partial.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    partial.replace(output_path)
    return len(texts)
