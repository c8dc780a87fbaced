"""Fault injection against the local service under load. Each scenario starts its own service (Ray Serve on
127.0.0.1, a scratch data home, the shipped experts and router), runs bounded load with the retrying clients
of bench/load.py, injects one fault, and prints one JSON object with the figures as its last line.

    python -m bench.faults replica-kill     # ray.kill of the ExpertPool replica actor mid-load
    python -m bench.faults db-outage        # registry on PostgreSQL behind a proxy that is cut for 30 s
    python -m bench.faults corrupt-adapter  # corrupted / pickled adapters registered through the admin API
    python -m bench.faults router-swap      # promote a second router version, then roll back, mid-load

Options: --clients, --max-tokens, --requests (scenario defaults are small: 2 CPU cores).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import shutil
import tarfile
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from bench.load import Outcome, count_logged, run_load, summarise
from bench.service import local_service, scratch_settings
from bench.tcp_proxy import TcpProxy
from core.settings import Settings
from experts.seed import DEFAULT_ADAPTERS_DIR, DEFAULT_ROUTER_DIR

logger = logging.getLogger("bench.faults")
ADMIN = "bench-admin"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:{port}/test"
POOL = "ExpertPool-default"

Fault = Callable[[str, Settings, float], Awaitable[dict[str, Any]]]


async def under_load(url: str, settings: Settings, args: argparse.Namespace, fault: Fault,
                     tail_s: float) -> tuple[list[Outcome], dict[str, Any]]:
    """Runs the clients and, concurrently, `fault(url, settings, load_started)`; the clients stop starting
    requests `tail_s` after the fault is over (or at --requests / 15 minutes). Returns both results."""
    started = time.monotonic()
    stop = asyncio.Event()
    load = asyncio.create_task(run_load(url, args.requests, args.clients, args.max_tokens, 900, stop=stop))
    try:
        figures = await fault(url, settings, started)
        await asyncio.wait({load}, timeout=tail_s)
    finally:
        stop.set()
    return await load, figures


def logged_figures(settings: Settings, outcomes: list[Outcome]) -> dict[str, Any]:
    return count_logged(settings, [i for o in outcomes for i in o.request_ids], wait_s=60)


def verdict(result: dict[str, Any]) -> bool:
    return (result["server_errors_5xx_unretried"] == 0 and result["failed"] == 0
            and result["logged"] == result["answered_with_id"])


def unretried_5xx(outcomes: list[Outcome]) -> int:
    """5xx answers the client could not retry: anything but a 503 (which says when to retry)."""
    return sum(1 for o in outcomes for s in o.attempts if str(s).startswith("5") and s != 503)


async def log_metrics(url: str) -> dict[str, int]:
    async with httpx.AsyncClient(timeout=30) as http:
        text = (await http.get(url + "/metrics")).text
    rows = {}
    for line in text.splitlines():
        if line.startswith("moe_request_log_rows{"):
            state = line.split('state="')[1].split('"')[0]
            rows[state] = int(float(line.rsplit(" ", 1)[1]))
    return rows


# ---- replica kill ------------------------------------------------------------------------------
def _pool_replicas() -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if "SERVE_REPLICA" in a["name"] and POOL in a["name"])


def _pool_healthy() -> bool:
    from ray import serve

    app = serve.status().applications.get("moe")
    return app is not None and app.deployments[POOL].status == "HEALTHY"


async def replica_kill(url: str, settings: Settings, started: float, after_s: float = 20.0) -> dict[str, Any]:
    import ray

    await asyncio.sleep(after_s)
    before = await asyncio.to_thread(_pool_replicas)
    actor = await asyncio.to_thread(ray.get_actor, before[0], "serve")
    killed_at = time.monotonic()
    await asyncio.to_thread(ray.kill, actor, no_restart=True)
    replaced_s = None
    while time.monotonic() - killed_at < 300:
        now = await asyncio.to_thread(_pool_replicas)
        if now and now != before and await asyncio.to_thread(_pool_healthy):
            replaced_s = round(time.monotonic() - killed_at, 1)
            break
        await asyncio.sleep(0.5)
    return {"killed_replica": before[0], "killed_at_s": round(killed_at - started, 1),
            "replica_replaced_s": replaced_s, "_killed_at": killed_at}


def run_replica_kill(args: argparse.Namespace) -> dict[str, Any]:
    settings = scratch_settings("moe-fault-kill-", admin_token=ADMIN)
    with local_service(settings) as url:
        outcomes, figures = asyncio.run(under_load(url, settings, args, replica_kill, tail_s=40))
        killed_at = figures.pop("_killed_at")
        result = {"scenario": "replica-kill", **summarise(outcomes), **figures,
                  **logged_figures(settings, outcomes)}
    # one pool replica serves every request: an answer after the kill came from its replacement
    answered_after = [o.finished for o in outcomes if o.ok and o.finished > killed_at]
    hit = [o for o in outcomes if o.started < killed_at < o.finished]
    result["in_flight_at_kill"] = len(hit)
    result["in_flight_attempts"] = dict(Counter("/".join(map(str, o.attempts)) for o in hit))
    result["sent_after_kill"] = sum(o.started > killed_at for o in outcomes)
    result["recovery_s"] = round(min(answered_after) - killed_at, 1) if answered_after else None
    result["server_errors_5xx_unretried"] = unretried_5xx(outcomes)
    result["ok"] = verdict(result)
    return result


# ---- database outage ---------------------------------------------------------------------------
async def db_outage(proxy: TcpProxy, outage_s: float, after_s: float, url: str, settings: Settings,
                    started: float) -> dict[str, Any]:
    await asyncio.sleep(after_s)
    before = await log_metrics(url)
    cut_at = time.monotonic()
    proxy.cut()
    spill = settings.spill_dir / "requests.jsonl"
    spill_peak = 0
    while time.monotonic() - cut_at < outage_s:
        await asyncio.sleep(1)
        if spill.is_file():
            spill_peak = max(spill_peak, sum(1 for _ in spill.open(encoding="utf-8")))
    proxy.restore()
    restored_at = time.monotonic()
    replayed_s = None
    while time.monotonic() - restored_at < 120:
        if not spill.exists():
            replayed_s = round(time.monotonic() - restored_at, 1)
            break
        await asyncio.sleep(0.5)
    return {"outage_s": round(restored_at - cut_at, 1), "cut_at_s": round(cut_at - started, 1),
            "spill_file_rows_peak": spill_peak, "spill_replayed_after_s": replayed_s,
            "log_rows_before_cut": before, "_window": (cut_at, restored_at)}


def run_db_outage(args: argparse.Namespace) -> dict[str, Any]:
    from sqlalchemy import create_engine, text

    schema = "faults_" + uuid.uuid4().hex[:10]
    admin = create_engine(POSTGRES.format(port=5432))
    with admin.begin() as conn:
        conn.execute(text(f"create schema {schema}"))
    proxy = TcpProxy(("127.0.0.1", 5432)).start()
    try:
        database_url = POSTGRES.format(port=proxy.port) + f"?options=-csearch_path%3D{schema}"
        settings = scratch_settings("moe-fault-db-", admin_token=ADMIN, database_url=database_url)
        with local_service(settings) as url:
            fault = lambda u, s, t: db_outage(proxy, args.outage_s, 15.0, u, s, t)  # noqa: E731
            outcomes, figures = asyncio.run(under_load(url, settings, args, fault, tail_s=15))
            cut_at, restored_at = figures.pop("_window")
            result = {"scenario": "db-outage", **summarise(outcomes), **figures,
                      **logged_figures(settings, outcomes)}
            result["log_rows_after"] = asyncio.run(log_metrics(url))
        during = [o for o in outcomes if cut_at <= o.started and o.finished <= restored_at]
        result["answered_during_outage"] = sum(o.ok for o in during)
        result["failed_during_outage"] = sum(not o.ok for o in during)
        result["server_errors_5xx_unretried"] = unretried_5xx(outcomes)
        result["ok"] = verdict(result) and result["log_rows_after"].get("replayed", 0) > 0
        return result
    finally:
        proxy.stop()
        with admin.begin() as conn:
            conn.execute(text(f"drop schema if exists {schema} cascade"))
        admin.dispose()


# ---- corrupted adapter at register ---------------------------------------------------------------
PROBE = "I have had a fever and a sore throat for three days. Should I see a doctor?"


def corrupted_adapters(root: Path) -> dict[str, Path]:
    """Broken copies of a shipped adapter: garbled header, truncated file, pickled weights, NaN weights."""
    from safetensors.torch import load_file, save_file

    source = DEFAULT_ADAPTERS_DIR / "medical"
    made = {}
    for kind in ("garbled", "truncated", "pickled", "nan"):
        folder = root / kind
        shutil.copytree(source, folder)
        weights = folder / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        if kind == "garbled":
            data[8:4096] = bytes(len(data[8:4096]))  # the JSON header zeroed
            weights.write_bytes(bytes(data))
        elif kind == "truncated":
            weights.write_bytes(bytes(data[: len(data) // 3]))
        elif kind == "nan":
            tensors = load_file(str(weights))
            first = sorted(tensors)[0]
            tensors[first][0, 0] = float("nan")
            save_file(tensors, str(weights))
        else:
            weights.unlink()
            (folder / "adapter_model.bin").write_bytes(b"\x80\x04\x95not-a-real-pickle")
        made[kind] = folder
    return made


def _archive(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in sorted(folder.iterdir()):
            archive.add(path, arcname=path.name)
    return buffer.getvalue()


async def snapshot(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    models = [m["id"] for m in (await http.get(url + "/v1/models")).json()["data"]]
    answers, ids = {}, []
    for model in models:
        body = {"model": model, "max_tokens": 16, "temperature": 0, "messages": [{"role": "user", "content": PROBE}]}
        answer = (await http.post(url + "/v1/chat/completions", json=body)).json()
        answers[model] = answer["choices"][0]["message"]["content"]
        ids.append(answer["id"])
    return {"models": models, "answers": answers, "ids": ids}


async def wait_job(http: httpx.AsyncClient, url: str, job_id: str, timeout_s: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = (await http.get(f"{url}/admin/jobs/{job_id}", headers=AUTH)).json()
        if job["status"] in ("succeeded", "failed"):
            return job
        await asyncio.sleep(1)
    return {"status": "timeout"}


async def register_corrupted(root: Path, url: str, settings: Settings, started: float) -> dict[str, Any]:
    await asyncio.sleep(5)
    results = {}
    async with httpx.AsyncClient(timeout=60) as http:
        for kind, folder in corrupted_adapters(root).items():
            name = f"corrupt-{kind}"
            response = await http.post(url + "/admin/experts", headers=AUTH,
                                       json={"name": name, "adapter_path": str(folder)})
            job = await wait_job(http, url, response.json()["job_id"]) if response.status_code == 202 else {}
            results[name] = {"http": response.status_code, "job": job.get("status"),
                             "message": (job.get("message") or response.text)[:160]}
        upload = await http.post(url + "/admin/experts/corrupt-upload/upload", content=_archive(root / "garbled"),
                                 headers={**AUTH, "Content-Type": "application/octet-stream"})
        job = await wait_job(http, url, upload.json()["job_id"]) if upload.status_code == 202 else {}
        results["corrupt-upload"] = {"http": upload.status_code, "job": job.get("status"),
                                     "message": (job.get("message") or upload.text)[:160]}
        evil = io.BytesIO()
        with tarfile.open(fileobj=evil, mode="w:gz") as archive:
            info = tarfile.TarInfo("../../escape/adapter_config.json")
            info.size = 2
            archive.addfile(info, io.BytesIO(b"{}"))
        escape = await http.post(url + "/admin/experts/corrupt-escape/upload", content=evil.getvalue(),
                                 headers={**AUTH, "Content-Type": "application/octet-stream"})
        results["corrupt-escape"] = {"http": escape.status_code, "message": escape.text[:160]}
    return {"registrations": results}


def run_corrupt_adapter(args: argparse.Namespace) -> dict[str, Any]:
    settings = scratch_settings("moe-fault-adapter-", admin_token=ADMIN)
    root = Path(tempfile.mkdtemp(prefix="moe-corrupt-"))
    with local_service(settings) as url:

        async def scenario() -> tuple[dict, list[Outcome], dict, dict]:
            async with httpx.AsyncClient(timeout=120) as http:
                before = await snapshot(http, url)
            fault = lambda u, s, t: register_corrupted(root, u, s, t)  # noqa: E731
            outcomes, figures = await under_load(url, settings, args, fault, tail_s=5)
            await asyncio.sleep(4)  # the pools poll the registry every 2 s: give a bad adapter its chance
            async with httpx.AsyncClient(timeout=120) as http:
                after = await snapshot(http, url)
            return before, outcomes, figures, after

        before, outcomes, figures, after = asyncio.run(scenario())
        probes = Outcome(index=-1, started=0.0, request_ids=before["ids"] + after["ids"])  # logged like the rest
        result = {"scenario": "corrupt-adapter", **summarise(outcomes), **figures,
                  **logged_figures(settings, [*outcomes, probes]), "probe_requests": len(probes.request_ids)}
    from registry import repository as repo
    from registry.db import session_factory

    with session_factory(settings, run_migrations=False)() as session:
        registered = sorted(e.name for e in repo.list_experts(session))
    rejected = all(r.get("job") in ("failed", None) and r["http"] in (202, 400, 409)
                   for r in figures["registrations"].values())
    result.update({
        "models_before": before["models"], "models_after": after["models"], "experts_registered": registered,
        "models_unchanged": before["models"] == after["models"],
        "answers_unchanged": before["answers"] == after["answers"],
        "all_rejected": rejected and not any(n.startswith("corrupt") for n in registered),
        "server_errors_5xx_unretried": unretried_5xx(outcomes),
    })
    result["ok"] = verdict(result) and result["models_unchanged"] and result["answers_unchanged"] \
        and result["all_rejected"]
    shutil.rmtree(root, ignore_errors=True)
    return result


# ---- router swap -------------------------------------------------------------------------------
def add_router_copy(settings: Settings) -> int:
    """A second router version: the shipped router's files under a new version number (cheap, and the
    swap is visible in every response's moe.router_version)."""
    from registry import repository as repo
    from registry.db import session_factory

    sessions = session_factory(settings, run_migrations=False)
    with sessions.begin() as session:
        active = repo.active_router(session)
        version = repo.next_router_version(session)
        target = settings.routers_dir / f"v{version}"
        shutil.copytree(DEFAULT_ROUTER_DIR, target)
        repo.add_router_version(session, version=version, path=str(target), experts=active.experts,
                                metrics=active.metrics, data_summary={"source": "bench.faults copy"})
    sessions.kw["bind"].dispose()
    return version


async def swap_routers(version: int, url: str, settings: Settings, started: float) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=60) as http:
        await asyncio.sleep(15)
        promote_sent = time.monotonic()
        promoted = await http.post(f"{url}/admin/routers/{version}/promote", headers=AUTH)
        promoted_at = time.monotonic()
        await asyncio.sleep(15)
        rollback_sent = time.monotonic()
        rolled = await http.post(f"{url}/admin/routers/rollback", headers=AUTH)
        rolled_at = time.monotonic()
    return {"promote": [promoted.status_code, promoted.json()], "rollback": [rolled.status_code, rolled.json()],
            "promote_s": round(promoted_at - promote_sent, 3), "rollback_s": round(rolled_at - rollback_sent, 3),
            "_times": (promote_sent, promoted_at, rollback_sent, rolled_at)}


def run_router_swap(args: argparse.Namespace) -> dict[str, Any]:
    settings = scratch_settings("moe-fault-swap-", admin_token=ADMIN)
    with local_service(settings) as url:
        version = add_router_copy(settings)
        fault = lambda u, s, t: swap_routers(version, u, s, t)  # noqa: E731
        outcomes, figures = asyncio.run(under_load(url, settings, args, fault, tail_s=15))
        promote_sent, promoted_at, rollback_sent, rolled_at = figures.pop("_times")
        result = {"scenario": "router-swap", **summarise(outcomes), **figures, **logged_figures(settings, outcomes)}
    routed = [o for o in outcomes if o.ok and o.router_version is not None]
    phases = {
        "before_promote": [o for o in routed if o.finished < promote_sent],
        "after_promote": [o for o in routed if o.started > promoted_at and o.finished < rollback_sent],
        "after_rollback": [o for o in routed if o.started > rolled_at],
    }
    result["router_versions_by_phase"] = {k: dict(Counter(o.router_version for o in v)) for k, v in phases.items()}
    result["new_version"] = version
    result["server_errors_5xx_unretried"] = unretried_5xx(outcomes)
    clean = {k: set(v) for k, v in result["router_versions_by_phase"].items()}
    result["ok"] = (verdict(result) and result["retried"] == 0 and clean["after_promote"] == {version}
                    and clean["before_promote"] == clean["after_rollback"] == {1})
    return result


SCENARIOS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "replica-kill": run_replica_kill,
    "db-outage": run_db_outage,
    "corrupt-adapter": run_corrupt_adapter,
    "router-swap": run_router_swap,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--requests", type=int, default=2000,
                        help="upper bound; the load runs while the fault does, plus a short tail")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--outage-s", type=float, default=30.0, help="db-outage: how long the database is away")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    result = SCENARIOS[args.scenario](args)
    result["wall_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
