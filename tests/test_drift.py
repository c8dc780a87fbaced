"""Learning from traffic on the real backbone and the shipped router: traffic drifts to a phrasing the router gets wrong
(health questions in Spanish), feedback corrects some of them, `retrain --from-logs` fixes the drift without
hurting the other experts; a worse label set is rejected and the active router stays."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from core.settings import Settings
from experts.seed import DEFAULT_ADAPTERS_DIR, DEFAULT_ROUTER_DIR, seed_prompts
from router.gate import BASE
from tests.live_service import home_with_shared_cache, missing_parts

pytestmark = pytest.mark.integration

DRIFT = Path(__file__).with_name("data") / "drift_medical_es.jsonl"


@pytest.fixture(scope="module")
def env(tmp_path_factory, shared_cache):
    reason = missing_parts()
    if reason:
        pytest.skip(reason)
    if not (DEFAULT_ROUTER_DIR / "router.json").is_file() or not DEFAULT_ADAPTERS_DIR.is_dir():
        pytest.skip("the shipped default experts and router are missing")
    from experts.backbone import load_backbone
    from pipelines.bootstrap import ensure_defaults
    from pipelines.train_router import backbone_encoder
    from registry.db import session_factory
    from router.service import RoutingService

    settings = Settings(home=home_with_shared_cache(tmp_path_factory, shared_cache, "drift-home"))
    sessions = session_factory(settings)
    backbone = load_backbone(settings)
    ensure_defaults(settings, sessions, backbone)
    routing = RoutingService(settings, sessions, backbone.model, backbone.tokenizer)
    routing.refresh()
    return {"settings": settings, "sessions": sessions, "backbone": backbone, "routing": routing,
            "encode": backbone_encoder(settings, backbone)}


def _log_with_feedback(sessions, texts, routing, label):
    from registry import repository as repo

    decisions = routing.route(texts)
    with sessions.begin() as session:
        for text, decision in zip(texts, decisions, strict=True):
            request_id = "req-" + uuid.uuid4().hex
            repo.add_request_logs(session, [{
                "request_id": request_id, "endpoint": "chat", "model": "auto", "experts": [
                    {"name": n, "weight": w} for n, w in decision.experts],
                "router_version": routing.version, "confidence": decision.confidence, "prompt": text,
                "prompt_hash": "h", "status_code": 200}])
            if label is not None:
                repo.add_feedback(session, request_id, label, None)


def _share(routing, texts, label):
    return sum(d.experts[0][0] == label for d in routing.route(texts)) / len(texts)


def test_feedback_fixes_drift_without_hurting_other_experts(env):
    from experts.data import load_texts
    from pipelines.retrain_router import retrain_from_logs

    texts = load_texts(DRIFT)
    logged, fresh = texts[:60], texts[60:]
    routing = env["routing"]
    before = _share(routing, fresh, "medical")
    corrected = logged[:40]  # feedback corrects some of the drifted requests, not all
    _log_with_feedback(env["sessions"], corrected, routing, "medical")
    _log_with_feedback(env["sessions"], logged[40:], routing, None)
    report = retrain_from_logs(env["settings"], env["sessions"], env["encode"], env["backbone"].fingerprint)
    assert report.promoted, report.reasons
    routing.refresh()
    after = _share(routing, fresh, "medical")
    assert after - before >= 0.20, (before, after)
    for label, stats in report.metrics["per_label"].items():
        if label == BASE:
            continue  # not an expert: guarded by overall accuracy (pipelines.promotion.compare)
        previous = report.active_metrics["per_label"][label]["recall"]
        assert stats["recall"] >= previous - 0.02, (label, previous, stats["recall"])


def test_worse_labels_are_rejected_and_the_active_router_stays(env):
    from pipelines.retrain_router import retrain_from_logs
    from registry import repository as repo

    with env["sessions"]() as session:
        active_before = repo.active_router(session).version
    legal_train, _ = seed_prompts("legal")
    # systematically wrong labels; 400 of them are plenty to pull legal prompts to finance, and each is encoded once
    _log_with_feedback(env["sessions"], legal_train[:400], env["routing"], "finance")
    report = retrain_from_logs(env["settings"], env["sessions"], env["encode"], env["backbone"].fingerprint)
    assert not report.promoted
    assert any("legal recall" in reason for reason in report.reasons), report.reasons
    with env["sessions"]() as session:
        assert repo.active_router(session).version == active_before
        assert repo.get_router(session, report.version).status == "rejected"
