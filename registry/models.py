"""SQLAlchemy 2.0 models: the source of truth for experts, router versions, request logs and feedback."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class ExpertStatus(enum.StrEnum):
    """Lifecycle of an expert (stored as its string value)."""

    ACTIVE = "active"
    """Served and routed."""
    UNROUTED = "unrouted"
    """Served by name; the router does not pick it yet."""
    RETIRED = "retired"
    """Neither served nor routed; history kept."""


SERVED_STATUSES = (ExpertStatus.ACTIVE, ExpertStatus.UNROUTED)
"""Experts the pools load and `model=<expert>` may name."""


class RouterStatus(enum.StrEnum):
    """Lifecycle of a router version (stored as its string value)."""

    CANDIDATE = "candidate"
    ACTIVE = "active"
    REJECTED = "rejected"
    RETIRED = "retired"


class Base(DeclarativeBase):
    type_annotation_map: ClassVar = {dict[str, Any]: JSON, list[Any]: JSON}


class Expert(Base):
    __tablename__ = "experts"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(48), unique=True, index=True)
    description: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(16), default=ExpertStatus.ACTIVE.value)
    """An ExpertStatus value."""
    current_version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    versions: Mapped[list[ExpertVersion]] = relationship(
        back_populates="expert", order_by="ExpertVersion.version", cascade="all, delete-orphan"
    )


class ExpertVersion(Base):
    __tablename__ = "expert_versions"
    __table_args__ = (UniqueConstraint("expert_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    expert_id: Mapped[int] = mapped_column(ForeignKey("experts.id"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    adapter_path: Mapped[str] = mapped_column(Text)
    backbone_fingerprint: Mapped[str] = mapped_column(String(64))
    rank: Mapped[int] = mapped_column(Integer)
    target_modules: Mapped[list[Any]] = mapped_column(default=list)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    source: Mapped[str] = mapped_column(String(16), default="data")
    """data (trained here) or adapter (imported)."""
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    expert: Mapped[Expert] = relationship(back_populates="versions")


class RoutingExample(Base):
    """A labelled routing prompt: the experts' own prompts (seed/data) and labels from feedback."""

    __tablename__ = "routing_examples"

    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column(String(48), index=True)
    """An expert name or 'base'."""
    text: Mapped[str] = mapped_column(Text)
    split: Mapped[str] = mapped_column(String(8), default="train")
    source: Mapped[str] = mapped_column(String(16), default="data")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class RouterVersion(Base):
    __tablename__ = "router_versions"

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(Integer, unique=True, index=True)
    path: Mapped[str] = mapped_column(Text)
    experts: Mapped[list[Any]] = mapped_column(default=list)
    """Gate columns in order (expert names, then 'base')."""
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    data_summary: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default=RouterStatus.CANDIDATE.value)
    """A RouterStatus value."""
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class RequestLog(Base):
    __tablename__ = "request_logs"

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    endpoint: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(48))
    forced_expert: Mapped[str | None] = mapped_column(String(48), nullable=True)
    experts: Mapped[list[Any]] = mapped_column(default=list)
    router_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    prompt_hash: Mapped[str] = mapped_column(String(64))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    status_code: Mapped[int] = mapped_column(Integer, default=200)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    user: Mapped[str | None] = mapped_column(String(256), nullable=True)
    """The OpenAI request's `user` (the caller's end-user id), as sent."""


class Feedback(Base):
    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    expert: Mapped[str | None] = mapped_column(String(48), nullable=True)
    rating: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    """queued, running, succeeded, failed."""
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
