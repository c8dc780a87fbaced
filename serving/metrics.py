"""Prometheus metrics that stay whole with several replicas.

Every process records into its own `MetricsRegistry` (a prometheus_client registry), the same code with Ray
or without. Without Ray (tests, single-process tools) /metrics renders that registry (`LocalExport`). Under
Ray Serve each replica sends a snapshot of its cumulative values to the one `MetricsHub` deployment
(serving/metrics_hub.py) every MOE_METRICS_PUSH_S, and /metrics on any ingress replica renders the hub's
merge, so a scrape does not depend on which replica answered.

Why not Ray's metric export (`ray.util.metrics`, what Serve itself uses): Ray exposes each node's series on
that node's metrics-agent port, one series per worker process, prefixed `ray_` and tagged with Ray's labels;
summing across replicas and nodes is left to the Prometheus server. An HTTP /metrics with cluster totals would
have to scrape every node's agent and sum the per-worker series away, seconds behind (the agents export every
metrics_report_interval_ms). Snapshots of cumulative values are also idempotent: a lost or repeated push
changes nothing, and a restarted hub gets every live replica's totals back with the next push.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

Labels = tuple[tuple[str, str], ...]
Merge = Literal["sum", "max"]
DROPPED_SUFFIXES = ("_created", "_gcount", "_gsum")
"""Per-process creation timestamps: meaningless once summed across processes."""


@dataclass(frozen=True)
class FamilySnapshot:
    """One metric family of one process: its samples as (sample name, labels, value)."""

    name: str
    kind: str
    """counter, gauge or histogram (prometheus_client's type names)."""
    help: str
    merge: Merge
    """How the hub combines a gauge across processes: `sum` (requests running) or `max` (experts loaded per
    pool, router version: every replica reports the same thing). Counters and histograms always add up."""
    samples: tuple[tuple[str, Labels, float], ...]


@dataclass(frozen=True)
class Snapshot:
    """What a replica sends to the hub: every family of its registry, cumulative since the process started."""

    source: str
    """Unique per process: the hub keeps the latest snapshot of each source."""
    role: str
    """ingress, pool or local."""
    families: tuple[FamilySnapshot, ...]


class MetricsRegistry:
    """One process's metrics: a prometheus_client registry plus how its gauges merge across processes."""

    def __init__(self, role: str = "local") -> None:
        self.registry = CollectorRegistry()
        self.role = role
        self.source = f"{role}-{uuid.uuid4().hex[:12]}"
        self.max_merged: set[str] = set()
        """Gauge families merged with max instead of sum."""

    def register(self, collector: Collector) -> None:
        self.registry.register(collector)

    def snapshot(self) -> Snapshot:
        families = []
        for family in self.registry.collect():
            samples = tuple((s.name, tuple(sorted(s.labels.items())), float(s.value)) for s in family.samples
                            if not s.name.endswith(DROPPED_SUFFIXES))
            merge: Merge = "max" if family.name in self.max_merged else "sum"
            families.append(FamilySnapshot(family.name, family.type, family.documentation, merge, samples))
        return Snapshot(self.source, self.role, tuple(families))

    def render(self) -> bytes:
        """The exposition the hub would give for this process alone (same code, so the same text)."""
        return render_families(self.snapshot().families)


class MetricsExport(Protocol):
    """What GET /metrics serves: this process's registry, or the totals of every replica."""

    async def render(self) -> bytes: ...


class LocalExport:
    """Without Ray: the process holds every series (gateway and in-process pools share one registry)."""

    def __init__(self, metrics: MetricsRegistry) -> None:
        self.metrics = metrics

    async def render(self) -> bytes:
        return self.metrics.render()


class _Families(Collector):
    """Serves merged snapshots through prometheus_client's exposition code."""

    def __init__(self, families: Iterable[FamilySnapshot]) -> None:
        self.families = list(families)

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            metric = Metric(family.name, family.help, family.kind)
            for name, labels, value in family.samples:
                metric.add_sample(name, dict(labels), value)
            yield metric


def render_families(families: Iterable[FamilySnapshot]) -> bytes:
    registry = CollectorRegistry()
    registry.register(_Families(families))
    return generate_latest(registry)


@dataclass
class _Source:
    role: str
    seen: float
    snapshot: Snapshot


class Aggregate:
    """The hub's state: the latest snapshot of every source, merged when rendered.

    Counters and histograms of a source that stopped reporting (a replica that died or was scaled down) stay
    in the totals, so they never go down; its gauges leave after `stale_s`. After `retire_s` of silence its
    counters are folded into one retired total and the source is forgotten (memory stays bounded); a retired
    source that reports again is ignored, since counting it afresh would count its history twice."""

    def __init__(self, stale_s: float, retire_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.stale_s = stale_s
        self.retire_s = retire_s
        self.clock = clock
        self.sources: dict[str, _Source] = {}
        self.retired: dict[str, FamilySnapshot] = {}
        self.retired_ids: set[str] = set()

    def push(self, snapshot: Snapshot) -> None:
        if snapshot.source in self.retired_ids:
            logger.warning("Metrics source %s reported after it was retired; ignored", snapshot.source)
            return
        self.sources[snapshot.source] = _Source(snapshot.role, self.clock(), snapshot)

    def _retire(self, now: float) -> None:
        for source_id in [s for s, src in self.sources.items() if now - src.seen > self.retire_s]:
            source = self.sources.pop(source_id)
            self.retired_ids.add(source_id)
            kept = [f for f in source.snapshot.families if f.kind != "gauge"]
            self.retired = {f.name: f for f in _merge([list(self.retired.values()), kept])}

    def families(self) -> list[FamilySnapshot]:
        now = self.clock()
        self._retire(now)
        parts: list[list[FamilySnapshot]] = [list(self.retired.values())]
        live: dict[str, int] = {}
        for source in self.sources.values():
            fresh = now - source.seen <= self.stale_s
            parts.append([f for f in source.snapshot.families if fresh or f.kind != "gauge"])
            if fresh:
                live[source.role] = live.get(source.role, 0) + 1
        merged = _merge(parts)
        merged.append(FamilySnapshot(
            "moe_metrics_sources", "gauge", "Replicas whose metrics reached the hub within the staleness window, "
            "by role", "sum", tuple(("moe_metrics_sources", (("role", r),), float(n)) for r, n in sorted(live.items())),
        ))
        return merged

    def render(self) -> bytes:
        return render_families(self.families())

    def per_source(self, sample: str) -> dict[str, float]:
        """Each live source's sum of one sample (e.g. moe_requests_total): which replica holds what."""
        return {source_id: sum(v for f in src.snapshot.families for n, _, v in f.samples if n == sample)
                for source_id, src in self.sources.items()}


def _merge(parts: Iterable[Iterable[FamilySnapshot]]) -> list[FamilySnapshot]:
    """Families of several processes, merged by family name; samples keep the order they first appeared in
    (a histogram's buckets stay together and in `le` order)."""
    meta: dict[str, FamilySnapshot] = {}
    values: dict[str, dict[tuple[str, Labels], float]] = {}
    for families in parts:
        for family in families:
            meta.setdefault(family.name, family)
            merged = values.setdefault(family.name, {})
            use_max = family.kind == "gauge" and meta[family.name].merge == "max"
            for name, labels, value in family.samples:
                key = (name, labels)
                if key not in merged:
                    merged[key] = value
                else:
                    merged[key] = max(merged[key], value) if use_max else merged[key] + value
    return [FamilySnapshot(name, f.kind, f.help, f.merge, tuple((n, labels, v) for (n, labels), v in
                                                                  values[name].items()))
            for name, f in meta.items()]


async def publish_forever(metrics: MetricsRegistry, push: Callable[[Snapshot], Awaitable[object]],
                          every_s: float) -> None:
    """A replica's reporting loop: its cumulative snapshot to the hub every `every_s` seconds. A failed push
    is only logged: the next one carries everything again."""
    while True:
        try:
            await push(metrics.snapshot())
        except Exception as exc:  # the hub restarting must not stop the replica's reporting
            logger.debug("Metrics push failed (%s); retrying", exc.__class__.__name__)
        await asyncio.sleep(every_s)
