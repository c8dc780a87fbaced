"""Verb: routing statistics from the request log (`moe stats`): per expert traffic share, gate confidence
(mean and distribution), abstain rate, tokens, latency p50/p95, feedback accuracy, and the drift of the
routing share against the previous window of the same length. Printed as a table and logged to MLflow as
metrics with plots."""

from __future__ import annotations

import tempfile
from datetime import datetime, timedelta
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import pandas as pd
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings
from pipelines.log_labels import read_feedback, read_logs
from pipelines.plots import save_bar_chart
from pipelines.tracking import mlflow_run
from registry.models import utcnow
from router.gate import BASE


def _top_expert(experts) -> str:
    return experts[0]["name"] if experts else BASE


def compute_stats(logs: pd.DataFrame, feedback: pd.DataFrame, previous: pd.DataFrame) -> pd.DataFrame:
    if logs.empty:
        return pd.DataFrame()
    logs = logs.assign(expert=logs["experts"].map(_top_expert))
    routed = logs[logs["forced_expert"].isna()]
    grouped = logs.groupby("expert")
    stats = pd.DataFrame({
        "requests": grouped.size(),
        "share": grouped.size() / len(logs),
        "prompt_tokens": grouped["prompt_tokens"].sum(),
        "completion_tokens": grouped["completion_tokens"].sum(),
        "latency_p50_ms": grouped["latency_ms"].quantile(0.5),
        "latency_p95_ms": grouped["latency_ms"].quantile(0.95),
    })
    if not routed.empty:
        by_routed = routed.groupby("expert")
        stats["confidence_mean"] = by_routed["confidence"].mean()
        stats["confidence_p10"] = by_routed["confidence"].quantile(0.1)
        stats["abstain_rate"] = (routed["expert"] == BASE).groupby(routed["expert"]).mean()
    if not feedback.empty:
        judged = feedback[feedback["expert"].notna()].merge(logs[["request_id", "expert"]], on="request_id",
                                                            suffixes=("_true", ""))
        if not judged.empty:
            judged = judged.assign(correct=(judged["expert"] == judged["expert_true"]).astype(float))
            stats["feedback_accuracy"] = judged.groupby("expert")["correct"].mean()
    if not previous.empty:
        before = previous["experts"].map(_top_expert).value_counts(normalize=True)
        stats["share_drift"] = stats["share"] - before.reindex(stats.index).fillna(0.0)
    return stats.sort_values("requests", ascending=False)


def routing_stats(settings: Settings, sessions: sessionmaker[Session], window: timedelta = timedelta(days=1),
                  now: datetime | None = None, log_to_mlflow: bool = True) -> pd.DataFrame:
    now = now or utcnow()
    with sessions() as session:
        logs = read_logs(session, now - window)
        previous = read_logs(session, now - 2 * window)
        feedback = read_feedback(session, now - window)
    previous = previous[previous["created_at"] < now - window] if not previous.empty else previous
    stats = compute_stats(logs, feedback, previous)
    if log_to_mlflow and not stats.empty:
        with mlflow_run(settings, run_name="routing-stats", tags={"kind": "routing_stats"}):
            mlflow.log_params({"window_hours": window.total_seconds() / 3600, "requests": len(logs)})
            for expert, row in stats.iterrows():
                mlflow.log_metrics({f"{k}_{expert}": float(v) for k, v in row.items() if pd.notna(v)})
            with tempfile.TemporaryDirectory() as tmp:
                mlflow.log_artifact(str(save_bar_chart(stats["share"].to_dict(), Path(tmp) / "routing_share.png",
                                                       "Routing share", "share of requests")))
                if "confidence_mean" in stats:
                    fig, ax = plt.subplots(figsize=(6, 3.5))
                    routed = logs[logs["forced_expert"].isna()]
                    for expert, group in routed.groupby(routed["experts"].map(_top_expert)):
                        ax.hist(group["confidence"].dropna(), bins=20, range=(0, 1), alpha=0.5, label=expert)
                    ax.set_xlabel("gate confidence")
                    ax.legend()
                    fig.tight_layout()
                    fig.savefig(Path(tmp) / "confidence.png", dpi=110)
                    plt.close(fig)
                    mlflow.log_artifact(str(Path(tmp) / "confidence.png"))
                mlflow.log_text(stats.to_csv(), "routing_stats.csv")
    return stats
