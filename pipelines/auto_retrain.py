"""The optional retrain trigger: once `MOE_ROUTER_RETRAIN_AFTER_LABELS` new labels (feedback that
names an expert, forced-expert requests) have arrived since the newest router version, start one
`retrain --from-logs` job. The candidate still has to win (gated promotion), so a trigger can never make
routing worse; a rejected candidate counts as a version, so the next try waits for N more labels."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings
from pipelines import jobs
from registry import repository as repo
from registry.models import Feedback, Job, RequestLog, RouterVersion

logger = logging.getLogger(__name__)

JOB_KIND = "auto_retrain_router"
BUSY = ("queued", "running")


def new_label_count(session: Session, since: datetime | None) -> int:
    """Labels the logs gained after `since` (all of them when None)."""
    feedback = select(func.count()).select_from(Feedback).where(Feedback.expert.is_not(None))
    forced = select(func.count()).select_from(RequestLog).where(RequestLog.forced_expert.is_not(None),
                                                                 RequestLog.status_code < 400)
    if since is not None:
        feedback = feedback.where(Feedback.created_at > since)
        forced = forced.where(RequestLog.created_at > since)
    return int(session.scalar(feedback) or 0) + int(session.scalar(forced) or 0)


def maybe_retrain(settings: Settings, sessions: sessionmaker[Session]) -> str | None:
    """Start a retrain job when the threshold is reached and none is in progress; returns its job id."""
    threshold = settings.router_retrain_after_labels
    if threshold <= 0:
        return None
    with sessions.begin() as session:
        busy = session.scalar(select(func.count()).select_from(Job).where(Job.kind == JOB_KIND,
                                                                         Job.status.in_(BUSY)))
        if busy:
            return None
        newest = session.scalar(select(func.max(RouterVersion.created_at)))
        count = new_label_count(session, newest)
        if count < threshold:
            return None
        job_id = repo.create_job(session, JOB_KIND, f"queued: {count} new labels since the last router").id
    logger.info("%d new routing labels (MOE_ROUTER_RETRAIN_AFTER_LABELS=%d): retraining the router, job %s",
                count, threshold, job_id)
    jobs.launch(jobs.router_job, settings.payload(), job_id, True)
    return job_id


async def retrain_forever(settings: Settings, sessions: sessionmaker[Session], every_s: float = 30.0) -> None:
    """The ingress runs this when the trigger is on; a failed check is logged and retried next round."""
    while True:
        await asyncio.sleep(every_s)
        try:
            await asyncio.to_thread(maybe_retrain, settings, sessions)
        except Exception:
            logger.exception("router retrain trigger check failed")
