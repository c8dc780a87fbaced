"""Deploy files validate against Ray's own Serve schema and our placement schema; the app graph builds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from api.serve_app import DeployConfig, app_builder, load_deploy_config
from core.settings import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_serve_config_matches_ray_schema():
    config = ServeDeploySchema.model_validate(yaml.safe_load((DEPLOY / "serve_config.yaml").read_text()))
    app = config.applications[0]
    assert app.import_path == "api.serve_app:app_builder"
    Settings(**app.args)  # every arg is a real setting


def test_rayservice_inlines_a_valid_serve_config():
    manifest = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService"
    config = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    Settings(**config.applications[0].args)
    groups = {g["groupName"]: g for g in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


@pytest.mark.parametrize("name", ["pools.yaml", "pools.gpu.yaml"])
def test_pool_files_validate(name):
    config = DeployConfig.model_validate(yaml.safe_load((DEPLOY / name).read_text()))
    assert config.pools


def test_app_graph_builds_with_pool_resources(tmp_path):
    settings = Settings(home=tmp_path, deploy_config=DEPLOY / "pools.gpu.yaml", admin_token="s3cret")
    assert [p.name for p in load_deploy_config(settings).pools] == ["gpu", "cpu"]
    assert settings.payload()["admin_token"] == "s3cret"  # secrets reach the replicas
    app = app_builder({"home": str(tmp_path), "deploy_config": str(DEPLOY / "pools.gpu.yaml")})
    assert app is not None


def test_local_head_port_avoids_a_taken_default(monkeypatch):
    """`moe up` must not clash with a Redis (or anything) on Ray's default 6379."""
    import socket

    from serving import local_ray

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        monkeypatch.setattr(local_ray, "RAY_DEFAULT_PORT", busy)
        chosen = local_ray.head_port(Settings())
        assert chosen != busy and local_ray._port_free(chosen)
    assert local_ray.head_port(Settings(ray_head_port=6390)) == 6390
