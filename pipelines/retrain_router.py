"""Verb: retrain the router from the service's logs (`moe router retrain --from-logs [--since ...]`).

Labels come from feedback and forced-expert requests (pipelines.log_labels); the experts' own training
prompts are replayed so nothing is forgotten. The candidate and the active router are evaluated on the
same held-out set (held-out log labels plus the experts' validation prompts) and the candidate is promoted
only when it wins (pipelines.promotion.compare).
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import datetime

import pandas as pd
from sqlalchemy.orm import Session, sessionmaker

from core.errors import InvalidInputError
from core.settings import Settings
from pipelines.log_labels import log_labels
from pipelines.train_router import Encode, LabelledSet, RouterReport, train_router
from registry import repository as repo
from router.gate import BASE

logger = logging.getLogger(__name__)


def require_log_labels(sessions: sessionmaker[Session], since: datetime | None = None,
                       pseudo_label_confidence: float | None = None, min_labels: int = 1) -> pd.DataFrame:
    """The labels a retrain would learn from (see `log_labels`); raises when there are too few. Needs no model,
    so the command line calls it before the backbone loads."""
    with sessions() as session:
        known = [e.name for e in repo.served_experts(session)] + [BASE]
        labels = log_labels(session, known, since, pseudo_label_confidence)
    if len(labels) < min_labels:
        raise InvalidInputError(
            f"Only {len(labels)} labelled requests in the logs (need {min_labels}); send feedback with "
            "POST /v1/feedback or forced-expert requests first."
        )
    return labels


def retrain_from_logs(settings: Settings, sessions: sessionmaker[Session], encode: Encode, fingerprint: str,
                      since: datetime | None = None, pseudo_label_confidence: float | None = None,
                      min_labels: int = 1, promote: str = "auto") -> RouterReport:
    labels = require_log_labels(sessions, since, pseudo_label_confidence, min_labels)
    train, val = LabelledSet(), LabelledSet()
    for row in labels.itertuples():
        (val if row.split == "val" else train).add(row.text, row.label, f"log:{row.source}")
    logger.info("Log labels: %s (train %d, val %d)", dict(Counter(labels["source"])), len(train.texts),
                len(val.texts))
    window = {"since": since.isoformat() if since else "all",
              "until": labels["created_at"].max().isoformat() if len(labels) else None}
    return train_router(settings, sessions, encode, fingerprint, extra_train=train, extra_val=val, promote=promote,
                        run_tags={"kind": "retrain_router", "window": str(window)})
