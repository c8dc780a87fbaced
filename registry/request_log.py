"""Request logs written off the request path, in batches, and never lost: when the database is down the
batch goes to an append-only spill file (JSONL, fsynced) that is replayed, idempotently, once it is back.
A row the database refuses (or a spill line a crash cut short) is set aside in a rejects file, so one bad
row never blocks the others."""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from registry import repository as repo

logger = logging.getLogger(__name__)

TRANSIENT = (OperationalError, InterfaceError, PoolTimeoutError)
"""The database is unreachable: keep the rows (spill) and retry. Any other failure is about the rows."""


def _clean(row: dict[str, Any]) -> dict[str, Any]:
    """PostgreSQL text cannot hold NUL; a hostile prompt with one must still be logged (as U+FFFD)."""
    return {k: v.replace("\x00", "\ufffd") if isinstance(v, str) else v for k, v in row.items()}


def _encode(row: dict[str, Any]) -> str:
    return json.dumps({k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}, default=str)


def _decode(line: str) -> dict[str, Any]:
    row = json.loads(line)
    if isinstance(row.get("created_at"), str):
        row["created_at"] = datetime.fromisoformat(row["created_at"])
    return row


class RequestLogWriter:
    """Thread-safe `log(row)`; a background thread writes batches every `flush_ms`."""

    def __init__(self, sessions: sessionmaker[Session], spill_file: Path, flush_ms: float = 500.0,
                 batch_size: int = 256) -> None:
        self.sessions = sessions
        self.spill_file = spill_file
        self.flush_s = flush_ms / 1000
        self.batch_size = batch_size
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reject_file = spill_file.with_name(spill_file.stem + ".rejected.jsonl")
        self._io = threading.Lock()
        self.written = 0
        self.spilled = 0
        self.replayed = 0
        self.rejected = 0

    def start(self) -> RequestLogWriter:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="moe-request-log", daemon=True)
            self._thread.start()
        return self

    def log(self, row: dict[str, Any]) -> None:
        self._queue.put(_clean(row))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.flush()

    def _drain(self) -> list[dict[str, Any]]:
        rows = []
        while len(rows) < self.batch_size:
            try:
                rows.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return rows

    def flush(self) -> None:
        """Write everything queued now (also replays a spill file when the database answers)."""
        while True:
            rows = self._drain()
            self._write(rows)
            if not rows or self._queue.empty():
                return

    def _run(self) -> None:
        while not self._stop.is_set():
            self._stop.wait(self.flush_s)
            self.flush()

    def _insert(self, rows: list[dict[str, Any]]) -> int:
        """Insert in one transaction; if the database refuses the batch for its content, row by row, and the
        rows it still refuses go to the rejects file. Transient errors propagate (the caller spills)."""
        try:
            with self.sessions.begin() as session:
                return repo.add_request_logs(session, rows)
        except TRANSIENT:
            raise
        except Exception as exc:
            if len(rows) > 1:
                return sum(self._insert([row]) for row in rows)
            self._reject_locked([_encode(rows[0])], repr(exc))
            return 0

    def _reject_locked(self, lines: list[str], reason: str) -> None:
        self.reject_file.parent.mkdir(parents=True, exist_ok=True)
        with self.reject_file.open("a", encoding="utf-8") as handle:
            handle.writelines(json.dumps({"line": line, "error": reason[:500]}) + "\n" for line in lines)
        self.rejected += len(lines)
        logger.error("Request log: %d row(s) refused (%s); kept in %s", len(lines), reason[:200], self.reject_file)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        with self._io:
            try:
                self._replay_locked()
                if rows:
                    self.written += self._insert(rows)
            except Exception as exc:  # database down: keep the rows on disk, try again next flush
                if rows:
                    self._spill_locked(rows)
                    logger.warning("Request log database unavailable (%s); spilled %d rows to %s",
                                   exc.__class__.__name__, len(rows), self.spill_file)

    def _spill_locked(self, rows: list[dict[str, Any]]) -> None:
        self.spill_file.parent.mkdir(parents=True, exist_ok=True)
        with self.spill_file.open("a", encoding="utf-8") as handle:
            handle.writelines(_encode(r) + "\n" for r in rows)
            handle.flush()
            os.fsync(handle.fileno())
        self.spilled += len(rows)

    def _replay_locked(self) -> None:
        if not self.spill_file.is_file() or self.spill_file.stat().st_size == 0:
            return
        rows, broken = [], []
        for line in self.spill_file.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                rows.append(_decode(line))
            except (ValueError, TypeError):  # e.g. the last line of a spill cut short by a crash
                broken.append(line)
        for start in range(0, len(rows), self.batch_size):
            self._insert(rows[start : start + self.batch_size])
        if broken:
            self._reject_locked(broken, "unreadable spill line")
        # only after the inserts: a crash in between replays again, and add_request_logs skips duplicates
        self.spill_file.unlink()
        self.replayed += len(rows)
        logger.info("Replayed %d spilled request-log rows", len(rows))

