"""The real-text data build on a small fixture repository: parse, clean, de-duplicate, sample, keep dev text
apart from training text, refuse reserved sources, write the files and the sources table."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from corpora.base import Record, Source, clean_text, csv_rows, json_lines
from corpora.build import build, load_sources

ANSWER = "Rest, drink fluids, and see a doctor if the fever lasts more than three days or goes above 39 C."


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def mirror(tmp_path: Path) -> tuple[Path, str]:
    """A snapshot laid out as `fetch` leaves it: <mirror>/owner+name/repo, here a checkout with .git inside."""
    work = tmp_path / "mirror" / "acme+health-qa" / "repo"
    work.mkdir(parents=True)
    (work / "qa.jsonl").write_text("".join(json.dumps(row) + "\n" for row in [
        {"q": "I have had a fever for two days, what should I do?", "a": ANSWER},
        {"q": "i have had a FEVER for two days - what should i do??", "a": ANSWER},  # near-duplicate
        {"q": "Is it safe to take ibuprofen with <b>paracetamol</b>? see https://example.org/x", "a": ANSWER},
        {"q": "ok", "a": ANSWER},  # too short
        {"q": "Can I drink coffee while breastfeeding my newborn daughter?", "a": "Yes."},  # answer too short
    ]))
    (work / "queries.csv").write_text("text\nMy toddler has a rash after antibiotics\nIs a resting pulse of 50 ok\n"
                                      '"I have had a fever for two days, what should I do now"\n')
    _git(work, "init", "-q")
    _git(work, "-c", "user.email=t@t", "-c", "user.name=t", "add", ".")
    _git(work, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "data")
    return tmp_path / "mirror", _git(work, "rev-parse", "HEAD")


def _qa(files):
    for row in json_lines(files["qa.jsonl"]):
        yield Record(row["q"], row["a"])


def _queries(files):
    for row in csv_rows(files["queries.csv"]):
        yield Record(row["text"])


def _sources(commit: str) -> list[Source]:
    common = {"repo": "acme/health-qa", "commit": commit, "license": "CC-BY-4.0", "domain": "medical"}
    return [
        Source(name="acme-qa", role="train", kind="qa", paths=("qa.jsonl",), parse=_qa, **common),
        Source(name="acme-queries", role="dev", kind="queries", paths=("queries.csv",), parse=_queries, limit=5,
               **common),
    ]


def test_build_writes_clean_training_and_dev_files(mirror, tmp_path):
    root, commit = mirror
    seed, dev = tmp_path / "seed", tmp_path / "dev"
    counts = build(root, seed_dir=seed, dev_dir=dev, sources=_sources(commit))
    qa = [json.loads(line) for line in (seed / "medical" / "real_qa.jsonl").read_text().splitlines()]
    assert [row["source"] for row in qa] == ["acme-qa", "acme-qa"]  # duplicate, short prompt, short answer dropped
    assert "<b>" not in qa[1]["prompt"] and "<url>" in qa[1]["prompt"]
    prompts = (seed / "medical" / "real_prompts.jsonl").read_text().splitlines()
    assert len(prompts) == 2  # the QA questions are routing prompts of the domain too
    routing = [json.loads(line) for line in (dev / "routing.jsonl").read_text().splitlines()]
    # the dev query that repeats a training question almost word for word is dropped
    assert [r["text"] for r in routing] == ["My toddler has a rash after antibiotics", "Is a resting pulse of 50 ok"]
    assert {r["domain"] for r in routing} == {"medical"}
    assert counts["quality/routing.jsonl"] == 2 and counts["medical/real_qa.jsonl"] == 2
    table = (seed / "SOURCES.md").read_text()
    assert "acme-queries | medical | dev | queries | 2 |" in table and commit[:12] in table


def test_reserved_sources_are_refused(monkeypatch):
    from corpora import medical

    reserved = Source(name="medquad-copy", repo="someone/MedQuAD", commit="0" * 40, license="CC-BY-4.0",
                      domain="medical", role="train", kind="qa", paths=("x",), parse=_qa)
    monkeypatch.setattr(medical, "SOURCES", [*medical.SOURCES, reserved])
    with pytest.raises(ValueError, match="reserved for independent evaluation"):
        load_sources(["medical"])


def test_shipped_sources_keep_train_and_dev_apart():
    """One dataset is never both: a repository is used for training or for the dev benchmark, not both."""
    roles: dict[str, set[str]] = {}
    for source in load_sources():
        roles.setdefault(source.repo, set()).add(source.role)
        assert len(source.commit) == 40 and source.license
    assert all(len(r) == 1 for r in roles.values()), {k: v for k, v in roles.items() if len(v) > 1}


def test_clean_text_keeps_paragraphs():
    assert clean_text("Hi&nbsp;there <i>you</i>\r\n\r\n\r\nBye   now") == "Hi there you\n\nBye now"


def test_ask_cfpb_entries_go_to_finance_or_legal_never_both():
    from corpora.finance import ASK_CFPB_PATH, parse_ask_cfpb
    from corpora.legal import parse_ask_cfpb_legal

    rows = [
        ("Credit cards", "What is a credit card interest rate?", "The APR is the yearly cost of credit."),
        ("Debt collection", "Can a debt collector call me at work?", "Not if you tell them your employer forbids it."),
        ("Mortgages", "Can my lender foreclose while I apply for help?", "Federal rules limit dual tracking."),
        ("Bank accounts and services", "My card was stolen. What do I do?", "Call your bank at once."),
        ("Auto loans", "How do auto loan terms work?", "A longer term lowers the payment but costs more."),
    ]
    lines = ["Status,Topic,Question,Answer,ShortAnswer"] + [f'APPROVED,{t},"{q}","{a}",' for t, q, a in rows]
    lines.append('DRAFT,Credit cards,"What is a grace period?","Time before interest is charged.",')
    files = {ASK_CFPB_PATH: "\n".join(lines).encode()}
    finance = {r.text for r in parse_ask_cfpb(files)}
    legal = {r.text for r in parse_ask_cfpb_legal(files)}
    assert finance == {"What is a credit card interest rate?", "How do auto loan terms work?"}
    assert legal == {"Can a debt collector call me at work?", "Can my lender foreclose while I apply for help?"}
    assert all(r.answer for r in parse_ask_cfpb_legal(files))
