"""The pieces every source definition shares: what a source is, what a record is, reading files from a
repository snapshot, and the text clean-up every source goes through."""

from __future__ import annotations

import csv
import html
import io
import json
import re
import subprocess
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Domain = Literal["medical", "finance", "legal", "support", "general"]
Role = Literal["train", "dev"]
"""train: the default experts and the router learn from it; dev: held out for `bench/quality.py` only. One
dataset is never both: dev figures are on text from sources the product did not train on."""
Kind = Literal["queries", "qa"]
"""queries: user requests (routing text); qa: a user question with an answer written by a person."""


@dataclass(frozen=True)
class Record:
    """One item of a source: a user's text, and for QA sources the answer a person wrote to it."""

    text: str
    answer: str | None = None


Files = dict[str, bytes]
"""Path inside the repository -> file content at the source's revision."""


@dataclass(frozen=True)
class Source:
    """One public dataset at a fixed revision."""

    name: str
    """Short unique id, used in the `source` field of every record built from it."""
    repo: str
    """GitHub `owner/name`."""
    commit: str
    """The 40-hex revision the files are read at."""
    license: str
    """The license of the data (SPDX id where there is one), checked by reading the repository."""
    domain: Domain
    """Routing label of its records; `general` = no domain (the router's `base` column)."""
    role: Role
    kind: Kind
    paths: tuple[str, ...]
    """Files read from the repository."""
    parse: Callable[[Files], Iterable[Record]]
    """Turns the files into records; cleaning and filtering happen afterwards, in `clean_record`."""
    limit: int | None = None
    """Keep at most this many records (a fixed pseudo-random sample by text hash), after cleaning."""
    note: str = ""
    """What was taken and how, for DATA.md."""
    url: str = field(default="")
    """Where a reader can see the data (defaults to the repository page)."""

    @property
    def page(self) -> str:
        return self.url or f"https://github.com/{self.repo}/tree/{self.commit}"


def mirror_dir(mirror_root: Path, repo: str) -> Path:
    """Where a snapshot of `owner/name` lies: `<root>/owner+name/repo`, a bare git directory, or a checkout
    whose git directory is `repo/.git` (some snapshots arrive that way)."""
    folder = mirror_root / repo.replace("/", "+") / "repo"
    return folder / ".git" if (folder / ".git").is_dir() else folder


def read_files(source: Source, mirror_root: Path) -> Files:
    git_dir = mirror_dir(mirror_root, source.repo)
    if not git_dir.exists():
        raise FileNotFoundError(f"no snapshot of {source.repo} under {mirror_root} (expected {git_dir})")
    files: Files = {}
    for path in source.paths:
        files[path] = subprocess.run(
            ["git", "--git-dir", str(git_dir), "show", f"{source.commit}:{path}"],
            check=True, capture_output=True,
        ).stdout
    return files


# --- helpers for parsers -----------------------------------------------------------------------------------

def json_lines(data: bytes) -> Iterator[dict]:
    for line in data.decode("utf-8", errors="replace").splitlines():
        if line.strip():
            yield json.loads(line)


def csv_rows(data: bytes, delimiter: str = ",") -> Iterator[dict[str, str]]:
    yield from csv.DictReader(io.StringIO(data.decode("utf-8-sig", errors="replace")), delimiter=delimiter)


# --- cleaning ------------------------------------------------------------------------------------------------

_TAG = re.compile(r"<[^>]{1,200}>")
_URL = re.compile(r"https?://\S+|www\.\S+")
_SPACE = re.compile(r"[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """HTML entities and tags out, URLs replaced by `<url>`, Unicode normalised, runs of spaces collapsed;
    paragraph breaks kept."""
    text = html.unescape(text)
    text = _TAG.sub(" ", text)
    text = unicodedata.normalize("NFKC", text)
    text = _URL.sub("<url>", text)
    lines = [_SPACE.sub(" ", line).strip() for line in text.replace("\r", "\n").split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


_SENTENCE_START = re.compile(r"(^|[.!?]\s+)([a-z])")
_LONE_I = re.compile(r"\bi\b(?=['\s,.!?]|$)")


def recase(text: str) -> str:
    """For sources a scraper or export lower-cased: give back sentence-initial capitals and `I` (nothing else)."""
    text = _LONE_I.sub("I", text)
    return _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), text)


def normalise(text: str) -> str:
    """The key near-duplicates share: lower case, letters and digits only, single spaces."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


@dataclass(frozen=True)
class Limits:
    """Length bounds a cleaned record must meet to be kept."""

    min_text_chars: int = 8
    max_text_chars: int = 1200
    min_answer_chars: int = 40
    max_answer_chars: int = 2000


def clean_record(record: Record, kind: Kind, limits: Limits = Limits()) -> Record | None:
    text = clean_text(record.text)
    if not limits.min_text_chars <= len(text) <= limits.max_text_chars or len(normalise(text)) < 4:
        return None
    if kind == "queries":
        return Record(text)
    answer = clean_text(record.answer or "")
    if not limits.min_answer_chars <= len(answer) <= limits.max_answer_chars:
        return None
    return Record(text, answer)
