"""The ingress's Prometheus series (vLLM's request metrics, per expert, plus the router's). They record into a
`MetricsRegistry` (serving/metrics.py); how they reach GET /metrics (this process, or the MetricsHub's totals
over every replica) is the export's business, so this code is the same with Ray and without.

Label `routing`: `routed` (model "auto": the router chose `expert`, its top column) or `forced` (the client
named the expert, or `base`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import Counter, Gauge, Histogram

from experts.engine import TokenEvent
from serving.metrics import MetricsRegistry

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
PER_REQUEST = ["expert", "routing"]


class Metrics:
    """Series recorded by the gateway. Timing comes from the engine (`TokenEvent.timing` on each choice's
    finish event), so a non-streamed request, which crosses the pool boundary once, is timed like a streamed
    one."""

    def __init__(self, registry: MetricsRegistry | None = None) -> None:
        self.registry = registry or MetricsRegistry()
        r = self.registry.registry
        self.requests = Counter("moe_requests", "Requests answered, by endpoint, expert, routing and HTTP status",
                                ["endpoint", *PER_REQUEST, "status"], registry=r)
        self.prompt_tokens = Counter("moe_prompt_tokens", "Prompt tokens of answered requests", PER_REQUEST,
                                     registry=r)
        self.generation_tokens = Counter("moe_generation_tokens", "Generated tokens of answered requests (all "
                                         "choices)", PER_REQUEST, registry=r)
        self.e2e = Histogram("moe_e2e_request_latency_seconds", "Successful requests: dispatch to last token",
                             PER_REQUEST, buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("moe_time_to_first_token_seconds", "Dispatch to the first generated token (earliest "
                              "choice)", PER_REQUEST, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("moe_inter_token_latency_seconds", "Mean time between generated tokens of a request "
                             "(one observation per request)", PER_REQUEST, buckets=ITL_BUCKETS, registry=r)
        self.queue = Histogram("moe_request_queue_time_seconds", "Time a request waited in its pool's engine "
                               "queue before prefill", PER_REQUEST, buckets=QUEUE_BUCKETS, registry=r)
        self.decisions = Counter("moe_router_decisions", "Router decisions by top expert (model=auto requests and "
                                 "/v1/route; forced requests are not decisions)", ["expert", "endpoint"], registry=r)
        self.confidence = Histogram("moe_router_confidence", "Calibrated probability of the router's top column",
                                    buckets=CONFIDENCE_BUCKETS, registry=r)
        self.abstentions = Counter("moe_router_abstentions", "Router decisions below the abstain threshold (sent "
                                   "to the bare backbone)", ["endpoint"], registry=r)
        for endpoint in ("chat", "completions", "route"):  # zero series from the start: rate() works at once
            self.abstentions.labels(endpoint)
        self.router_version = Gauge("moe_router_active_version", "Active router version (0 = none; the newest any "
                                    "ingress replica serves)", registry=r)
        self.registry.max_merged.add("moe_router_active_version")
        self.log_rows = Gauge("moe_request_log_rows", "Request-log rows since start by fate (written, spilled "
                              "while the database was down, replayed, rejected)", ["state"], registry=r)

    def follow(self, router_version: Callable[[], int | None], log_counts: Callable[[], dict[str, int]]) -> None:
        """Gauges read when collected (a scrape, or a push to the hub), not on the request path."""
        self.router_version.set_function(lambda: router_version() or 0)
        for state in ("written", "spilled", "replayed", "rejected"):
            self.log_rows.labels(state).set_function(lambda state=state: log_counts()[state])

    def observe_decision(self, endpoint: str, expert: str, confidence: float, abstained: bool) -> None:
        self.decisions.labels(expert, endpoint).inc()
        self.confidence.observe(confidence)
        if abstained:
            self.abstentions.labels(endpoint).inc()

    def observe_request(self, endpoint: str, expert: str, routing: str, status: int, prompt_tokens: int,
                        completion_tokens: int, seconds: float, finals: Sequence[tuple[TokenEvent, float]]) -> None:
        """One answered request; `finals` are its choices' finish events with the seconds since dispatch at
        which each arrived."""
        labels = (expert, routing)
        self.requests.labels(endpoint, expert, routing, str(status)).inc()
        self.prompt_tokens.labels(*labels).inc(prompt_tokens)
        self.generation_tokens.labels(*labels).inc(completion_tokens)
        if status == 200:
            self.e2e.labels(*labels).observe(seconds)
        timed = [(e, at) for e, at in finals if e.timing is not None and e.timing.decode_s is not None]
        if not timed:
            return
        # the first token reached the ingress about `decode_s` before the finish event did
        self.ttft.labels(*labels).observe(max(0.0, min(at - e.timing.decode_s for e, at in timed)))
        self.queue.labels(*labels).observe(min(e.timing.queued_s for e, _ in timed))
        gaps = sum(max(0, e.completion_tokens - 1) for e, _ in timed)
        if gaps:
            self.itl.labels(*labels).observe(sum(e.timing.decode_s for e, _ in timed) / gaps)
