"""Admission: the queue of submitted rows, how many join the running batch each step, and how the admitted rows
are grouped into prefill passes."""

from __future__ import annotations

import queue
import time
from typing import TYPE_CHECKING

from core.errors import OverloadedError
from experts.engine.batch import Row, row_groups

if TYPE_CHECKING:  # annotations only: importable without pydantic-settings (bench.gpu_check on a bare GPU box)
    from core.settings import Settings


class Scheduler:
    """A FIFO of waiting rows, bounded by MOE_MAX_QUEUE; an idle engine waits MOE_BATCH_WAIT_MS for
    concurrent requests so they prefill together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.waiting: queue.Queue[Row] = queue.Queue()

    def __len__(self) -> int:
        return self.waiting.qsize()

    def check_room(self, rows: int = 1) -> None:
        """Refuse a request whose `rows` (its n choices) would overfill the queue."""
        if self.waiting.qsize() + rows > self.settings.max_queue:
            raise OverloadedError(
                f"{self.waiting.qsize()} requests are waiting (MOE_MAX_QUEUE={self.settings.max_queue}); retry later."
            )

    def add(self, row: Row) -> None:
        self.waiting.put(row)

    def admit(self, running: int) -> list[Row]:
        """Rows that join a batch of `running` rows now, up to MOE_MAX_BATCH_SIZE in all."""
        capacity = self.settings.max_batch_size - running
        admitted: list[Row] = []
        if capacity <= 0:
            return admitted
        if not running:
            try:  # idle: block briefly, then give concurrent requests a moment to join the batch
                admitted.append(self.waiting.get(timeout=0.05))
            except queue.Empty:
                return admitted
            deadline = time.perf_counter() + self.settings.batch_wait_ms / 1000
            while len(admitted) < capacity and time.perf_counter() < deadline:
                try:
                    admitted.append(self.waiting.get(timeout=max(0.0, deadline - time.perf_counter())))
                except queue.Empty:
                    break
        while len(admitted) < capacity:
            try:
                admitted.append(self.waiting.get_nowait())
            except queue.Empty:
                break
        return admitted


PREFILL_PADDING = 1.25
"""Largest ratio of computed to real prompt positions in one prefill pass (prefill_groups)."""


def prefill_groups(rows: list[Row], max_padding: float = PREFILL_PADDING) -> list[list[Row]]:
    """The admitted rows in prefill passes of similar prompt length, shortest first. A left-padded pass computes
    every row at its longest prompt's length: the 16 bench prompts (37-295 tokens) in one pass computed 4720
    positions for 1265 real ones (7-9 s on 2 cores). Sorted by length, a row opens a new pass when adding it would
    make the pass compute more than `max_padding` x its real positions (those 16: 4 passes, 1457 positions)."""
    if not rows:
        return []
    ordered = sorted(rows, key=lambda r: len(r.request.prompt_ids))
    longest = len(ordered[-1].request.prompt_ids)
    starts = [longest - len(row.request.prompt_ids) for row in ordered]  # as if left-padded together
    return [ordered[first:end] for first, end, _ in row_groups(starts, longest, max_padding)]
