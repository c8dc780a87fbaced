"""Repository functions over the registry. Every function takes a Session; callers own transactions."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session

from core.errors import ConflictError, ExpertNotFoundError, NotFoundError, RouterNotTrainedError
from registry.models import (
    SERVED_STATUSES,
    Expert,
    ExpertStatus,
    ExpertVersion,
    Feedback,
    Job,
    RequestLog,
    RouterStatus,
    RouterVersion,
    RoutingExample,
    utcnow,
)

# ---- experts ---------------------------------------------------------------------------


def get_expert(session: Session, name: str) -> Expert | None:
    return session.scalar(select(Expert).where(Expert.name == name))


def require_expert(session: Session, name: str) -> Expert:
    expert = get_expert(session, name)
    if expert is None:
        raise ExpertNotFoundError(f"Expert {name!r} does not exist; `moe expert list` shows the registered ones.")
    return expert


def list_experts(session: Session, statuses: Sequence[str] | None = None) -> list[Expert]:
    query = select(Expert).order_by(Expert.name)
    if statuses:
        query = query.where(Expert.status.in_([str(s) for s in statuses]))  # plain strings for every driver
    return list(session.scalars(query))


def served_experts(session: Session) -> list[Expert]:
    """Experts the pools serve (active or unrouted), by name."""
    return list_experts(session, SERVED_STATUSES)


def require_new_expert(session: Session, name: str,
                       hint: str = "; pick another name or retire it first") -> None:
    """Raise ConflictError when an expert of this name exists (retired ones included)."""
    if get_expert(session, name) is not None:
        raise ConflictError(f"Expert {name!r} already exists{hint}.")


def add_expert(session: Session, name: str, description: str = "", status: str = ExpertStatus.ACTIVE) -> Expert:
    require_new_expert(session, name)
    expert = Expert(name=name, description=description, status=str(status), current_version=0)
    session.add(expert)
    session.flush()
    return expert


def add_expert_version(
    session: Session,
    expert: Expert,
    adapter_path: str,
    backbone_fingerprint: str,
    rank: int,
    target_modules: list[str],
    metrics: dict[str, Any],
    source: str,
    mlflow_run_id: str | None = None,
) -> ExpertVersion:
    version = ExpertVersion(
        expert_id=expert.id,
        version=expert.current_version + 1,
        adapter_path=adapter_path,
        backbone_fingerprint=backbone_fingerprint,
        rank=rank,
        target_modules=target_modules,
        metrics=metrics,
        source=source,
        mlflow_run_id=mlflow_run_id,
    )
    session.add(version)
    expert.current_version = version.version
    session.flush()
    return version


def current_version(session: Session, expert: Expert) -> ExpertVersion:
    version = session.scalar(
        select(ExpertVersion).where(
            ExpertVersion.expert_id == expert.id, ExpertVersion.version == expert.current_version
        )
    )
    if version is None:
        raise NotFoundError(f"Expert {expert.name!r} has no adapter version yet.")
    return version


def current_versions(session: Session) -> dict[str, ExpertVersion]:
    """Every expert's current version by expert name, in one query (for listings)."""
    query = select(Expert.name, ExpertVersion).join(
        Expert, and_(ExpertVersion.expert_id == Expert.id, ExpertVersion.version == Expert.current_version)
    )
    return {name: version for name, version in session.execute(query)}


def set_expert_status(session: Session, name: str, status: str) -> Expert:
    expert = require_expert(session, name)
    expert.status = str(status)
    session.flush()
    return expert


# ---- routing examples ------------------------------------------------------------------


def add_routing_examples(
    session: Session, label: str, texts: Iterable[str], split: str, source: str
) -> int:
    rows = [RoutingExample(label=label, text=t, split=split, source=source) for t in texts]
    session.add_all(rows)
    session.flush()
    return len(rows)


def routing_examples(session: Session, labels: Sequence[str] | None = None) -> list[RoutingExample]:
    query = select(RoutingExample).order_by(RoutingExample.id)
    if labels is not None:
        query = query.where(RoutingExample.label.in_(labels))
    return list(session.scalars(query))


# ---- router versions -------------------------------------------------------------------


def next_router_version(session: Session) -> int:
    return int(session.scalar(select(func.coalesce(func.max(RouterVersion.version), 0))) or 0) + 1


def add_router_version(session: Session, **fields: Any) -> RouterVersion:
    router = RouterVersion(**fields)
    session.add(router)
    session.flush()
    return router


def active_router(session: Session) -> RouterVersion | None:
    return session.scalar(select(RouterVersion).where(RouterVersion.status == RouterStatus.ACTIVE.value))


def require_active_router(session: Session) -> RouterVersion:
    router = active_router(session)
    if router is None:
        raise RouterNotTrainedError("No router is active yet; run `moe router train`.")
    return router


def get_router(session: Session, version: int) -> RouterVersion:
    router = session.scalar(select(RouterVersion).where(RouterVersion.version == version))
    if router is None:
        raise NotFoundError(f"Router version {version} does not exist; `moe router list` shows them.")
    return router


def list_routers(session: Session) -> list[RouterVersion]:
    return list(session.scalars(select(RouterVersion).order_by(RouterVersion.version)))


def promote_router(session: Session, version: int) -> RouterVersion:
    router = get_router(session, version)
    session.execute(update(RouterVersion).where(RouterVersion.status == RouterStatus.ACTIVE.value)
                    .values(status=RouterStatus.RETIRED.value))
    router.status = RouterStatus.ACTIVE.value
    router.promoted_at = utcnow()
    session.flush()
    return router


def rollback_router(session: Session) -> RouterVersion:
    """Re-activate the most recently promoted router before the active one."""
    current = active_router(session)
    query = select(RouterVersion).where(RouterVersion.promoted_at.is_not(None),
                                        RouterVersion.status != RouterStatus.ACTIVE.value)
    if current is not None and current.promoted_at is not None:
        query = query.where(RouterVersion.promoted_at < current.promoted_at)
    previous = session.scalar(query.order_by(RouterVersion.promoted_at.desc()))
    if previous is None:
        raise NotFoundError("There is no earlier promoted router to roll back to.")
    if current is not None:
        current.status = RouterStatus.RETIRED.value
    previous.status = RouterStatus.ACTIVE.value
    session.flush()
    return previous


# ---- request logs and feedback ---------------------------------------------------------


def add_request_logs(session: Session, rows: Iterable[dict[str, Any]]) -> int:
    """Insert request-log rows; rows already present (a replayed spill) are skipped, so replay is idempotent."""
    rows = list(rows)
    ids = [r["request_id"] for r in rows]
    existing = set(session.scalars(select(RequestLog.request_id).where(RequestLog.request_id.in_(ids))))
    fresh = [RequestLog(**r) for r in rows if r["request_id"] not in existing]
    session.add_all(fresh)
    session.flush()
    return len(fresh)


def get_request_log(session: Session, request_id: str) -> RequestLog | None:
    return session.get(RequestLog, request_id)


def add_feedback(session: Session, request_id: str, expert: str | None, rating: float | None) -> Feedback:
    feedback = Feedback(request_id=request_id, expert=expert, rating=rating)
    session.add(feedback)
    session.flush()
    return feedback


def count_request_logs(session: Session, since: datetime | None = None) -> int:
    query = select(func.count()).select_from(RequestLog)
    if since is not None:
        query = query.where(RequestLog.created_at >= since)
    return int(session.scalar(query) or 0)


def routed_top_experts(session: Session, since: datetime) -> dict[str | None, int]:
    """Requests the router decided (no expert forced) since `since`, counted by their top expert ('base' or
    None: the bare backbone answered). Counted in SQL: a day of traffic can be millions of rows."""
    top = RequestLog.experts[(0, "name")].as_string()
    query = (select(top, func.count()).where(RequestLog.created_at >= since, RequestLog.forced_expert.is_(None))
             .group_by(top))
    return {name: int(count) for name, count in session.execute(query)}


# ---- jobs ------------------------------------------------------------------------------


def create_job(session: Session, kind: str, message: str = "") -> Job:
    job = Job(id=str(uuid.uuid4()), kind=kind, message=message)
    session.add(job)
    session.flush()
    return job


def update_job(session: Session, job_id: str, **fields: Any) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFoundError(f"Job {job_id} does not exist.")
    for key, value in fields.items():
        setattr(job, key, value)
    session.flush()
    return job


def get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFoundError(f"Job {job_id} does not exist.")
    return job
