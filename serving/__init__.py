"""Serving without HTTP: the expert pool (one backbone, its experts' adapters, the engine), the ingress's
routing micro-batcher, the local Ray head `moe up` starts, the metrics every replica records and the MetricsHub
that sums them, and optional OpenTelemetry tracing."""
