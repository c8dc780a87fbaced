"""Background jobs with status and progress in the registry: training a new expert (then the router) and
retraining the router. They run as Ray tasks when Ray is up (the service), else in a thread."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.settings import Settings
from registry import repository as repo
from registry.db import session_factory

logger = logging.getLogger(__name__)


def _job_threads(settings: Settings) -> None:
    """Jobs are batch work: give torch the machine's cores (a zero-CPU Ray task starts with one thread)."""
    import torch

    torch.set_num_threads(settings.job_torch_threads or os.cpu_count() or 1)


def _report(sessions, job_id: str, **fields: Any) -> None:
    with sessions.begin() as session:
        repo.update_job(session, job_id, **fields)


def expert_job(settings_payload: dict[str, Any], job_id: str, name: str, data: str, description: str,
               epochs: int, prompts: str | None = None) -> None:
    """Train NAME from DATA, register it, then train a candidate router that learns it (gated promotion)."""
    from experts.backbone import load_backbone
    from experts.training import TrainConfig
    from pipelines.train_expert import train_expert_from_file
    from pipelines.train_router import backbone_encoder, train_router

    settings = Settings(**settings_payload)
    _job_threads(settings)
    sessions = session_factory(settings, run_migrations=False)
    try:
        _report(sessions, job_id, status="running", message="loading backbone")
        backbone = load_backbone(settings)
        result = train_expert_from_file(
            settings, backbone, sessions, name, Path(data), description, TrainConfig(epochs=epochs),
            on_progress=lambda p, msg: _report(sessions, job_id, progress=round(0.85 * p, 3), message=msg),
            prompts=Path(prompts) if prompts else None,
        )
        _report(sessions, job_id, progress=0.9, message="training the router")
        report = train_router(settings, sessions, backbone_encoder(settings, backbone),
                              backbone.fingerprint)
        _report(sessions, job_id, status="succeeded", progress=1.0,
                message="router promoted" if report.promoted else "expert registered, router not promoted",
                result={"expert_version": result.version, "eval_loss_base": result.base_loss,
                        "eval_loss_expert": result.expert_loss, "router_version": report.version,
                        "router_promoted": report.promoted, "router_reasons": report.reasons})
    except Exception as exc:
        logger.exception("job %s failed", job_id)
        _report(sessions, job_id, status="failed", message=f"{exc.__class__.__name__}: {exc}")


def adapter_job(settings_payload: dict[str, Any], job_id: str, name: str, adapter: str, description: str,
                prompts: str | None) -> None:
    """Validate and register an existing peft adapter folder, then train a candidate router that learns it."""
    from experts.backbone import load_backbone
    from pipelines.register import register_adapter
    from pipelines.train_router import backbone_encoder, train_router

    settings = Settings(**settings_payload)
    _job_threads(settings)
    sessions = session_factory(settings, run_migrations=False)
    try:
        _report(sessions, job_id, status="running", message="validating the adapter")
        backbone = load_backbone(settings)
        version = register_adapter(settings, sessions, backbone, name, Path(adapter), description,
                                   Path(prompts) if prompts else None)
        result: dict[str, Any] = {"expert_version": version}
        if prompts:
            _report(sessions, job_id, progress=0.5, message="training the router")
            report = train_router(settings, sessions, backbone_encoder(settings, backbone),
                                  backbone.fingerprint)
            result.update(router_version=report.version, router_promoted=report.promoted,
                          router_reasons=report.reasons)
        _report(sessions, job_id, status="succeeded", progress=1.0, message="registered", result=result)
    except Exception as exc:
        logger.exception("job %s failed", job_id)
        _report(sessions, job_id, status="failed", message=f"{exc.__class__.__name__}: {exc}")


def router_job(settings_payload: dict[str, Any], job_id: str, from_logs: bool) -> None:
    from experts.backbone import load_backbone
    from pipelines.retrain_router import retrain_from_logs
    from pipelines.train_router import backbone_encoder, train_router

    settings = Settings(**settings_payload)
    _job_threads(settings)
    sessions = session_factory(settings, run_migrations=False)
    try:
        _report(sessions, job_id, status="running", message="loading backbone")
        backbone = load_backbone(settings)
        encode = backbone_encoder(settings, backbone)
        run = retrain_from_logs if from_logs else train_router
        report = run(settings, sessions, encode, backbone.fingerprint)
        _report(sessions, job_id, status="succeeded", progress=1.0, message="; ".join(report.reasons),
                result={"router_version": report.version, "promoted": report.promoted,
                        "accuracy": report.metrics["accuracy"]})
    except Exception as exc:
        logger.exception("job %s failed", job_id)
        _report(sessions, job_id, status="failed", message=f"{exc.__class__.__name__}: {exc}")


def launch(fn: Callable[..., None], *args: Any) -> None:
    """A Ray task when Ray is up (it runs on any node of the cluster, outside the ingress process), else a
    thread. The task reserves no logical CPU: the serving replicas may hold all of them on a small machine."""
    try:
        import ray

        if ray.is_initialized():
            ray.remote(num_cpus=0, max_retries=0)(fn).remote(*args)
            return
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    threading.Thread(target=fn, args=args, daemon=True, name=f"job-{fn.__name__}").start()
