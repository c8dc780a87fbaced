"""Routing micro-batching: concurrent requests share backbone passes, each gets its own decision, errors reach
every waiter of their pass, and different top-k values never share a pass."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from router.gate import RoutingDecision
from serving.route_batcher import RouteBatcher


def _fake_router(calls: list[tuple[list[str], int | None]], fail_on: str | None = None):
    lock = threading.Lock()

    def route_many(texts, top_k):
        with lock:
            calls.append((list(texts), top_k))
        time.sleep(0.05)  # a backbone pass: newcomers queue meanwhile
        if fail_on in texts:
            raise RuntimeError("router failed")
        return [RoutingDecision([(t, 1.0)], 1.0, False, {t: 1.0}) for t in texts]

    return route_many


def test_concurrent_requests_share_passes_and_get_their_own_answer():
    calls: list = []
    batcher = RouteBatcher(_fake_router(calls), max_batch=8)

    async def main():
        return await asyncio.gather(*(batcher.route(f"text {i}") for i in range(20)))

    decisions = asyncio.run(main())
    assert [d.experts[0][0] for d in decisions] == [f"text {i}" for i in range(20)]
    assert batcher.batches == len(calls) < 20 and max(len(texts) for texts, _ in calls) <= 8


def test_errors_reach_their_pass_and_top_k_values_do_not_mix():
    calls: list = []
    batcher = RouteBatcher(_fake_router(calls, fail_on="bad"))

    async def main():
        first = asyncio.create_task(batcher.route("warm-up"))  # occupies the first pass
        await asyncio.sleep(0.01)
        others = [batcher.route("bad"), batcher.route("good", 2), batcher.route("also bad pass")]
        results = await asyncio.gather(*others, return_exceptions=True)
        return await first, results

    first, (bad, good, same_pass) = asyncio.run(main())
    assert first.experts[0][0] == "warm-up"
    assert isinstance(bad, RuntimeError) and isinstance(same_pass, RuntimeError)
    assert good.experts[0][0] == "good"
    assert [texts for texts, k in calls if k == 2] == [["good"]]  # its own pass
    assert ["bad", "also bad pass"] in [texts for texts, k in calls if k is None]  # shared one, failed together


def test_an_idle_batcher_adds_no_wait():
    batcher = RouteBatcher(_fake_router([]))
    started = time.perf_counter()
    asyncio.run(batcher.route("alone"))
    assert time.perf_counter() - started < 0.5
    with pytest.raises(RuntimeError):
        asyncio.run(RouteBatcher(_fake_router([], fail_on="x")).route("x"))
