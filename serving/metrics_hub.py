"""The MetricsHub Serve deployment: one replica that holds the latest metrics snapshot of every ingress and
pool replica and renders their merge for GET /metrics (serving/metrics.py says why this and not Ray's metric
export). Its module imports no torch, so its replica stays a small process."""

from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle

from core.errors import UnavailableError
from serving.metrics import Aggregate, MetricsRegistry, Snapshot

RETIRE_S = 3600.0
"""A source silent this long is folded into the retired totals (a live replica reports every second)."""


def stale_after(push_s: float) -> float:
    """A replica's gauges leave the totals after a few missed pushes (not one: a busy loop may be late)."""
    return max(5 * push_s, 5.0)


@serve.deployment(name="MetricsHub", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class MetricsHub:
    """Exactly one replica: the totals live here. Its methods are async without awaits, so they run one at a
    time on the replica's event loop and need no lock."""

    def __init__(self, push_s: float) -> None:
        self.aggregate = Aggregate(stale_after(push_s), RETIRE_S)

    async def push(self, snapshot: Snapshot) -> None:
        self.aggregate.push(snapshot)

    async def render(self) -> bytes:
        return self.aggregate.render()

    async def per_source(self, sample: str) -> dict[str, float]:
        return self.aggregate.per_source(sample)


class HubExport:
    """/metrics under Ray: this replica pushes its own snapshot first (so its latest requests are counted
    without waiting for the next push), then renders the hub's totals."""

    def __init__(self, metrics: MetricsRegistry, hub: DeploymentHandle) -> None:
        self.metrics = metrics
        self.hub = hub

    async def push(self, snapshot: Snapshot) -> None:
        await self.hub.push.remote(snapshot)

    async def render(self) -> bytes:
        try:
            await self.push(self.metrics.snapshot())
            return await self.hub.render.remote()
        except Exception as exc:  # this replica's numbers alone would be wrong totals: better no answer
            raise UnavailableError(f"The metrics hub did not answer ({exc.__class__.__name__}); retry shortly.",
                                   retry_after=2) from exc
