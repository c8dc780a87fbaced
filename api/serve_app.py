"""Ray Serve deployments: the ingress (FastAPI via `serve.ingress`, router inside), one ExpertPool
deployment per pool of the deploy config, and the MetricsHub every replica reports its metrics to.
`build_app(settings)` returns the application; `serve run api.serve_app:app` and the Serve config in deploy/
use the same builder."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import RayActorError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from api.app import create_app
from api.gateway import Gateway
from api.metrics import Metrics
from core.device import apply_thread_settings
from core.errors import OverloadedError, PoolUnavailableError
from core.settings import Settings
from experts.backbone import load_backbone
from experts.engine import GenerationRequest, TokenEvent
from pipelines.auto_retrain import retrain_forever
from registry.db import session_factory
from registry.request_log import RequestLogWriter
from router.service import RoutingService
from serving.metrics import MetricsRegistry, publish_forever
from serving.metrics_hub import HubExport, MetricsHub
from serving.pool import ExpertPoolCore, sync_forever
from serving.tracing import setup_tracing

logger = logging.getLogger(__name__)

APP_NAME = "moe"
DEFAULT_POOLS = Path(__file__).resolve().parent.parent / "deploy" / "pools.yaml"
# What the caller of a replica that died (or is being replaced) gets: the request did not complete, and a
# retry lands on a live replica once Serve has restarted it. Errors the replica raised itself are not here.
REPLICA_GONE = (RayActorError, WorkerCrashedError, ReplicaUnavailableError, DeploymentUnavailableError)


class PoolConfig(BaseModel):
    """One ExpertPool deployment: which experts it holds and the resources of its replicas."""

    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,31}$", description="Pool name (deployment ExpertPool-<name>).")
    experts: list[str] = Field(default=["*"], description="Expert names or glob patterns placed on this pool.")
    exclude: list[str] = Field(default=[], description="Patterns kept off this pool (placed on another).")
    num_replicas: int | str = Field(default=1, description="Replicas, or 'auto' to autoscale.")
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs per replica.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per replica (production GPU pools).")
    max_ongoing_requests: int = Field(default=64, ge=1, description="Requests one replica accepts at once.")
    max_queued_requests: int = Field(
        default=256, ge=-1, description="Requests waiting for a replica before callers get 503 (-1 = unbounded)."
    )
    torch_threads: int = Field(
        default=0, ge=0, description="torch threads per replica; 0 = Ray's choice (1 for fractional num_cpus)."
    )
    autoscaling_config: dict[str, Any] | None = Field(default=None, description="Ray Serve autoscaling config.")


class DeployConfig(BaseModel):
    """The placement file (deploy/pools.yaml, or MOE_DEPLOY_CONFIG)."""

    ingress_replicas: int = Field(default=1, ge=1, description="Ingress replicas (each holds the router).")
    ingress_num_cpus: float = Field(default=0.5, ge=0, description="CPUs per ingress replica.")
    ingress_max_ongoing_requests: int = Field(
        default=128, ge=1, description="Requests one ingress replica handles at once (Serve's default is 5)."
    )
    ingress_max_queued_requests: int = Field(
        default=512, ge=-1, description="Requests waiting for an ingress replica before the proxy answers 503 "
        "with Retry-After (-1 = unbounded: overload becomes client timeouts).",
    )
    pools: list[PoolConfig] = Field(default_factory=lambda: [PoolConfig(name="default")], min_length=1)


def load_deploy_config(settings: Settings) -> DeployConfig:
    path = settings.deploy_config or DEFAULT_POOLS
    if path.is_file():
        return DeployConfig.model_validate(yaml.safe_load(path.read_text()) or {})
    return DeployConfig()


@serve.deployment(name="ExpertPool", health_check_period_s=10, health_check_timeout_s=30)
class ExpertPool:
    """Holds the backbone and the adapters of its experts; batches across experts inside the engine."""

    def __init__(self, settings: dict[str, Any], pool: dict[str, Any], hub: DeploymentHandle) -> None:
        self.settings = Settings(**settings)
        config = PoolConfig(**pool)
        apply_thread_settings(self.settings)
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        setup_tracing(self.settings, f"moe-pool-{config.name}")
        sessions = session_factory(self.settings, run_migrations=False)
        metrics = MetricsRegistry("pool")
        self.core = ExpertPoolCore(self.settings, sessions, load_backbone(self.settings), config.name,
                                   config.experts, config.exclude, metrics)
        loop = asyncio.get_event_loop()
        self._sync = loop.create_task(sync_forever(self.core, 2.0))
        self._metrics = loop.create_task(publish_forever(metrics, HubExport(metrics, hub).push,
                                                         self.settings.metrics_push_s))

    async def generate(self, request: GenerationRequest, coalesce: bool = False) -> AsyncIterator[TokenEvent]:
        async for event in self.core.stream(request, coalesce):
            yield event

    async def experts(self) -> list[str]:
        return self.core.experts()

    async def sync(self) -> dict[str, list[str]]:
        return await asyncio.to_thread(self.core.sync)

    def check_health(self) -> None:
        if not self.core.engine.running:
            raise RuntimeError("engine thread stopped")


class RayPoolClient:
    """PoolClient over an ExpertPool deployment handle."""

    def __init__(self, handle: DeploymentHandle, name: str) -> None:
        self.handle = handle
        self.name = name

    async def stream(self, request: GenerationRequest, coalesce: bool = False) -> AsyncIterator[TokenEvent]:
        try:
            async for event in self.handle.options(stream=True).generate.remote(request, coalesce):
                yield event
        except BackPressureError as exc:
            raise OverloadedError(f"Pool {self.name} is at capacity (max_queued_requests); retry later.") from exc
        except REPLICA_GONE as exc:
            raise PoolUnavailableError(
                f"Pool {self.name}: the replica serving this request went away ({exc.__class__.__name__}); "
                "retry shortly.", retry_after=2,
            ) from exc

    async def experts(self) -> list[str]:
        async def call() -> list[str]:
            return await self.handle.experts.remote()

        # bounded: while a replica restarts the call would wait for it; the gateway keeps the last placement
        return await asyncio.wait_for(call(), timeout=5)


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """FastAPI ingress: validation, auth, templating, routing (the router lives here), dispatch, logging."""

    def __init__(self, settings: dict[str, Any], pool_names: list[str], hub: DeploymentHandle,
                 *pools: DeploymentHandle) -> None:
        self.settings = Settings(**settings)
        apply_thread_settings(self.settings)
        setup_tracing(self.settings, "moe-ingress")
        sessions = session_factory(self.settings, run_migrations=False)
        backbone = load_backbone(self.settings)  # the router's own copy, truncated to the layers it needs
        routing = RoutingService(self.settings, sessions, backbone.model, backbone.tokenizer, own_backbone=True)
        routing.refresh()
        writer = RequestLogWriter(sessions, self.settings.spill_dir / "requests.jsonl",
                                  self.settings.log_flush_ms).start()
        clients = [RayPoolClient(h, n) for h, n in zip(pools, pool_names, strict=True)]
        metrics = Metrics(MetricsRegistry("ingress"))
        export = HubExport(metrics.registry, hub)
        self.gateway = Gateway(self.settings, sessions, backbone.tokenizer, routing, clients, writer, metrics, export)
        self._metrics = asyncio.get_event_loop().create_task(
            publish_forever(metrics.registry, export.push, self.settings.metrics_push_s))
        self._retrain = None
        if self.settings.router_retrain_after_labels > 0:  # the optional retrain trigger (off by default)
            self._retrain = asyncio.get_event_loop().create_task(retrain_forever(self.settings, sessions))

    def __serve_build_asgi_app__(self):
        return create_app(lambda: self.gateway)

    def __del__(self) -> None:
        gateway = getattr(self, "gateway", None)
        if gateway is not None:
            gateway.log_writer.stop()


def build_app(settings: Settings):
    """The Serve application graph: Ingress -> ExpertPool-<name> for every pool; all report to MetricsHub."""
    deploy = load_deploy_config(settings)
    payload = settings.payload()
    hub = MetricsHub.bind(settings.metrics_push_s)
    pools = []
    for pool in deploy.pools:
        options: dict[str, Any] = {
            "name": f"ExpertPool-{pool.name}",
            "ray_actor_options": {"num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus},
            "max_ongoing_requests": pool.max_ongoing_requests,
            "max_queued_requests": pool.max_queued_requests,
        }
        if pool.autoscaling_config:
            options["autoscaling_config"] = pool.autoscaling_config
        else:
            options["num_replicas"] = pool.num_replicas
        pools.append(ExpertPool.options(**options).bind(payload, pool.model_dump(), hub))
    return Ingress.options(
        num_replicas=deploy.ingress_replicas, ray_actor_options={"num_cpus": deploy.ingress_num_cpus},
        max_ongoing_requests=deploy.ingress_max_ongoing_requests,
        max_queued_requests=deploy.ingress_max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": 1},
    ).bind(payload, [p.name for p in deploy.pools], hub, *pools)


def app_builder(args: dict[str, str] | None = None):
    """Entry for `serve run api.serve_app:app_builder` and Serve config files (import_path)."""
    return build_app(Settings(**(args or {})))
