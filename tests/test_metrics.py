"""Prometheus metrics: the hub's merge of replica snapshots (no model), the series moving with traffic through
the in-process app, the exposition passing `promtool check metrics`, and (integration) two ingress replicas
behind Ray Serve whose /metrics totals agree whichever replica answers."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from experts.backbone import load_backbone
from serving import tracing
from serving.metrics import Aggregate, MetricsRegistry, render_families
from serving.tracing import setup_tracing
from tests.conftest import tiny_settings
from tests.test_api import chat, running_service


def samples(text: str | bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Exposition text -> {(sample name, sorted labels): value}."""
    text = text.decode() if isinstance(text, bytes) else text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(parsed: dict, name: str, **labels: str) -> float:
    """Sum of a sample over every label set that has `labels`."""
    return sum(v for (n, lab), v in parsed.items() if n == name and labels.items() <= dict(lab).items())


def promtool() -> str | None:
    """promtool on PATH, or next to this interpreter (where .ci/run may unpack it)."""
    beside = Path(sys.executable).parent / "promtool"
    return shutil.which("promtool") or (str(beside) if beside.is_file() else None)


def replica(requests: int, running: int, version: int) -> MetricsRegistry:
    """A replica's registry with one counter, two gauges (sum- and max-merged) and a histogram."""
    metrics = MetricsRegistry("ingress")
    Counter("moe_requests", "Requests", ["expert"], registry=metrics.registry).labels("medical").inc(requests)
    Gauge("moe_pool_requests_running", "Running", registry=metrics.registry).set(running)
    Gauge("moe_router_active_version", "Version", registry=metrics.registry).set(version)
    metrics.max_merged.add("moe_router_active_version")
    latency = Histogram("moe_e2e_request_latency_seconds", "Latency", ["expert"], buckets=(1, 2),
                        registry=metrics.registry)
    for _ in range(requests):
        latency.labels("medical").observe(1.5)
    return metrics


def test_hub_merges_replicas_and_keeps_counters_of_dead_ones():
    clock = [0.0]
    hub = Aggregate(stale_s=5, retire_s=60, clock=lambda: clock[0])
    a, b = replica(3, 2, 1), replica(4, 5, 2)
    hub.push(a.snapshot())
    hub.push(b.snapshot())
    hub.push(a.snapshot())  # a repeated push (a retry) changes nothing: snapshots are cumulative
    merged = samples(hub.render())
    assert total(merged, "moe_requests_total") == 7
    assert total(merged, "moe_pool_requests_running") == 7  # summed
    assert total(merged, "moe_router_active_version") == 2  # max
    assert total(merged, "moe_e2e_request_latency_seconds_bucket", le="1.0") == 0
    assert total(merged, "moe_e2e_request_latency_seconds_bucket", le="2.0") == 7
    assert total(merged, "moe_e2e_request_latency_seconds_count") == 7
    assert total(merged, "moe_metrics_sources", role="ingress") == 2
    assert not any(n.endswith("_created") for n, _ in merged)

    clock[0] = 10.0  # b stops reporting: its gauges leave, its counts stay
    hub.push(a.snapshot())
    merged = samples(hub.render())
    assert total(merged, "moe_requests_total") == 7 and total(merged, "moe_pool_requests_running") == 2
    assert total(merged, "moe_metrics_sources", role="ingress") == 1

    clock[0] = 100.0  # both retired: folded into the totals, never counted twice
    assert total(samples(hub.render()), "moe_requests_total") == 7
    hub.push(b.snapshot())
    assert total(samples(hub.render()), "moe_requests_total") == 7
    assert not hub.sources


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_backbone_dir):
    """The in-process app (two random experts, a trained router) after some traffic: /metrics before and after
    (parsed), the text after, the client and the gateway."""
    config = tiny_settings(tmp_path_factory.mktemp("metrics") / "home", tiny_backbone_dir)
    with running_service(config, load_backbone(config)) as (client, gateway, _):
        before = samples(client.get("/metrics").text)
        assert chat(client).status_code == 200
        assert chat(client, model="finance").status_code == 200
        with client.stream("POST", "/v1/chat/completions", json={
                "model": "auto", "stream": True, "max_tokens": 5, "temperature": 0,
                "messages": [{"role": "user", "content": "my order never arrived"}]}) as response:
            assert response.status_code == 200 and list(response.iter_lines())
        assert client.post("/v1/route", json={"text": "should I invest in index funds"}).status_code == 200
        assert chat(client, model="nope").status_code == 404  # refused before dispatch: not an answered request
        text = client.get("/metrics").text
        yield before, samples(text), text, client, gateway


def test_series_move_with_traffic(served):
    before, after = served[:2]
    moved = {name: total(after, name) - total(before, name) for name in (
        "moe_requests_total", "moe_prompt_tokens_total", "moe_generation_tokens_total",
        "moe_e2e_request_latency_seconds_count", "moe_time_to_first_token_seconds_count",
        "moe_inter_token_latency_seconds_count", "moe_request_queue_time_seconds_count",
        "moe_router_decisions_total", "moe_router_confidence_count", "moe_pool_batch_size_count")}
    assert moved["moe_requests_total"] == 3
    assert total(after, "moe_requests_total", routing="routed", status="200") == 2
    assert total(after, "moe_requests_total", routing="forced", expert="finance", endpoint="chat") == 1
    assert moved["moe_prompt_tokens_total"] > 0 and moved["moe_generation_tokens_total"] > 0
    assert moved["moe_e2e_request_latency_seconds_count"] == 3
    assert moved["moe_time_to_first_token_seconds_count"] == 3 and moved["moe_request_queue_time_seconds_count"] == 3
    assert moved["moe_inter_token_latency_seconds_count"] >= 1
    # the router decided for the two routed requests and the /v1/route call, not for the forced one
    assert moved["moe_router_decisions_total"] == 3 and moved["moe_router_confidence_count"] == 3
    assert total(after, "moe_router_decisions_total", endpoint="route") == 1
    assert total(after, "moe_router_active_version") == 1
    assert moved["moe_pool_batch_size_count"] > 0  # decode steps ran
    assert total(after, "moe_pool_loaded_experts", pool="default") == 2
    assert total(after, "moe_pool_requests_running") == 0 and total(after, "moe_pool_requests_waiting") == 0
    assert ("moe_pool_kv_cache_tokens", (("pool", "default"),)) in after
    assert ("moe_request_log_rows", (("state", "written"),)) in after
    latency_buckets = [v for (n, lab), v in after.items() if n == "moe_time_to_first_token_seconds_bucket"]
    assert latency_buckets and max(latency_buckets) >= 1


@pytest.mark.skipif(promtool() is None, reason="promtool not found (Debian package `prometheus`; .ci/run unpacks "
                    "its promtool when apt is available)")
def test_exposition_passes_promtool(served):
    text = served[2]
    hub = Aggregate(stale_s=5, retire_s=60)  # the hub's rendering too, from two replicas' snapshots
    for source in (replica(2, 1, 1), replica(3, 0, 1)):
        hub.push(source.snapshot())
    for exposition in (text, hub.render().decode(), render_families([])):
        exposition = exposition.decode() if isinstance(exposition, bytes) else exposition
        result = subprocess.run([promtool(), "check", "metrics"], input=exposition, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_traces_join_ingress_routing_and_pool(served):
    """With tracing on, a request is one trace: moe.request with moe.route and moe.pool.generate under it (the
    pool's span continues the trace from the headers in GenerationRequest.trace)."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    client, gateway = served[3:]
    exporter = InMemorySpanExporter()
    assert setup_tracing(gateway.settings, "test", exporter)
    try:
        assert chat(client).status_code == 200
        tracing.flush()
    finally:
        setup_tracing(gateway.settings, "test")  # off again (MOE_OTLP_ENDPOINT is unset)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    request, route, pool = spans["moe.request"], spans["moe.route"], spans["moe.pool.generate"]
    assert route.parent.span_id == request.context.span_id and pool.parent.span_id == request.context.span_id
    assert len({s.context.trace_id for s in (request, route, pool)}) == 1
    assert request.attributes["status"] == 200 and pool.attributes["pool"] == "default"
    assert route.attributes["router_version"] == 1 and pool.attributes["completion_tokens"] > 0
    assert tracing.start_span("off") is None


def test_otlp_endpoint_turns_the_exporter_on(settings):
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="the otel extra is not installed")
    settings.otlp_endpoint = "http://127.0.0.1:9/v1/traces"  # nothing is sent: no span is started
    try:
        assert setup_tracing(settings, "test")
    finally:
        settings.otlp_endpoint = None
        assert not setup_tracing(settings, "test")


DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "moe-dashboard.json"
HUB_ONLY = {"moe_metrics_sources"}
"""Series only the MetricsHub adds (the in-process app has no replicas to count)."""


def test_dashboard_queries_series_that_exist(served):
    """Every series the Grafana dashboard queries is one /metrics serves: a renamed metric breaks this test,
    not a panel in production."""
    text = served[2]
    exposed = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    exposed |= {name + suffix for name in exposed for suffix in ("_bucket", "_sum", "_count")}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    queried = {m for expr in exprs for m in re.findall(r"\bmoe_[a-z0-9_]+", expr)}
    assert len(exprs) > 20 and queried - exposed - HUB_ONLY == set()


@pytest.mark.skipif(promtool() is None, reason="promtool not found (Debian package `prometheus`)")
def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses every panel query (as recording rules, Grafana's variables filled in)."""
    dashboard = json.loads(DASHBOARD.read_text())
    fill = {"$__rate_interval": "5m", "$expert": ".*", "$pool": ".*"}
    rules = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in fill.items():
                expr = expr.replace(variable, value)
            rules.append({"record": f"moe:panel_{panel['id']}_{target['refId']}", "expr": expr})
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


TINY_APP = "moe-metrics-test"


@pytest.mark.integration
def test_two_ingress_replicas_report_the_same_totals(live, tmp_path_factory, tiny_backbone_dir):
    """A small app of its own on the live Ray (the tiny backbone, two ingress replicas, zero CPUs reserved):
    after N requests, every scrape of /metrics, whichever replica answers it, says N."""
    from ray import serve

    from api.serve_app import build_app
    from registry.db import session_factory
    from serving.local_ray import wait_healthy

    home = tmp_path_factory.mktemp("metrics-app")
    placement = home / "pools.yaml"
    placement.write_text(yaml.safe_dump({"ingress_replicas": 2, "ingress_num_cpus": 0, "pools": [
        {"name": "default", "num_cpus": 0, "torch_threads": 1}]}))
    settings = tiny_settings(home / "home", tiny_backbone_dir)
    settings.deploy_config = placement
    session_factory(settings)  # the registry's schema, before the replicas open it
    serve.run(build_app(settings), name=TINY_APP, route_prefix="/" + TINY_APP, blocking=False)
    url = f"{live['url']}/{TINY_APP}"
    try:
        wait_healthy(url, 240)
        body = {"model": "base", "max_tokens": 2, "messages": [{"role": "user", "content": "hello"}]}
        with ThreadPoolExecutor(8) as workers:
            codes = list(workers.map(lambda _: httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
                                     .status_code, range(16)))
        assert codes == [200] * 16
        answered = lambda: total(samples(httpx.get(url + "/metrics", timeout=30).text),  # noqa: E731
                                 "moe_requests_total", expert="base", routing="forced")
        deadline = time.monotonic() + 30
        while answered() != 16 and time.monotonic() < deadline:
            time.sleep(0.5)
        scrapes = [samples(httpx.get(url + "/metrics", timeout=30).text) for _ in range(8)]
        assert [total(s, "moe_requests_total", routing="forced") for s in scrapes] == [16] * 8
        assert all(total(s, "moe_metrics_sources", role="ingress") == 2 for s in scrapes)
        hub = serve.get_deployment_handle("MetricsHub", app_name=TINY_APP)
        per_replica = hub.per_source.remote("moe_requests_total").result()
        ingress = [v for source, v in per_replica.items() if source.startswith("ingress-")]
        assert len(ingress) == 2 and sum(ingress) == 16
        assert min(ingress) > 0, f"one replica answered every request ({ingress}): the check proves nothing"
    finally:
        serve.delete(TINY_APP)
