"""Starting and stopping the local service: a detached Ray head on this machine (or a cluster at
MOE_RAY_ADDRESS), Serve's HTTP proxy on MOE_HOST:MOE_PORT, and the application from `build_app`."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time

import httpx

from core.errors import ModelUnavailableError
from core.settings import Settings

logger = logging.getLogger(__name__)

LOCAL_ENV = {
    # Ray 2.5x turns token auth on by default; a single-machine service on 127.0.0.1 runs without it.
    # Clusters (MOE_RAY_ADDRESS) keep Ray's own default.
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def _ray_cli() -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), "ray")
    return candidate if os.path.exists(candidate) else (shutil.which("ray") or "ray")


RAY_DEFAULT_PORT = 6379


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def head_port(settings: Settings) -> int:
    """The GCS port for a new local head: the configured one, else 6379 when free, else any free port
    (Redis listens on 6379 on many machines, and `ray start` then fails with a port clash)."""
    if settings.ray_head_port is not None:
        return settings.ray_head_port
    if _port_free(RAY_DEFAULT_PORT):
        return RAY_DEFAULT_PORT
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def connect(settings: Settings, start_local: bool) -> None:
    import ray

    if settings.ray_address:
        ray.init(address=settings.ray_address, namespace="moe", logging_level=logging.WARNING)
        return
    os.environ.update(LOCAL_ENV)
    if start_local:
        status = subprocess.run([_ray_cli(), "status"], capture_output=True, text=True, env=os.environ)
        if status.returncode != 0:
            port = head_port(settings)
            logger.info("Starting a local Ray head on port %d", port)
            started = subprocess.run(
                [_ray_cli(), "start", "--head", f"--port={port}", "--include-dashboard=false", "--disable-usage-stats",
                 "--num-cpus", str(max(2, os.cpu_count() or 2))],
                capture_output=True, text=True, env=os.environ,
            )
            if started.returncode != 0:
                raise ModelUnavailableError(
                    f"`ray start --head --port={port}` failed (set MOE_RAY_HEAD_PORT to another port, or "
                    f"MOE_RAY_ADDRESS to a running cluster): {started.stderr.strip()[-300:]}"
                )
    ray.init(address="auto", namespace="moe", logging_level=logging.WARNING)


def wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/healthz", timeout=5)
            if response.status_code == 200:
                return
            last = response.text[:200]
        except httpx.HTTPError as exc:
            last = exc.__class__.__name__
        time.sleep(1)
    raise ModelUnavailableError(f"The service did not become healthy at {url} within {timeout_s:.0f} s ({last}).")


def up(settings: Settings, timeout_s: float = 300) -> str:
    from ray import serve

    from api.serve_app import APP_NAME, build_app

    connect(settings, start_local=True)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{settings.host}:{settings.port}"
    wait_healthy(url, timeout_s)
    return url


def down(settings: Settings) -> None:
    import ray
    from ray import serve

    try:
        connect(settings, start_local=False)
        serve.shutdown()
        ray.shutdown()
    except Exception as exc:  # nothing running is fine: down is idempotent
        logger.info("No running service found (%s)", exc.__class__.__name__)
    if not settings.ray_address:
        subprocess.run([_ray_cli(), "stop", "--force"], capture_output=True, env={**os.environ, **LOCAL_ENV})
