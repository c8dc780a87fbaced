"""An expert pool: one backbone, the adapters of the experts placed on it, one continuous-batching engine.
It follows the registry: new or updated experts are loaded and retired ones dropped between decode steps,
so requests in flight are never interrupted."""

from __future__ import annotations

import asyncio
import fnmatch
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

from prometheus_client.metrics_core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core.device import release_openmp_pool
from core.settings import Settings
from experts.adapters import load_validated
from experts.backbone import Backbone
from experts.engine import GenerationEngine, GenerationRequest, TokenEvent
from registry import repository as repo
from serving import tracing
from serving.metrics import MetricsRegistry

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

def placed_here(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class ExpertPoolCore:
    """The pool without Ray: tests and `moe eval` use it directly, the Ray deployment wraps it."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], backbone: Backbone, name: str = "default",
                 patterns: Sequence[str] = ("*",), exclude: Sequence[str] = (),
                 metrics: MetricsRegistry | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        self.backbone = backbone
        self.name = name
        self.patterns = list(patterns)
        self.exclude = list(exclude)
        self.engine = GenerationEngine(backbone, settings).start()
        self.loaded: dict[str, int] = {}
        self.failed: dict[str, str] = {}
        self.sync()
        if metrics is not None:
            metrics.register(PoolCollector(self))
            metrics.max_merged.add("moe_pool_loaded_experts")

    def wanted(self) -> dict[str, tuple[int, str]]:
        with self.sessions() as session:
            experts = repo.served_experts(session)
            return {
                e.name: (e.current_version, repo.current_version(session, e).adapter_path)
                for e in experts
                if e.current_version > 0 and placed_here(e.name, self.patterns)
                and not placed_here(e.name, self.exclude)
            }

    def sync(self) -> dict[str, list[str]]:
        """Make the loaded adapters match the registry; returns what changed."""
        wanted = self.wanted()
        added, removed = [], []
        for name, (version, path) in wanted.items():
            if self.loaded.get(name) == version or self.failed.get(name) == f"v{version}":
                continue
            try:
                self.engine.add_adapter(load_validated(Path(path), name, self.backbone, self.settings))
            except Exception as exc:  # a broken adapter must not take the pool down
                logger.error("Pool %s cannot load %s v%d: %s", self.name, name, version, exc)
                self.failed[name] = f"v{version}"
                continue
            self.loaded[name] = version
            added.append(name)
        for name in [n for n in self.loaded if n not in wanted]:
            self.engine.remove_adapter(name)
            del self.loaded[name]
            removed.append(name)
        if added or removed:
            logger.info("Pool %s: loaded %s, dropped %s", self.name, added, removed)
            release_openmp_pool()  # loading ran torch ops on this thread; the engine thread owns the cores
        return {"added": added, "removed": removed}

    def experts(self) -> list[str]:
        return sorted(self.loaded)

    async def stream(self, request: GenerationRequest, coalesce: bool = False) -> AsyncIterator[TokenEvent]:
        """The request's events as the engine produces them; with `coalesce` (a non-streamed answer) one final
        event per choice, its text the whole completion."""
        span = tracing.start_span("moe.pool.generate", request.trace, pool=self.name, request_id=request.request_id,
                                  experts=",".join(n for n, _ in request.mixture) or "base",
                                  prompt_tokens=len(request.prompt_ids), choices=request.params.n)
        last: TokenEvent | None = None
        try:
            if not coalesce:
                async for event in self.engine.stream(request):
                    last = event
                    yield event
                return
            # A non-streamed answer crosses the Ray boundary once per choice, not once per token, and wakes this
            # replica's event loop once: with 16 clients decoding together, per-token events are what the service
            # pays over the engine.
            for event in await self.engine.complete_all(request):
                last = event
                yield event
        finally:
            timing = last.timing if last is not None else None
            tracing.end_span(span, None if last is None or last.finish_reason != "error" else last.error,
                             finish_reason=last.finish_reason if last else "cancelled",
                             completion_tokens=last.completion_tokens if last else 0,
                             queued_s=timing.queued_s if timing else None)

    def close(self) -> None:
        self.engine.stop()


class PoolCollector(Collector):
    """The pool's gauges, read from the engine when collected (a scrape or a push to the hub): the engine
    thread only keeps plain counters, so its loop pays nothing per token for metrics."""

    def __init__(self, core: ExpertPoolCore) -> None:
        self.core = core

    def collect(self) -> Iterator[Metric]:
        engine, pool = self.core.engine, [self.core.name]
        load = engine.load()
        for name, doc, value in (
            ("moe_pool_requests_running", "Rows (request choices) in the pool's running batch", load["running"]),
            ("moe_pool_requests_waiting", "Rows (request choices) waiting for a place in the batch", load["waiting"]),
            ("moe_pool_kv_cache_tokens", "KV-cache positions held by the running batch (rows x padded length)",
             engine.batch.kv_tokens),
            ("moe_pool_loaded_experts", "Adapters loaded in the pool (the most any replica holds)",
             len(self.core.loaded)),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=["pool"])
            gauge.add_metric(pool, value)
            yield gauge
        steps = dict(engine.step_rows)  # one C-level copy: the engine thread may add a key meanwhile
        buckets = [(str(float(bound)), sum(n for rows, n in steps.items() if rows <= bound)) for bound in BATCH_BUCKETS]
        buckets.append(("+Inf", sum(steps.values())))
        histogram = HistogramMetricFamily("moe_pool_batch_size", "Rows decoded together per decode step",
                                          labels=["pool"])
        histogram.add_metric(pool, buckets, sum_value=float(sum(rows * n for rows, n in steps.items())))
        yield histogram


class LocalPoolClient:
    """PoolClient over an in-process pool (tests, single-process tools)."""

    def __init__(self, core: ExpertPoolCore) -> None:
        self.core = core
        self.name = core.name

    def stream(self, request: GenerationRequest, coalesce: bool = False) -> AsyncIterator[TokenEvent]:
        return self.core.stream(request, coalesce)

    async def experts(self) -> list[str]:
        return self.core.experts()


async def sync_forever(core: ExpertPoolCore, every_s: float) -> None:
    """Hot reload: poll the registry (cheap) and apply changes between decode steps."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await asyncio.to_thread(core.sync)
        except SQLAlchemyError as exc:  # the registry is away: keep serving what is loaded, no traceback spam
            logger.warning("Pool %s: registry unavailable (%s); serving the loaded adapters", core.name,
                           exc.__class__.__name__)
        except Exception:
            logger.exception("Pool %s: registry sync failed", core.name)
