"""Integration: the real default backbone, the shipped experts and router, Ray Serve on 127.0.0.1, driven by
the official `openai` client; the `moe` command line on the same registry. One Ray instance per session."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experts.seed import DEFAULT_DOMAINS, seed_qa
from tests.live_service import ADMIN

pytestmark = pytest.mark.integration

DATA = Path(__file__).with_name("data")
MEDICAL = "I have had a fever of 39C and a sore throat for three days, and now my ears hurt. Should I see a doctor?"
FINANCE = "Should I pay off my student loans faster or put the money into my 401k?"


def _wait_logged(sessions, request_ids, timeout=15.0):
    from registry import repository as repo

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with sessions() as session:
            rows = {r: repo.get_request_log(session, r) for r in request_ids}
        if all(rows.values()):
            return rows
        time.sleep(0.25)
    raise AssertionError(f"not logged: {[r for r, row in rows.items() if row is None]}")


def test_openai_client_routed_forced_streaming_and_errors(live):
    import openai

    client = openai.OpenAI(base_url=live["url"] + "/v1", api_key="unused", max_retries=0)
    models = [m.id for m in client.models.list().data]
    assert models[0] == "auto" and set(DEFAULT_DOMAINS) <= set(models)

    routed = client.chat.completions.create(model="auto", messages=[{"role": "user", "content": MEDICAL}],
                                            max_tokens=24, temperature=0)
    moe = routed.model_extra["moe"]
    assert moe["experts"][0]["name"] == "medical" and moe["router_version"] == 1
    assert routed.choices[0].message.content.strip()
    assert routed.usage.completion_tokens <= 24

    forced = client.chat.completions.create(model="legal", messages=[{"role": "user", "content": FINANCE}],
                                            max_tokens=8, temperature=0)
    assert forced.model_extra["moe"]["experts"] == [{"name": "legal", "weight": 1.0}]

    chunks = list(client.chat.completions.create(model="auto", messages=[{"role": "user", "content": FINANCE}],
                                                 max_tokens=16, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() and chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[0].model_extra["moe"]["experts"][0]["name"] == "finance"

    completion = client.completions.create(model="support", prompt="Order #1234 never arrived.", max_tokens=8)
    assert completion.choices[0].text is not None

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="limit is 512"):
        client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "word " * 2000}])
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="auto", messages=[])

    ids = [routed.id, forced.id, chunks[0].id, completion.id]
    rows = _wait_logged(live["sessions"], ids)
    assert rows[forced.id].forced_expert == "legal"
    assert rows[routed.id].completion_tokens == routed.usage.completion_tokens
    assert rows[routed.id].experts[0]["name"] == "medical"


def test_new_expert_goes_live_without_restart(live):
    import httpx
    import torch
    from peft import LoraConfig, get_peft_model

    from pipelines.register import register_adapter

    backbone = live["backbone"]
    torch.manual_seed(0)
    model = get_peft_model(copy.deepcopy(backbone.model),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    folder = live["settings"].home / "imported-adapter"
    model.save_pretrained(folder, safe_serialization=True)
    register_adapter(live["settings"], live["sessions"], backbone, "imported", folder, "trained elsewhere")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        models = [m["id"] for m in httpx.get(live["url"] + "/v1/models").json()["data"]]
        if "imported" in models:
            break
        time.sleep(0.5)
    assert "imported" in models
    response = httpx.post(live["url"] + "/v1/chat/completions", timeout=60, json={
        "model": "imported", "max_tokens": 4, "messages": [{"role": "user", "content": "Hello there"}]})
    assert response.status_code == 200 and response.json()["moe"]["experts"][0]["name"] == "imported"


def test_cli_route_and_eval_qa(live, tmp_path):
    env = {**os.environ, "MOE_HOME": str(live["settings"].home)}
    lines = tmp_path / "in.jsonl"
    lines.write_text("\n".join(json.dumps({"text": t}) for t in (MEDICAL, FINANCE)) + "\n")
    out = tmp_path / "out.jsonl"
    moe = [sys.executable, "-m", "cli"]
    subprocess.run([*moe, "route", "--input", str(lines), "--output", str(out)], env=env, check=True, timeout=300)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["experts"][0] for r in rows] == ["medical", "finance"]
    assert all(set(r) == {"text", "experts", "weights", "confidence"} for r in rows)

    # held-out seed answers: the expert was trained on that style of answer, not on a one-line reply
    held_out = seed_qa("medical")[1][:4]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": e.routing_text, "answer": e.response,
                                      "domain": "medical"}) + "\n" for e in held_out))
    result = subprocess.run([*moe, "eval", "qa", "--input", str(qa), "--json"], env=env, check=True, timeout=300,
                            capture_output=True, text=True)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    stats = summary["domains"]["medical"]
    assert stats["n"] == 4 and stats["expert"] < stats["base"] and summary["overall"]["n"] == 4

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"nope": 1}\n')
    failed = subprocess.run([*moe, "route", "--input", str(bad)], env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and "line 2" in failed.stderr and failed.stderr.count("\n") == 1


def _register_expert(live, body: dict, timeout_s: float) -> dict:
    """`POST /admin/experts` and wait for the job; returns the succeeded job."""
    import httpx

    auth = {"Authorization": f"Bearer {ADMIN}"}
    response = httpx.post(live["url"] + "/admin/experts", headers=auth, timeout=30, json=body)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(f"{live['url']}/admin/jobs/{job_id}", headers=auth, timeout=30).json()
        if job["status"] in ("succeeded", "failed"):
            break
        time.sleep(2)
    assert job["status"] == "succeeded", job
    return job


def test_register_fifth_domain_under_steady_traffic(live):
    """A new domain (a farmers' cooperative advisory desk) trained from a small dataset goes live in a
    running service under traffic."""
    import threading

    import httpx

    from experts.data import load_texts
    from experts.seed import split_texts

    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(timeout=120) as http:
            i = 0
            while not stop.is_set():
                model = ("auto", "legal", "auto")[i % 3]
                text = (MEDICAL, FINANCE, "My wheat has yellow stripes on the lower leaves, what is it?")[i % 3]
                r = http.post(live["url"] + "/v1/chat/completions",
                              json={"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": text}]})
                statuses.append(r.status_code)
                i += 1
                stop.wait(1.5)  # steady, light traffic: the job's training shares these two cores

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        job = _register_expert(live, {
            "name": "agronomy", "description": "Crops, soil, livestock and farm practice", "epochs": 1,
            "data_path": str(DATA / "agronomy.jsonl"), "prompts_path": str(DATA / "agronomy_prompts.jsonl")}, 1500)
        assert job["result"]["eval_loss_expert"] < job["result"]["eval_loss_base"]
        assert job["result"]["router_promoted"], job["result"]["router_reasons"]
        time.sleep(4)  # pool sync and router refresh both poll every 2 s
    finally:
        stop.set()
        thread.join(timeout=120)
    assert statuses and set(statuses) == {200}, f"failed requests under traffic: {set(statuses)}"
    _, fresh = split_texts(load_texts(DATA / "agronomy_prompts.jsonl"))
    routed = [httpx.post(live["url"] + "/v1/route", json={"text": t}, timeout=30).json()["experts"][0]["name"]
              for t in fresh]
    assert routed.count("agronomy") / len(routed) >= 0.8, routed
    domain_text = next(t for t, r in zip(fresh, routed, strict=True) if r == "agronomy")
    answer = httpx.post(live["url"] + "/v1/chat/completions", timeout=120, json={
        "model": "auto", "max_tokens": 8, "messages": [{"role": "user", "content": domain_text}]}).json()
    assert answer["moe"]["experts"][0]["name"] == "agronomy"


def test_register_a_bordering_domain(live):
    """A domain that borders the defaults (an HR desk: pay, leave and benefits questions sit next to finance and
    employment law) is promoted and reaches most of its unseen prompts; the verdict says where the rest go. Under
    the old 90% new-label rule it was rejected and no request reached it (docs/design-notes.md)."""
    import httpx

    job = _register_expert(live, {
        "name": "hr", "description": "Employees' questions to HR: pay, leave, benefits, payslips, the HR portal",
        "epochs": 1, "data_path": str(DATA / "hr.jsonl")}, 900)
    reasons = job["result"]["router_reasons"]
    assert job["result"]["router_promoted"], reasons
    assert not any("recall" in r and "dropped" in r for r in reasons), reasons
    advice = [r for r in reasons if r.startswith("new label hr recall")]  # below 90%: where the rest went, and how
    assert not advice or ("others went to" in advice[0] and "moe expert prompts hr" in advice[0]), advice
    time.sleep(4)  # router refresh polls every 2 s
    unseen = [json.loads(line)["text"] for line in (DATA / "hr_unseen.jsonl").read_text().splitlines()]
    routed = [httpx.post(live["url"] + "/v1/route", json={"text": t}, timeout=30).json()["experts"][0]["name"]
              for t in unseen]
    assert routed.count("hr") / len(routed) >= 0.5, routed  # 0.63-0.73 measured; 80% is the open target
