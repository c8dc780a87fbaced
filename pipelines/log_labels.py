"""Routing labels from the service's own traffic, read with pandas from the registry.

Sources, strongest first: feedback that names the right expert (`/v1/feedback`), then requests whose
client forced an expert (`model="<expert>"`). Optional confident pseudo-labels (off by default). Rows whose
prompt was not stored (hash-only logging) cannot become labels. Deduplicated by normalised text, the
newest, strongest label winning; time-ordered.
"""

from __future__ import annotations

import math
from datetime import datetime

import pandas as pd
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.text import text_key
from experts.seed import split_digest
from registry.models import Feedback, RequestLog

SOURCE_RANK = {"feedback": 0, "forced": 1, "pseudo": 2}


def read_logs(session: Session, since: datetime | None = None) -> pd.DataFrame:
    query = select(RequestLog)
    if since is not None:
        query = query.where(RequestLog.created_at >= since)
    frame = pd.read_sql(query, session.connection())
    return frame


def read_feedback(session: Session, since: datetime | None = None) -> pd.DataFrame:
    query = select(Feedback)
    if since is not None:
        query = query.where(Feedback.created_at >= since)
    return pd.read_sql(query, session.connection())


def log_labels(session: Session, known_labels: list[str], since: datetime | None = None,
               pseudo_label_confidence: float | None = None) -> pd.DataFrame:
    """Columns: text, label, source, created_at, split ('train'/'val', see `hold_out`)."""
    logs = read_logs(session, since)
    columns = ["text", "label", "source", "created_at", "split"]
    if logs.empty:
        return pd.DataFrame(columns=columns)
    logs = logs[logs["prompt"].notna() & (logs["status_code"] < 400)]
    parts = []
    feedback = read_feedback(session, since)
    if not feedback.empty:
        named = feedback[feedback["expert"].notna()][["request_id", "expert", "created_at"]]
        joined = named.merge(logs[["request_id", "prompt"]], on="request_id")
        parts.append(pd.DataFrame({"text": joined["prompt"], "label": joined["expert"], "source": "feedback",
                                   "created_at": joined["created_at"]}))
    forced = logs[logs["forced_expert"].notna()]
    parts.append(pd.DataFrame({"text": forced["prompt"], "label": forced["forced_expert"], "source": "forced",
                               "created_at": forced["created_at"]}))
    if pseudo_label_confidence is not None:
        routed = logs[logs["forced_expert"].isna() & (logs["confidence"] >= pseudo_label_confidence)]
        top = routed["experts"].map(lambda experts: experts[0]["name"] if experts else None)
        parts.append(pd.DataFrame({"text": routed["prompt"], "label": top, "source": "pseudo",
                                   "created_at": routed["created_at"]}))
    labels = pd.concat(parts, ignore_index=True)
    labels = labels[labels["label"].isin(known_labels)]
    if labels.empty:
        return pd.DataFrame(columns=columns)
    labels["key"] = labels["text"].map(text_key)
    labels["rank"] = labels["source"].map(SOURCE_RANK)
    labels = labels.sort_values(["rank", "created_at"], ascending=[True, False]).drop_duplicates("key")
    labels = labels.sort_values("created_at").reset_index(drop=True)
    labels["split"] = hold_out(labels)
    return labels[columns]


def hold_out(labels: pd.DataFrame) -> pd.Series:
    """'val' for one in five rows of every label (at least one when a label has two or more), chosen by the
    text's SHA-1 order, else 'train'. Log labels are few, so a per-row hash test (one in five on average) can
    hold out 2 of 40 corrected prompts, too few for the promotion gate to see what a retrain fixed; ranking by
    the same hash keeps the choice reproducible and independent of arrival order."""
    split = pd.Series("train", index=labels.index)
    digests = labels["text"].map(split_digest)
    for _, group in digests.groupby(labels["label"]):
        if len(group) >= 2:
            split[group.sort_values().index[: math.ceil(len(group) / 5)]] = "val"
    return split
