"""Integration: promotion and rollback through the admin API change the router the running service
uses, at once and with no failed request, while clients keep sending /v1/route and routed chat requests."""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass

import httpx
import pytest

from experts.seed import DEFAULT_ROUTER_DIR
from registry import repository as repo
from tests.live_service import ADMIN

pytestmark = pytest.mark.integration

AUTH = {"Authorization": f"Bearer {ADMIN}"}
TEXTS = ["I have had a fever and a sore throat for three days.", "Should I refinance my mortgage now?",
         "My package arrived broken, how do I get a refund?", "Can my landlord keep my deposit?"]


@dataclass
class Answer:
    started: float
    finished: float
    status: int
    router_version: int | None


def add_router_copy(live) -> int:
    """A second real router version: the shipped router's files registered under the next version number."""
    with live["sessions"].begin() as session:
        active = repo.active_router(session)
        version = repo.next_router_version(session)
        target = live["settings"].routers_dir / f"v{version}"
        shutil.copytree(DEFAULT_ROUTER_DIR, target)
        repo.add_router_version(session, version=version, path=str(target), experts=active.experts,
                                metrics=active.metrics, data_summary={"source": "test_router_swap copy"})
    return version


def traffic(url: str, stop: threading.Event, answers: list[Answer], worker: int) -> None:
    with httpx.Client(base_url=url, timeout=60) as http:
        i = worker
        while not stop.is_set():
            text = TEXTS[i % len(TEXTS)]
            started = time.monotonic()
            if i % 2:
                response = http.post("/v1/route", json={"text": text})
                version = response.json().get("router_version") if response.status_code == 200 else None
            else:
                response = http.post("/v1/chat/completions", json={
                    "model": "auto", "max_tokens": 2, "temperature": 0,
                    "messages": [{"role": "user", "content": text}]})
                version = response.json()["moe"]["router_version"] if response.status_code == 200 else None
            answers.append(Answer(started, time.monotonic(), response.status_code, version))
            i += 1


def wait_for_answers(answers: list[Answer], since: float, count: int, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(a.started > since for a in answers) < count and time.monotonic() < deadline:
        time.sleep(0.1)


def test_promote_and_rollback_switch_the_running_router_with_no_failed_request(live):
    url = live["url"]
    with live["sessions"]() as session:
        old = repo.active_router(session).version
    new = add_router_copy(live)
    answers: list[Answer] = []
    stop = threading.Event()
    workers = [threading.Thread(target=traffic, args=(url, stop, answers, w), daemon=True) for w in range(3)]
    for worker in workers:
        worker.start()
    try:
        wait_for_answers(answers, 0.0, 4)
        promote_sent = time.monotonic()
        promoted = httpx.post(f"{url}/admin/routers/{new}/promote", headers=AUTH, timeout=60)
        promoted_at = time.monotonic()
        assert promoted.status_code == 200 and promoted.json() == {"active": new}, promoted.text
        wait_for_answers(answers, promoted_at, 6)
        rollback_sent = time.monotonic()
        rolled = httpx.post(f"{url}/admin/routers/rollback", headers=AUTH, timeout=60)
        rolled_at = time.monotonic()
        assert rolled.status_code == 200 and rolled.json() == {"active": old}, rolled.text
        wait_for_answers(answers, rolled_at, 6)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
        with live["sessions"]() as session:
            active = repo.active_router(session).version
        if active != old:  # leave the service as the other tests expect it
            httpx.post(f"{url}/admin/routers/{old}/promote", headers=AUTH, timeout=60)

    assert answers and all(a.status == 200 for a in answers), [a.status for a in answers if a.status != 200]
    before = {a.router_version for a in answers if a.finished < promote_sent}
    between = {a.router_version for a in answers if a.started > promoted_at and a.finished < rollback_sent}
    after = {a.router_version for a in answers if a.started > rolled_at}
    assert before == {old} and between == {new} and after == {old}, (before, between, after)
    healthz = httpx.get(f"{url}/healthz", timeout=30).json()
    assert healthz["router_version"] == old
