"""MLflow set-up: a SQLite tracking store plus a local artifact folder by default (a file:// store is
refused by MLflow 3), or a remote tracking server by URI."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import mlflow

from core.settings import Settings

logger = logging.getLogger(__name__)


def configure_mlflow(settings: Settings) -> str:
    """Point MLflow at the configured store and return the experiment id."""
    settings.ensure_dirs()
    mlflow.set_tracking_uri(settings.resolved_mlflow_uri)
    experiment = mlflow.get_experiment_by_name(settings.mlflow_experiment)
    if experiment is not None:
        return experiment.experiment_id
    artifact_root = settings.resolved_artifact_root
    artifact_root.mkdir(parents=True, exist_ok=True)
    return mlflow.create_experiment(settings.mlflow_experiment, artifact_location=artifact_root.as_uri())


@contextmanager
def mlflow_run(settings: Settings, run_name: str, tags: dict[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    experiment_id = configure_mlflow(settings)
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags or {}) as run:
        logger.info("MLflow run %s (%s) at %s", run_name, run.info.run_id, settings.resolved_mlflow_uri)
        yield run
