"""The packaged seed data of the four default domains, with a fixed train/validation split.

The split is a pure function of the text (SHA-1 of the normalised text, one in five to validation), so it
never changes between runs or machines and needs no second copy of the files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from core.text import text_key
from experts.data import ChatExample, load_examples, load_texts

SEED_DIR = Path(__file__).with_name("seed_data")
DEFAULT_ADAPTERS_DIR = Path(__file__).with_name("default_adapters")
DEFAULT_ROUTER_DIR = DEFAULT_ADAPTERS_DIR / "router"
BASE_LABEL = "base"
GENERAL_DIR = "general"
"""Seed prompts that belong to no domain: the router's 'base' column learns from them."""

DEFAULT_DOMAINS: dict[str, str] = {
    "medical": "Health: symptoms, conditions, medications, test results, pregnancy, mental health, first aid.",
    "finance": "Money: personal finance, banking, credit, loans, investing, retirement, taxes, insurance products.",
    "legal": "Law and rights: contracts, tenancy, employment, family, estates, criminal, immigration, IP.",
    "support": "Customer support: orders, delivery, returns, refunds, accounts, billing, technical trouble.",
}


def split_digest(text: str) -> bytes:
    """SHA-1 of the normalised text (lower case, single spaces): the fixed key every split is drawn from."""
    return hashlib.sha1(text_key(text).encode("utf-8")).digest()


def is_validation(text: str) -> bool:
    return split_digest(text)[0] % 5 == 0


def split_examples(examples: list[ChatExample]) -> tuple[list[ChatExample], list[ChatExample]]:
    """Fixed split of user data; guarantees at least one validation example when there are two or more."""
    train = [e for e in examples if not is_validation(e.routing_text)]
    val = [e for e in examples if is_validation(e.routing_text)]
    if not val and len(train) >= 2:
        val = [train.pop()]
    return train, val


def split_texts(texts: list[str]) -> tuple[list[str], list[str]]:
    return [t for t in texts if not is_validation(t)], [t for t in texts if is_validation(t)]


REAL_QA = "real_qa.jsonl"
"""Real questions with answers by professionals or agents (corpora.build; sources in seed_data/SOURCES.md)."""
REAL_PROMPTS = "real_prompts.jsonl"
"""Real user requests of the domain, the questions of REAL_QA included."""


def seed_qa(domain: str, data: str | None = None) -> tuple[list[ChatExample], list[ChatExample]]:
    """An expert's training pairs from `data` (a file name in the domain's folder); by default the real ones
    where the domain has them, else the written ones. Written answers share one house style, and experts trained
    on them made real answers less likely than the bare backbone (docs/benchmarks.md, quality on real text)."""
    folder = SEED_DIR / domain
    name = data or (REAL_QA if (folder / REAL_QA).is_file() else "qa.jsonl")
    return split_examples(load_examples(folder / name))


def seed_prompts(domain: str) -> tuple[list[str], list[str]]:
    """Routing prompts of a domain (or of 'general' for the base column): the real requests, the written
    prompts.jsonl and, for expert domains, the written QA prompts, deduplicated."""
    texts = []
    for name in (REAL_PROMPTS, "prompts.jsonl"):
        if (SEED_DIR / domain / name).is_file():
            texts += load_texts(SEED_DIR / domain / name)
    qa = SEED_DIR / domain / "qa.jsonl"
    if qa.is_file():
        texts += [e.routing_text for e in load_examples(qa)]
    seen: set[str] = set()
    unique = []
    for text in texts:
        key = text_key(text)
        if key not in seen:
            seen.add(key)
            unique.append(text)
    return split_texts(unique)
