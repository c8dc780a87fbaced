"""The optional retrain trigger: counts new labels since the newest router version, starts one job at the
threshold, never two at once, and is off at 0."""

from __future__ import annotations

from datetime import timedelta

from pipelines import auto_retrain, jobs
from registry import repository as repo
from registry.db import session_factory
from registry.models import utcnow
from tests.test_log_labels import _log


def test_trigger_fires_once_at_the_threshold(settings, monkeypatch):
    launched = []
    monkeypatch.setattr(jobs, "launch", lambda fn, *args: launched.append((fn, args)))  # the job boundary
    sessions = session_factory(settings)
    with sessions.begin() as s:
        repo.add_router_version(s, version=1, path="unused", experts=["medical", "base"], metrics={},
                                data_summary={}, status="active", created_at=utcnow() - timedelta(minutes=30))
        _log(s, "old", "labelled before the router existed", forced="legal", minutes=60)
        _log(s, "a", "my knee hurts", minutes=5)
        _log(s, "b", "sue my landlord", forced="legal", minutes=4)
        _log(s, "c", "broken order", forced="support", minutes=3)
        repo.add_feedback(s, "a", "medical", None)
        repo.add_feedback(s, "a", None, 4.0)  # a rating alone names no expert: no label
    with sessions() as s:
        newest = repo.get_router(s, 1).created_at
        assert auto_retrain.new_label_count(s, newest) == 3  # feedback on a, forced b and c

    off = settings.model_copy(update={"router_retrain_after_labels": 0})
    assert auto_retrain.maybe_retrain(off, sessions) is None
    high = settings.model_copy(update={"router_retrain_after_labels": 4})
    assert auto_retrain.maybe_retrain(high, sessions) is None and not launched

    on = settings.model_copy(update={"router_retrain_after_labels": 3})
    job_id = auto_retrain.maybe_retrain(on, sessions)
    assert job_id is not None and len(launched) == 1
    fn, args = launched[0]
    assert fn is jobs.router_job and args[1] == job_id and args[2] is True  # from logs
    assert auto_retrain.maybe_retrain(on, sessions) is None  # one job at a time
    with sessions.begin() as s:
        repo.update_job(s, job_id, status="succeeded")
        repo.add_router_version(s, version=2, path="unused", experts=["medical", "base"], metrics={},
                                data_summary={}, status="rejected")
    assert auto_retrain.maybe_retrain(on, sessions) is None  # counting restarts at the newest version
    assert len(launched) == 1
