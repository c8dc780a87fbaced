"""The HTTP API in-process (no Ray): OpenAI shapes, routing, streaming, errors, logs, feedback, metrics,
admin auth. The same app runs behind Ray Serve in the integration tests."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from fastapi.testclient import TestClient
from peft import LoraConfig, get_peft_model
from pydantic import SecretStr
from sqlalchemy.orm import sessionmaker

from api.app import create_app
from api.gateway import Gateway
from api.metrics import Metrics
from experts.adapters import write_metadata
from experts.backbone import load_backbone
from experts.engine import GenerationRequest, SamplingParams, TokenEvent
from pipelines.train_expert import register_expert
from pipelines.train_router import make_encoder, train_router
from registry import repository as repo
from registry.db import session_factory
from registry.request_log import RequestLogWriter
from router.gate import BASE
from router.service import RoutingService
from router.training import RouterTrainConfig
from serving.pool import ExpertPoolCore, LocalPoolClient
from tests.conftest import DOMAIN_PROMPTS, tiny_settings
from tests.test_router import GENERAL


def register_random_expert(settings, sessions, backbone, name, prompts, seed):
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(backbone.model),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    path = settings.experts_dir / name / "v1"
    model.save_pretrained(path, safe_serialization=True)
    write_metadata(path, {"backbone_fingerprint": backbone.fingerprint})
    with sessions.begin() as session:
        register_expert(session, name=name, description=f"{name} expert", adapter_path=str(path), backbone=backbone,
                        rank=4, target_modules=["q_proj", "v_proj"], metrics={}, source="adapter",
                        routing_train=prompts[:-3], routing_val=prompts[-3:], run_id=None)


@contextmanager
def running_service(settings, backbone) -> Iterator[tuple[TestClient, Gateway, sessionmaker]]:
    """The app over an in-process pool: two random experts, a trained router, admin token 'admin-secret'."""
    settings.admin_token = SecretStr("admin-secret")
    settings.ensure_dirs()
    sessions = session_factory(settings)
    for seed, (name, prompts) in enumerate(DOMAIN_PROMPTS.items()):
        register_random_expert(settings, sessions, backbone, name, prompts, seed)
    with sessions.begin() as session:
        repo.add_routing_examples(session, BASE, GENERAL[:-3], "train", "seed")
        repo.add_routing_examples(session, BASE, GENERAL[-3:], "val", "seed")
    train_router(settings, sessions, make_encoder(backbone.model, backbone.tokenizer), backbone.fingerprint,
                 RouterTrainConfig(epochs=20))
    router_backbone = copy.deepcopy(backbone)  # the router owns its copy, as in the ingress
    routing = RoutingService(settings, sessions, router_backbone.model, router_backbone.tokenizer, own_backbone=True)
    routing.refresh()
    metrics = Metrics()  # one registry for the gateway and the in-process pool, as one process serves both
    pool = ExpertPoolCore(settings, sessions, backbone, metrics=metrics.registry)
    writer = RequestLogWriter(sessions, settings.spill_dir / "requests.jsonl", flush_ms=50).start()
    gateway = Gateway(settings, sessions, backbone.tokenizer, routing, [LocalPoolClient(pool)], writer, metrics)
    try:
        yield TestClient(create_app(lambda: gateway)), gateway, sessions
    finally:
        writer.stop()
        pool.close()


@pytest.fixture
def service(settings, backbone):
    """A fresh service, for tests that change what it serves."""
    with running_service(settings, backbone) as running:
        yield running


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_backbone_dir):
    """One service for the tests that leave its experts and routers as they found them (saves a setup each)."""
    config = tiny_settings(tmp_path_factory.mktemp("api") / "home", tiny_backbone_dir)
    with running_service(config, load_backbone(config)) as running:
        yield running


def chat(client, model="auto", **extra):
    body = {"model": model, "messages": [{"role": "user", "content": "I have a bad headache and fever"}],
            "max_tokens": 6, "temperature": 0, **extra}
    return client.post("/v1/chat/completions", json=body)


def test_routed_and_forced_chat(shared):
    client, gateway, sessions = shared
    routed = chat(client)
    assert routed.status_code == 200, routed.text
    body = routed.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["moe"]["router_version"] == 1 and 0 < body["moe"]["confidence"] <= 1
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    forced = chat(client, model="finance").json()
    assert forced["moe"]["experts"] == [{"name": "finance", "weight": 1.0}] and forced["moe"]["confidence"] is None
    text = client.post("/v1/completions", json={"model": "medical", "prompt": "fever", "max_tokens": 4}).json()
    assert text["object"] == "text_completion" and text["moe"]["experts"][0]["name"] == "medical"
    gateway.log_writer.flush()
    with sessions() as session:
        rows = {r: repo.get_request_log(session, r) for r in (body["id"], forced["id"], text["id"])}
    assert all(rows.values())
    assert rows[forced["id"]].forced_expert == "finance"
    assert rows[body["id"]].router_version == 1
    assert rows[body["id"]].completion_tokens == body["usage"]["completion_tokens"]


def test_streaming_sse(shared):
    client, _, _ = shared
    with client.stream("POST", "/v1/chat/completions", json={
        "model": "auto", "stream": True, "max_tokens": 5, "temperature": 0,
        "messages": [{"role": "user", "content": "my order never arrived"}]}) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "usage" in chunks[-1] and all("moe" in c for c in chunks)


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
        ({"model": "auto", "messages": [{"role": "user", "content": "word " * 400}]}, 400, "limit is 256"),
        ({"model": "auto", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "max_tokens"),
        ({"model": "auto", "messages": []}, 422, "messages"),
        ({"model": "auto", "messages": [{"role": "robot", "content": "hi"}]}, 422, "messages.0.role"),
        ({"model": "auto", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 422, "temperature"),
    ],
)
def test_bad_requests_are_4xx(shared, body, status, needle):
    client, _, _ = shared
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]["message"]


def test_malformed_json_and_oversized_body(service):
    client, gateway, _ = service
    response = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422
    gateway.settings.max_body_bytes = 2048
    response = client.post("/v1/chat/completions", json={"model": "auto", "messages": [
        {"role": "user", "content": "x" * 5000}]})
    assert response.status_code == 413


def test_models_route_feedback_health_metrics(shared):
    client, _, _ = shared
    models = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert models == ["auto", "finance", "medical"]
    route = client.post("/v1/route", json={"text": "should I invest in index funds", "top_k": 2}).json()
    assert len(route["experts"]) <= 2 and abs(sum(e["weight"] for e in route["experts"]) - 1) < 1e-3
    assert client.post("/v1/route", json={}).status_code == 400
    answer = chat(client).json()
    ok = client.post("/v1/feedback", json={"request_id": answer["id"], "expert": "medical", "rating": 5})
    assert ok.status_code == 200
    assert client.post("/v1/feedback", json={"request_id": "req-missing", "rating": 1}).status_code == 404
    assert client.post("/v1/feedback", json={"request_id": answer["id"], "expert": "nobody"}).status_code == 404
    assert client.get("/healthz").json()["status"] == "ok"
    metrics = client.get("/metrics").text
    assert 'moe_requests_total{endpoint="chat",expert=' in metrics


def test_admin_needs_token_and_retire_stops_routing(service):
    client, gateway, _ = service
    assert client.get("/admin/experts").status_code == 401
    assert client.get("/admin/experts", headers={"Authorization": "Bearer wrong"}).status_code == 403
    auth = {"Authorization": "Bearer admin-secret"}
    assert {e["name"] for e in client.get("/admin/experts", headers=auth).json()} == {"medical", "finance"}
    assert client.post("/admin/experts/finance/retire", headers=auth).status_code == 200
    decision = asyncio.run(gateway.route_only("should I invest in index funds", 3))
    assert "finance" not in [name for name, _ in decision.experts]
    assert client.post("/admin/experts/ghost/retire", headers=auth).status_code == 404


def _wait_job(client, job_id, auth, timeout=120.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/admin/jobs/{job_id}", headers=auth).json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def test_admin_registers_an_expert_as_a_job(service, domain_data, tmp_path):
    client, gateway, sessions = service
    auth = {"Authorization": "Bearer admin-secret"}
    lines = [json.loads(line) for line in domain_data["finance"].read_text().splitlines()]
    data = tmp_path / "tax.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "tax " + r["prompt"], "response": r["response"]})
                              for r in lines) + "\n")
    response = client.post("/admin/experts", headers=auth, json={"name": "tax", "data_path": str(data), "epochs": 1})
    assert response.status_code == 202, response.text
    job = _wait_job(client, response.json()["job_id"], auth)
    assert job["status"] == "succeeded", job
    assert job["result"]["expert_version"] == 1 and job["result"]["router_version"] == 2
    with sessions() as session:
        assert repo.require_expert(session, "tax").status in ("active", "unrouted")
    # the pool picks the new adapter up from the registry (the Ray pool polls; here we sync once)
    pool = gateway.pools[0].core
    assert "tax" in pool.sync()["added"]
    assert chat(client, model="tax").status_code == 200


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"name": "Bad Name", "data_path": "/x.jsonl"}, 400),
        ({"name": "medical", "data_path": "/x.jsonl"}, 409),
        ({"name": "newone"}, 400),
        ({"name": "newone", "data_path": "/x", "adapter_path": "/y"}, 400),
    ],
)
def test_admin_register_rejections_change_nothing(shared, body, status):
    client, _, sessions = shared
    auth = {"Authorization": "Bearer admin-secret"}
    assert client.post("/admin/experts", headers=auth, json=body).status_code == status
    with sessions() as session:
        assert sorted(e.name for e in repo.list_experts(session)) == ["finance", "medical"]


def test_pickled_adapter_job_fails_and_registers_nothing(shared, tmp_path):
    client, _, sessions = shared
    auth = {"Authorization": "Bearer admin-secret"}
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    job_id = client.post("/admin/experts", headers=auth, json={"name": "evil", "adapter_path": str(folder)}).json()
    job = _wait_job(client, job_id["job_id"], auth)
    assert job["status"] == "failed" and "only safetensors" in job["message"]
    with sessions() as session:
        assert repo.get_expert(session, "evil") is None


def test_non_streamed_answers_cross_the_pool_boundary_once(shared):
    """A non-streamed request gets one event from the pool (the whole text and the final counts); a streamed one
    gets one per token; both carry the same greedy answer, and the HTTP answer is that text."""
    client, gateway, _ = shared
    core = gateway.pools[0].core
    prompt = gateway.tokenizer("I have a bad headache and fever")["input_ids"]

    async def events(coalesce: bool) -> list[TokenEvent]:
        request = GenerationRequest(prompt, [("medical", 1.0)], SamplingParams(max_tokens=6, temperature=0))
        return [event async for event in core.stream(request, coalesce)]

    streamed, coalesced = asyncio.run(events(False)), asyncio.run(events(True))
    assert len(streamed) > 1 and len(coalesced) == 1
    assert coalesced[0].text == "".join(e.text for e in streamed)
    assert {k: getattr(coalesced[0], k) for k in ("finish_reason", "prompt_tokens", "completion_tokens")} == {
        k: getattr(streamed[-1], k) for k in ("finish_reason", "prompt_tokens", "completion_tokens")}
    body = {"model": "medical", "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": "my knee is swollen after running"}]}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert whole == "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
