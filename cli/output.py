"""The commands' answers on stdout: aligned tables for people, one JSON document for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

Column = tuple[str, str, Callable[[Any], str]]
"""(key, heading, format): a heading starting with '>' is right-aligned."""


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def print_json(rows: Sequence[dict[str, Any]]) -> None:
    """One document (a list of objects), so `moe ... --json | jq` and json.loads both read it whole."""
    json.dump(list(rows), sys.stdout, indent=2, ensure_ascii=False, default=_plain)
    sys.stdout.write("\n")


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> None:
    cells = [[fmt(row[key]) for key, _, fmt in columns] for row in rows]
    headings = [heading.lstrip(">") for _, heading, _ in columns]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(headings)]
    right = [heading.startswith(">") for _, heading, _ in columns]
    for line in [headings, *cells]:
        parts = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(line, widths, right, strict=True)]
        print("  ".join(parts).rstrip())


def text(value: Any) -> str:
    return "-" if value is None else str(value)


def percent(value: float | None) -> str:
    """A fraction as a signed percentage; '-' when unknown."""
    return "-" if value is None else f"{100 * value:+.0f}%"


def share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
