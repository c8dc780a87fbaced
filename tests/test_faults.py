"""Faults on the request path, in-process: the registry database away, a pool replica that died, a pool that
cannot list its experts. Requests keep being answered, or fail as a clean 503 with Retry-After, never a 500.
(bench/faults.py injects the same faults into the real Ray service under load.)"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError
from sqlalchemy.orm import sessionmaker

from api.serve_app import RayPoolClient
from core.errors import OverloadedError, PoolUnavailableError
from experts.backbone import load_backbone
from experts.engine import GenerationRequest, TokenEvent
from registry import repository as repo
from registry.db import make_engine
from tests.conftest import tiny_settings
from tests.test_api import chat, running_service


@pytest.fixture(scope="module")
def shared_service(tmp_path_factory, tiny_backbone_dir):
    config = tiny_settings(tmp_path_factory.mktemp("faults") / "home", tiny_backbone_dir)
    with running_service(config, load_backbone(config)) as running:
        yield running


@pytest.fixture
def database_down(shared_service, tmp_path):
    """Points the gateway, the router service and the log writer at a database that cannot be opened."""
    _, gateway, sessions = shared_service
    dead = sessionmaker(make_engine(f"sqlite:///{tmp_path / 'gone' / 'registry.db'}"))
    gateway.sessions = gateway.routing.sessions = gateway.log_writer.sessions = dead
    gateway.routing.checked_at = 0.0  # the next routed request re-reads the registry
    yield
    gateway.sessions = gateway.routing.sessions = gateway.log_writer.sessions = sessions


def test_requests_are_answered_while_the_database_is_down(shared_service, database_down):
    client, gateway, _ = shared_service
    spilled = gateway.log_writer.spilled
    routed = chat(client)
    assert routed.status_code == 200, routed.text
    assert routed.json()["moe"]["router_version"] == 1  # routed with the loaded router
    assert chat(client, model="medical", stream=True).status_code == 200
    assert client.post("/v1/route", json={"text": "my knee hurts"}).status_code == 200
    gateway.log_writer.flush()
    assert gateway.log_writer.spilled >= spilled + 2
    # what needs the registry is a 503 to retry, not a 500
    for response in (client.post("/v1/feedback", json={"request_id": routed.json()["id"], "rating": 1}),
                     client.get("/admin/experts", headers={"Authorization": "Bearer admin-secret"})):
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "5"
        assert response.json()["error"]["code"] == "database_unavailable"


def test_spilled_rows_are_replayed_when_the_database_is_back(shared_service, database_down):
    client, gateway, sessions = shared_service
    answered = chat(client).json()["id"]
    gateway.log_writer.flush()
    replayed = gateway.log_writer.replayed
    gateway.sessions = gateway.routing.sessions = gateway.log_writer.sessions = sessions  # the database is back
    feedback = client.post("/v1/feedback", json={"request_id": answered, "rating": 1})  # flushes the log first
    assert feedback.status_code == 200, feedback.text
    assert gateway.log_writer.replayed > replayed
    assert not gateway.log_writer.spill_file.exists()


class _DyingGenerate:
    """Stands in for `handle.options(stream=True).generate.remote(...)` of a replica that dies mid-stream."""

    def __init__(self, error: BaseException, events: int) -> None:
        self.error, self.events = error, events

    def options(self, **_):
        return self

    @property
    def generate(self):
        return self

    def remote(self, request, _coalesce=False):
        async def stream():
            for i in range(self.events):
                yield TokenEvent(request.request_id, str(i), None, len(request.prompt_ids), i + 1)
            raise self.error

        return stream()


@pytest.mark.parametrize(("error", "expected"), [(ActorDiedError(), PoolUnavailableError),
                                                 (BackPressureError(300, 256), OverloadedError)])
def test_pool_client_turns_replica_faults_into_retryable_errors(error, expected):
    client = RayPoolClient(_DyingGenerate(error, events=2), "default")

    async def consume() -> list[TokenEvent]:
        return [event async for event in client.stream(GenerationRequest([1, 2]))]

    with pytest.raises(expected) as caught:
        asyncio.run(consume())
    assert caught.value.status_code == 503 and caught.value.retry_after >= 1


class _FailingPool:
    name = "default"

    def __init__(self, inner) -> None:
        self.inner, self.fail = inner, False

    def stream(self, request, coalesce=False):
        return self.inner.stream(request, coalesce)

    async def experts(self) -> list[str]:
        if self.fail:
            raise TimeoutError("replica restarting")
        return await self.inner.experts()


def test_a_pool_that_cannot_list_its_experts_keeps_its_placement(shared_service):
    client, gateway, _ = shared_service
    original = gateway.pools
    pool = _FailingPool(original[0])
    gateway.pools = [pool]
    try:
        assert sorted(asyncio.run(gateway.refresh_placement(force=True))) == ["finance", "medical"]
        pool.fail = True
        assert sorted(asyncio.run(gateway.refresh_placement(force=True))) == ["finance", "medical"]
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["auto", "finance", "medical"]
        assert chat(client, model="finance").status_code == 200
    finally:
        gateway.pools = original


def test_a_replica_that_died_mid_request_is_a_clean_503(shared_service):
    client, gateway, sessions = shared_service
    original = gateway.pools
    gateway.pools = [RayPoolClient(_DyingGenerate(ActorDiedError(), events=0), "default")]
    gateway._placement = {name: gateway.pools[0] for name in ("finance", "medical")}
    gateway._placement_at = float("inf")  # keep this placement for the test
    try:
        for stream in (False, True):
            response = chat(client, model="finance", stream=stream)
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "2"
            assert response.json()["error"]["code"] == "pool_unavailable"
            request_id = response.headers["x-moe-request-id"]  # the failed attempt is in the log, by this id
            gateway.log_writer.flush()
            with sessions() as session:
                assert repo.get_request_log(session, request_id).status_code == 503
    finally:
        gateway.pools = original
        gateway._placement_at = 0.0


def test_overload_is_a_503_with_retry_after_not_a_timeout(shared_service):
    """More concurrent requests than the engine queue holds: the surplus is refused at once (503 +
    Retry-After), the rest answered; nothing waits forever, nothing is a 500."""
    client, gateway, _ = shared_service
    limit = gateway.settings.max_queue
    gateway.settings.max_queue = 1

    async def burst() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
            body = {"model": "medical", "max_tokens": 8, "temperature": 0,
                    "messages": [{"role": "user", "content": "my knee is swollen"}]}
            return await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(24)))

    try:
        responses = asyncio.run(asyncio.wait_for(burst(), timeout=60))
    finally:
        gateway.settings.max_queue = limit
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 503}, statuses
    refused = [r for r in responses if r.status_code == 503]
    assert all(r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded" for r in refused)
