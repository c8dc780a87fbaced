"""Labels from logs (feedback beats forced, dedup, hash-only rows skipped), routing stats, and a
retrain-from-logs run that learns a relabelled phrasing."""

from __future__ import annotations

from datetime import timedelta

from pipelines.log_labels import log_labels
from pipelines.routing_stats import routing_stats
from registry import repository as repo
from registry.db import session_factory
from registry.models import utcnow


def _log(session, request_id, prompt, forced=None, experts=None, confidence=0.9, minutes=0):
    repo.add_request_logs(session, [{
        "request_id": request_id, "endpoint": "chat", "model": forced or "auto", "forced_expert": forced,
        "experts": experts or [{"name": forced or "medical", "weight": 1.0}], "router_version": 1,
        "confidence": None if forced else confidence, "prompt": prompt, "prompt_hash": "h",
        "prompt_tokens": 10, "completion_tokens": 5, "latency_ms": 100.0 + minutes, "status_code": 200,
        "created_at": utcnow() - timedelta(minutes=minutes),
    }])


def test_labels_from_feedback_and_forced_requests(settings):
    sessions = session_factory(settings)
    with sessions.begin() as s:
        _log(s, "a", "my knee hurts when I run", minutes=5)
        _log(s, "b", "My knee  hurts when I run", forced="legal", minutes=3)  # same text, weaker source
        _log(s, "c", "sue my landlord", forced="legal", minutes=2)
        _log(s, "d", None, forced="legal", minutes=1)  # hash-only row: no text, no label
        _log(s, "e", "refund please", forced="nobody", minutes=1)  # unknown label: dropped
        repo.add_feedback(s, "a", "medical", 5)
    with sessions() as s:
        labels = log_labels(s, ["medical", "legal", "base"])
    # time-ordered by when the label arose: the forced request, then the (newer) feedback
    assert labels[["text", "label", "source"]].values.tolist() == [
        ["sue my landlord", "legal", "forced"],
        ["my knee hurts when I run", "medical", "feedback"],
    ]
    assert set(labels["split"]) <= {"train", "val"}


def test_hold_out_takes_one_in_five_of_every_label_reproducibly():
    import pandas as pd

    from pipelines.log_labels import hold_out

    texts = [f"consulta medica numero {i}" for i in range(40)] + [f"contract clause {i}" for i in range(7)] + ["hi"]
    frame = pd.DataFrame({"text": texts, "label": ["medical"] * 40 + ["legal"] * 7 + ["base"]})
    split = hold_out(frame)
    held = frame[split == "val"]["label"].value_counts().to_dict()
    assert held == {"medical": 8, "legal": 2}  # a lone label stays in training
    shuffled = frame.sample(frac=1.0, random_state=0)
    assert hold_out(shuffled).sort_index().tolist() == split.tolist()  # independent of arrival order


def test_routing_stats_table(settings):
    sessions = session_factory(settings)
    with sessions.begin() as s:
        for i in range(6):
            _log(s, f"r{i}", f"question {i}", experts=[{"name": "medical" if i < 4 else "finance", "weight": 1.0}],
                 confidence=0.5 + i / 20, minutes=i)
        _log(s, "old", "old question", experts=[{"name": "finance", "weight": 1.0}], minutes=60 * 30)
        repo.add_feedback(s, "r0", "medical", None)
        repo.add_feedback(s, "r1", "finance", None)
    stats = routing_stats(settings, sessions, window=timedelta(hours=24))
    assert stats.loc["medical", "requests"] == 4 and abs(stats.loc["medical", "share"] - 4 / 6) < 1e-9
    assert stats.loc["medical", "feedback_accuracy"] == 0.5
    assert stats.loc["medical", "share_drift"] > 0  # the previous window was all finance
    assert stats.loc["finance", "latency_p95_ms"] >= stats.loc["finance", "latency_p50_ms"]
