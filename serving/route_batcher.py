"""Micro-batching of routing decisions in the ingress. Concurrent requests that need the router are encoded in
one backbone pass instead of one pass each: while a batch is being encoded (off the event loop), newcomers
queue, and the next pass takes all of them. No timer, so an idle service adds no latency, and a busy one
pays one truncated-backbone pass per batch instead of per request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from router.gate import RoutingDecision

logger = logging.getLogger(__name__)

RouteMany = Callable[[Sequence[str], int | None], list[RoutingDecision]]
"""(texts, top_k) -> one decision per text (blocking; runs in a worker thread)."""


@dataclass
class _Pending:
    text: str
    top_k: int | None
    future: asyncio.Future[RoutingDecision]


class RouteBatcher:
    def __init__(self, route_many: RouteMany, max_batch: int = 32) -> None:
        self.route_many = route_many
        self.max_batch = max_batch
        self._pending: list[_Pending] = []
        self._worker: asyncio.Task[None] | None = None
        # One thread for every pass (passes are sequential anyway): torch then keeps one OpenMP pool in this
        # process instead of one per executor thread, which oversubscribes the cores (core.device).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-route")
        self.batches = 0
        """Backbone passes run so far (tests and metrics)."""

    async def route(self, text: str, top_k: int | None = None) -> RoutingDecision:
        future: asyncio.Future[RoutingDecision] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(text, top_k, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            top_k = batch[0].top_k
            same = [p for p in batch if p.top_k == top_k]  # one top-k per pass; others wait for the next
            self._pending = [p for p in batch if p.top_k != top_k] + self._pending
            try:
                decisions = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self.route_many, [p.text for p in same], top_k
                )
            except Exception as exc:  # every waiter of this pass gets the error; the next pass runs anew
                for p in same:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            self.batches += 1
            for p, decision in zip(same, decisions, strict=True):
                if not p.future.done():  # a client that went away cancelled its future
                    p.future.set_result(decision)
