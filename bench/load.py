"""Load test against a local service: N requests at C concurrent clients (mixed routed and forced, some
streaming), then checks that no answer was a 5xx and that the request log holds exactly one row per request.

    python -m bench.load [--requests 2000] [--clients 32] [--max-tokens 8]

Starts its own service (Ray Serve on 127.0.0.1, a scratch data home, the shipped experts) unless --url is
given with --home pointing at that service's data home. Bounded in count and time. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from bench.http import free_port
from core.settings import Settings
from experts.seed import DEFAULT_DOMAINS, seed_prompts

DOMAINS = sorted(DEFAULT_DOMAINS)


async def run_load(url: str, n: int, clients: int, max_tokens: int, deadline_s: float) -> dict:
    texts = [t for d in DOMAINS for t in seed_prompts(d)[1]]
    statuses: Counter = Counter()
    latencies: list[float] = []
    ids: list[str] = []
    counter = iter(range(n))
    stop_at = time.monotonic() + deadline_s

    async def client(http: httpx.AsyncClient) -> None:
        for i in counter:
            if time.monotonic() > stop_at:
                return
            model = "auto" if i % 3 else DOMAINS[i % 4]
            body = {"model": model, "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": texts[i % len(texts)]}]}
            started = time.perf_counter()
            try:
                if i % 5 == 0:
                    body["stream"] = True
                    async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
                        lines = [line async for line in response.aiter_lines() if line.startswith("data: {")]
                        status = response.status_code
                        if status == 200 and lines:
                            ids.append(json.loads(lines[0][6:])["id"])
                else:
                    response = await http.post(url + "/v1/chat/completions", json=body)
                    status = response.status_code
                    if status == 200:
                        ids.append(response.json()["id"])
            except httpx.HTTPError as exc:
                status = f"transport:{exc.__class__.__name__}"
            statuses[status] += 1
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"sent": sum(statuses.values()), "statuses": {str(k): v for k, v in statuses.items()},
            "seconds": round(elapsed, 1), "requests_per_s": round(sum(statuses.values()) / elapsed, 2),
            "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
            "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3) if latencies else None,
            "ids": ids}


def count_logged(settings: Settings, ids: list[str], wait_s: float = 30.0) -> int:
    from registry import repository as repo
    from registry.db import session_factory

    sessions = session_factory(settings, run_migrations=False)
    deadline = time.monotonic() + wait_s
    found = 0
    while time.monotonic() < deadline:
        with sessions() as session:
            found = sum(repo.get_request_log(session, i) is not None for i in ids)
        if found == len(ids):
            break
        time.sleep(1)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--deadline-s", type=float, default=1800)
    parser.add_argument("--url")
    parser.add_argument("--home", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.url:
        settings = Settings(home=args.home) if args.home else Settings()
        url = args.url
    else:
        import ray
        from ray import serve

        from api.local_ray import LOCAL_ENV, wait_healthy
        from api.serve_app import APP_NAME, build_app
        from experts.backbone import load_backbone
        from pipelines.bootstrap import ensure_defaults
        from registry.db import session_factory

        os.environ.update(LOCAL_ENV)
        settings = Settings(home=Path(tempfile.mkdtemp(prefix="moe-load-")), port=free_port(), max_queue=4096)
        ensure_defaults(settings, session_factory(settings), load_backbone(settings))
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        serve.start(http_options={"host": "127.0.0.1", "port": settings.port})
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{settings.port}"
        wait_healthy(url, 300)
    result = asyncio.run(run_load(url, args.requests, args.clients, args.max_tokens, args.deadline_s))
    ids = result.pop("ids")
    result["answered_200"] = len(ids)
    result["logged"] = count_logged(settings, ids)
    result["server_errors"] = sum(v for k, v in result["statuses"].items() if k.startswith("5"))
    result["ok"] = result["server_errors"] == 0 and result["logged"] == len(ids)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
