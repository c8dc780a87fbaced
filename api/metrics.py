"""Prometheus metrics with an `expert` label: requests, tokens, latency, routing share."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("moe_requests", "Requests answered", ["endpoint", "expert", "status"],
                                registry=self.registry)
        self.tokens = Counter("moe_tokens", "Tokens processed", ["expert", "kind"], registry=self.registry)
        self.latency = Histogram("moe_request_latency_seconds", "End-to-end latency", ["expert"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.routed = Counter("moe_routed", "Routing decisions by top expert (routing share)", ["expert"],
                              registry=self.registry)
        self.log_rows = Gauge("moe_request_log_rows", "Request-log rows since start by fate (written, spilled "
                              "while the database was down, replayed, rejected)", ["state"], registry=self.registry)

    def observe_request(self, endpoint: str, expert: str, status: int, prompt_tokens: int,
                        completion_tokens: int, seconds: float) -> None:
        self.requests.labels(endpoint, expert, str(status)).inc()
        self.tokens.labels(expert, "prompt").inc(prompt_tokens)
        self.tokens.labels(expert, "completion").inc(completion_tokens)
        self.latency.labels(expert).observe(seconds)
        self.routed.labels(expert).inc()

    def observe_route(self, expert: str) -> None:
        self.routed.labels(expert).inc()

    def observe_log_writer(self, written: int, spilled: int, replayed: int, rejected: int) -> None:
        for state, value in (("written", written), ("spilled", spilled), ("replayed", replayed),
                             ("rejected", rejected)):
            self.log_rows.labels(state).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
