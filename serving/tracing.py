"""Optional OpenTelemetry traces of one request: `moe.request` (ingress), `moe.route` (the router's decision)
and `moe.pool.generate` (the pool replica), exported over OTLP/HTTP when MOE_OTLP_ENDPOINT is set.

Off (the default), every function here returns after one check, and nothing imports the SDK. The span
context crosses the Ray boundary as W3C trace-context headers in `GenerationRequest.trace`, so the pool's span
joins the ingress's trace. The provider is this module's own, not OpenTelemetry's global one: MLflow and
Ray keep theirs."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span

    from core.settings import Settings

logger = logging.getLogger(__name__)

_provider: TracerProvider | None = None
Attribute = str | int | float | bool


def setup_tracing(settings: Settings, service: str, exporter: SpanExporter | None = None) -> bool:
    """Trace this process when MOE_OTLP_ENDPOINT is set (or `exporter` is given, as in tests); True when on."""
    global _provider
    if _provider is not None:
        _provider.shutdown()
        _provider = None
    if settings.otlp_endpoint is None and exporter is None:
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint)
    except ImportError as exc:
        logger.warning("MOE_OTLP_ENDPOINT is set but OpenTelemetry is not installed (%s; pip install "
                       "'moe-lora[otel]'): no traces", exc)
        return False
    _provider = TracerProvider(resource=Resource.create({"service.name": service}))
    _provider.add_span_processor(BatchSpanProcessor(exporter))  # exported off the request path
    return True


def flush() -> None:
    if _provider is not None:
        _provider.force_flush()


def start_span(name: str, parent: Span | dict[str, str] | None = None, **attributes: Attribute | None) -> Span | None:
    """A started span (None when tracing is off); `parent` is a span of this process or the trace-context
    headers of one in another."""
    if _provider is None:
        return None
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if isinstance(parent, dict):
        context = TraceContextTextMapPropagator().extract(parent) if parent else None
    else:
        context = trace.set_span_in_context(parent) if parent is not None else None
    span = _provider.get_tracer("moe-lora").start_span(name, context=context)
    set_attributes(span, **attributes)
    return span


def set_attributes(span: Span | None, **attributes: Attribute | None) -> None:
    if span is not None:
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})


def end_span(span: Span | None, error: str | None = None, **attributes: Attribute | None) -> None:
    if span is None:
        return
    set_attributes(span, **attributes)
    if error is not None:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, error))
    span.end()


def headers(span: Span | None) -> dict[str, str]:
    """The span's W3C trace-context headers ({} when tracing is off), for the pool to continue the trace."""
    if span is None:
        return {}
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, Any] = {}
    TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(span))
    return carrier
