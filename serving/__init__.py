"""Serving without HTTP: the expert pool (one backbone, its experts' adapters, the engine), the ingress's
routing micro-batcher, and the local Ray head `moe up` starts."""
