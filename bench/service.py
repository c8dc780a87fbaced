"""The local service for benchmarks: a scratch data home (the shipped experts and router), Ray on this
machine with RAY_AUTH_MODE=disabled, Serve's proxy on 127.0.0.1 at a free port. One per process."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.http import free_port
from core.settings import Settings

logger = logging.getLogger(__name__)

SHARED_CACHE = Path(tempfile.gettempdir()) / "moe-bench-cache"
"""The backbone's safetensors conversion, kept across runs (a scratch home would convert again, ~20 s)."""


def scratch_settings(prefix: str, **overrides: Any) -> Settings:
    home = Path(tempfile.mkdtemp(prefix=prefix))
    SHARED_CACHE.mkdir(parents=True, exist_ok=True)
    (home / "cache").symlink_to(SHARED_CACHE, target_is_directory=True)
    return Settings(home=home, port=free_port(), **overrides)


@contextmanager
def local_service(settings: Settings, timeout_s: float = 300) -> Iterator[str]:
    """Registers the defaults in `settings.home`, serves them, yields the URL; shuts Serve and Ray down."""
    import ray
    from ray import serve

    from api.serve_app import APP_NAME, build_app
    from experts.backbone import load_backbone
    from pipelines.bootstrap import ensure_defaults
    from registry.db import session_factory
    from serving.local_ray import LOCAL_ENV, wait_healthy

    os.environ.update(LOCAL_ENV)
    backbone = load_backbone(settings)
    ensure_defaults(settings, session_factory(settings), backbone)
    del backbone  # the replicas load their own; the driver should not hold 540 MB it never uses
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": settings.port})
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{settings.port}"
        wait_healthy(url, timeout_s)
        yield url
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
