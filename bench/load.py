"""Load test against a local service: N requests at C concurrent clients (mixed routed and forced, one in five
streaming), then checks that no answer was a 5xx and that the request log holds one row per answered request.

    python -m bench.load [--requests 2000] [--clients 32] [--max-tokens 8]

Starts its own service (Ray Serve on 127.0.0.1, a scratch data home, the shipped experts) unless --url is
given with --home pointing at that service's data home. Clients behave like well-mannered OpenAI clients:
a 503/429 is retried after its Retry-After (at most --retries times); each attempt is counted. Bounded in
count and time. Last line: one JSON object. bench/faults.py drives the same clients while it injects faults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from core.settings import Settings
from experts.seed import DEFAULT_DOMAINS, seed_prompts

DOMAINS = sorted(DEFAULT_DOMAINS)
RETRYABLE = (429, 503)
ID_HEADER = "x-moe-request-id"  # the request-log id; Ray Serve owns x-request-id (its own ids)


@dataclass
class Outcome:
    """One logical request: its attempts (a retry is a new attempt) and how the last one ended."""

    index: int
    started: float
    finished: float = 0.0
    attempts: list[int | str] = field(default_factory=list)
    """HTTP status per attempt; 'stream-error' for a 200 stream that carried an error event, or
    'transport:<Error>' when no HTTP answer came."""
    request_ids: list[str] = field(default_factory=list)
    """Ids the service gave (body, X-MoE-Request-Id): each names one request-log row."""
    router_version: int | None = None
    experts: list[str] = field(default_factory=list)

    @property
    def status(self) -> int | str:
        return self.attempts[-1] if self.attempts else "not-sent"

    @property
    def ok(self) -> bool:
        return self.status == 200


def _body(i: int, texts: list[str], max_tokens: int) -> dict[str, Any]:
    model = "auto" if i % 3 else DOMAINS[i % 4]
    return {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": i % 5 == 0,
            "messages": [{"role": "user", "content": texts[i % len(texts)]}]}


async def _attempt(http: httpx.AsyncClient, url: str, body: dict[str, Any], outcome: Outcome) -> float | None:
    """Sends once; records the status and ids; returns the Retry-After delay when the answer says retry."""
    try:
        if body["stream"]:
            async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
                status: int | str = response.status_code
                if response.headers.get(ID_HEADER):
                    outcome.request_ids.append(response.headers[ID_HEADER])
                if status == 200:
                    events = [json.loads(line[6:]) async for line in response.aiter_lines()
                              if line.startswith("data: {")]
                    if any("error" in e for e in events):
                        status = "stream-error"
                    elif events:
                        outcome.router_version = events[0]["moe"]["router_version"]
                        outcome.experts = [e["name"] for e in events[0]["moe"]["experts"]]
                else:
                    await response.aread()
        else:
            response = await http.post(url + "/v1/chat/completions", json=body)
            status = response.status_code
            if status == 200:
                answer = response.json()
                outcome.request_ids.append(answer["id"])
                outcome.router_version = answer["moe"]["router_version"]
                outcome.experts = [e["name"] for e in answer["moe"]["experts"]]
            elif response.headers.get(ID_HEADER):
                outcome.request_ids.append(response.headers[ID_HEADER])
    except httpx.HTTPError as exc:
        outcome.attempts.append(f"transport:{exc.__class__.__name__}")
        return None
    outcome.attempts.append(status)
    if status in RETRYABLE or status == "stream-error":
        return min(float(response.headers.get("retry-after", "1")), 5.0)
    return None


async def run_load(url: str, n: int, clients: int, max_tokens: int, deadline_s: float, retries: int = 5,
                   timeout_s: float = 300, body_for: Callable[[int], dict[str, Any]] | None = None,
                   stop: asyncio.Event | None = None) -> list[Outcome]:
    """Sends up to `n` requests from `clients` concurrent clients; no new request after `deadline_s` or once
    `stop` is set. A request in flight is never abandoned (a hang shows as a transport timeout)."""
    texts = [t for d in DOMAINS for t in seed_prompts(d)[1]]
    body_for = body_for or (lambda i: _body(i, texts, max_tokens))
    outcomes: list[Outcome] = []
    counter = iter(range(n))
    stop_at = time.monotonic() + deadline_s

    async def client(http: httpx.AsyncClient) -> None:
        for i in counter:
            if time.monotonic() > stop_at or (stop is not None and stop.is_set()):
                return
            outcome = Outcome(index=i, started=time.monotonic())
            outcomes.append(outcome)
            body = body_for(i)
            for _ in range(retries + 1):
                delay = await _attempt(http, url, body, outcome)
                if delay is None:
                    break
                await asyncio.sleep(delay)
            outcome.finished = time.monotonic()

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return outcomes


def summarise(outcomes: list[Outcome]) -> dict[str, Any]:
    """The figures every load run reports."""
    attempts = Counter(str(s) for o in outcomes for s in o.attempts)
    final = Counter(str(o.status) for o in outcomes)
    latencies = sorted(o.finished - o.started for o in outcomes if o.ok)
    elapsed = (max(o.finished for o in outcomes) - min(o.started for o in outcomes)) if outcomes else 0.0
    return {
        "requests": len(outcomes),
        "final_statuses": dict(final),
        "attempt_statuses": dict(attempts),
        "server_errors_5xx": sum(v for k, v in attempts.items() if k.startswith("5")),
        "failed": sum(not o.ok for o in outcomes),
        "retried": sum(len(o.attempts) > 1 for o in outcomes),
        "seconds": round(elapsed, 1),
        "requests_per_s": round(len(outcomes) / elapsed, 2) if elapsed else None,
        "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3) if latencies else None,
    }


def count_logged(settings: Settings, ids: list[str], wait_s: float = 30.0) -> dict[str, int]:
    """How many of `ids` have a request-log row (waiting up to `wait_s` for the batched writer), and the total."""
    from sqlalchemy import select

    from registry import repository as repo
    from registry.db import session_factory
    from registry.models import RequestLog

    sessions = session_factory(settings, run_migrations=False)
    deadline = time.monotonic() + wait_s
    wanted = set(ids)
    found: set[str] = set()
    while True:
        with sessions() as session:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                found |= set(session.scalars(select(RequestLog.request_id).where(RequestLog.request_id.in_(chunk))))
            total = repo.count_request_logs(session)
        if found >= wanted or time.monotonic() > deadline:
            break
        time.sleep(1)
    sessions.kw["bind"].dispose()
    return {"answered_with_id": len(wanted), "logged": len(found & wanted), "log_rows_total": total}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--deadline-s", type=float, default=1800)
    parser.add_argument("--retries", type=int, default=5, help="retries of a 503/429 after its Retry-After")
    parser.add_argument("--url")
    parser.add_argument("--home", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    def measure(url: str, settings: Settings) -> dict[str, Any]:
        outcomes = asyncio.run(run_load(url, args.requests, args.clients, args.max_tokens, args.deadline_s,
                                        args.retries))
        result = {"clients": args.clients, "max_tokens": args.max_tokens, **summarise(outcomes)}
        result.update(count_logged(settings, [i for o in outcomes for i in o.request_ids]))
        result["ok"] = (result["server_errors_5xx"] == 0 and result["failed"] == 0
                        and result["logged"] == result["answered_with_id"] == result["log_rows_total"])
        return result

    if args.url:
        result = measure(args.url, Settings(home=args.home) if args.home else Settings())
    else:
        from bench.service import local_service, scratch_settings

        settings = scratch_settings("moe-load-", max_queue=4096)
        with local_service(settings) as url:
            result = measure(url, settings)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
