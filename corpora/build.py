"""Verb: rebuild the real-text data from local repository snapshots.

    python -m corpora.build --mirror /work/.mirror            # every domain
    python -m corpora.build --mirror /work/.mirror --only legal

Writes, per domain, `experts/seed_data/<domain>/real_prompts.jsonl` (`{"text", "source"}`) and, for QA
sources, `real_qa.jsonl` (`{"prompt", "response", "source"}`); the dev sets `bench/data/quality/routing.jsonl`
(`{"text", "domain", "source"}`) and `bench/data/quality/qa.jsonl` (`{"question", "answer", "domain",
"source"}`); and `experts/seed_data/SOURCES.md`, the table of every source, revision and license.
Near-duplicates are dropped within the build, and dev items that come near any training text are dropped
too, so the dev figures are on text the product never saw.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from corpora.base import Record, Source, clean_record, normalise, read_files

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
SEED_DIR = ROOT / "experts" / "seed_data"
DEV_DIR = ROOT / "bench" / "data" / "quality"
DOMAIN_MODULES = ("medical", "finance", "legal", "support", "general")

RESERVED = ("medquad", "mediqa", "liveqa", "fiqa", "finbert", "legalbench", "avvo", "banking77", "twcs",
            "customer-support-on-twitter")
"""Held back for independent evaluation: a source whose repository or name mentions one of these is refused."""


@dataclass
class Built:
    source: Source
    records: list[Record]


def load_sources(only: Sequence[str] = ()) -> list[Source]:
    sources: list[Source] = []
    for name in only or DOMAIN_MODULES:
        module = importlib.import_module(f"corpora.{name}")
        sources.extend(module.SOURCES)
    names = Counter(s.name for s in sources)
    if duplicated := [n for n, c in names.items() if c > 1]:
        raise ValueError(f"source names must be unique: {duplicated}")
    for source in sources:
        haystack = f"{source.repo} {source.name}".lower()
        if any(word in haystack for word in RESERVED):
            raise ValueError(f"{source.name} ({source.repo}) is reserved for independent evaluation")
    return sources


def _sample_key(source: Source, record: Record) -> str:
    return hashlib.sha1(f"{source.name}\0{record.text}".encode()).hexdigest()


def build_source(source: Source, files: dict[str, bytes], seen: set[str]) -> Built:
    """Parse, clean, drop near-duplicates (against `seen`, which grows), sample down to `limit`."""
    kept: list[Record] = []
    for raw in source.parse(files):
        record = clean_record(raw, source.kind)
        if record is None:
            continue
        key = normalise(record.text)
        if key in seen:
            continue
        seen.add(key)
        kept.append(record)
    if source.limit is not None and len(kept) > source.limit:
        kept = sorted(kept, key=lambda r: _sample_key(source, r))[: source.limit]
    return Built(source, kept)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _shingles(text: str, n: int = 5) -> set[str]:
    words = normalise(text).split()
    return {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def drop_dev_overlap(dev: list[Built], train_texts: list[str], threshold: float = 0.5) -> int:
    """Remove dev records whose 5-word shingles overlap a training text's by more than `threshold`
    (containment), so a dev figure never scores text the product trained on."""
    index: dict[str, set[int]] = defaultdict(set)
    train_shingles = [_shingles(t) for t in train_texts]
    for i, shingles in enumerate(train_shingles):
        for s in shingles:
            index[s].add(i)
    dropped = 0
    for built in dev:
        keep = []
        for record in built.records:
            mine = _shingles(record.text)
            hits = Counter(i for s in mine for i in index.get(s, ()))
            if hits and max(hits.values()) / len(mine) > threshold:
                dropped += 1
                continue
            keep.append(record)
        built.records = keep
    return dropped


def write_outputs(built: list[Built], seed_dir: Path, dev_dir: Path, domains: Sequence[str]) -> dict:
    """Write every output file of the domains built; returns counts per file."""
    counts: dict[str, int] = {}
    for domain in domains:
        mine = [b for b in built if b.source.domain == domain and b.source.role == "train"]
        prompts = [{"text": r.text, "source": b.source.name} for b in mine for r in b.records]
        qa = [{"prompt": r.text, "response": r.answer, "source": b.source.name}
              for b in mine if b.source.kind == "qa" for r in b.records]
        _write_jsonl(seed_dir / domain / "real_prompts.jsonl", prompts)
        counts[f"{domain}/real_prompts.jsonl"] = len(prompts)
        if qa:
            _write_jsonl(seed_dir / domain / "real_qa.jsonl", qa)
            counts[f"{domain}/real_qa.jsonl"] = len(qa)
    dev = [b for b in built if b.source.role == "dev"]
    routing = [{"text": r.text, "domain": b.source.domain, "source": b.source.name} for b in dev for r in b.records]
    qa_dev = [{"question": r.text, "answer": r.answer, "domain": b.source.domain, "source": b.source.name}
              for b in dev if b.source.kind == "qa" for r in b.records]
    _write_jsonl(dev_dir / "routing.jsonl", routing)
    _write_jsonl(dev_dir / "qa.jsonl", qa_dev)
    counts["quality/routing.jsonl"], counts["quality/qa.jsonl"] = len(routing), len(qa_dev)
    return counts


def sources_table(built: list[Built]) -> str:
    lines = ["# Sources of the real-text data", "",
             "Made by `python -m corpora.build`; every record's `source` field names its row here.", "",
             "| source | domain | role | kind | records | repository @ revision | files | license | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for b in built:
        s = b.source
        files = ", ".join(f"`{p}`" for p in s.paths[:3]) + (f" and {len(s.paths) - 3} more" if len(s.paths) > 3 else "")
        lines.append(f"| {s.name} | {s.domain} | {s.role} | {s.kind} | {len(b.records)} | "
                     f"[{s.repo}]({s.page}) @ `{s.commit[:12]}` | {files} | "
                     f"{s.license} | {s.note} |")
    return "\n".join(lines) + "\n"


def build(mirror: Path, only: Sequence[str] = (), seed_dir: Path = SEED_DIR, dev_dir: Path = DEV_DIR,
          sources: Sequence[Source] | None = None) -> dict:
    """Build every source (or only those of the `only` domains: then the dev files and SOURCES.md, which
    need every domain, go to `dev_dir/partial` and are not rewritten in place). Returns counts per file."""
    sources = load_sources(only) if sources is None else list(sources)
    seen: set[str] = set()
    built: list[Built] = []
    # training sources first, so a text found in both a training and a dev source stays in training only
    for source in sorted(sources, key=lambda s: s.role != "train"):
        result = build_source(source, read_files(source, mirror), seen)
        logger.info("%-28s %-8s %-5s %-7s %5d records", source.name, source.domain, source.role, source.kind,
                    len(result.records))
        built.append(result)
    train_texts = [r.text for b in built if b.source.role == "train" for r in b.records]
    dropped = drop_dev_overlap([b for b in built if b.source.role == "dev"], train_texts)
    logger.info("dropped %d dev records near training text", dropped)
    domains = sorted({s.domain for s in sources})
    if only:
        logger.info("--only: dev files written under %s/partial, not in place", dev_dir)
        return write_outputs(built, seed_dir, dev_dir / "partial", domains)
    counts = write_outputs(built, seed_dir, dev_dir, domains)
    (seed_dir / "SOURCES.md").write_text(sources_table(built))
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mirror", type=Path, required=True,
                        help="folder of repository snapshots, one bare git directory per `owner+name/repo`")
    parser.add_argument("--only", nargs="*", default=[], choices=DOMAIN_MODULES,
                        help="domains whose files are rewritten (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    counts = build(args.mirror, args.only)
    logger.info(json.dumps(counts, indent=1))


if __name__ == "__main__":
    main()
