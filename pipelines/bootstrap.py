"""First run: register the four default experts (shipped adapters + seed prompts) and the `base` routing
prompts, then train and promote the first router. Idempotent: later runs find everything in place."""

from __future__ import annotations

import json
import logging
import shutil

from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings
from experts.adapters import read_adapter_config, read_metadata
from experts.backbone import Backbone
from experts.seed import (
    BASE_LABEL,
    DEFAULT_ADAPTERS_DIR,
    DEFAULT_DOMAINS,
    DEFAULT_ROUTER_DIR,
    GENERAL_DIR,
    seed_prompts,
)
from pipelines.train_expert import register_expert
from pipelines.train_router import backbone_encoder, train_router
from registry import repository as repo

logger = logging.getLogger(__name__)


def register_default_experts(settings: Settings, sessions: sessionmaker[Session], backbone: Backbone) -> list[str]:
    """Copy the shipped adapters into the data home and register them; returns the names added."""
    metrics = {}
    metrics_file = DEFAULT_ADAPTERS_DIR / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
    added = []
    with sessions.begin() as session:
        if not repo.routing_examples(session, [BASE_LABEL]):
            train, val = seed_prompts(GENERAL_DIR)
            repo.add_routing_examples(session, BASE_LABEL, train, "train", "seed")
            repo.add_routing_examples(session, BASE_LABEL, val, "val", "seed")
        for name, description in DEFAULT_DOMAINS.items():
            source = DEFAULT_ADAPTERS_DIR / name
            if repo.get_expert(session, name) is not None or not (source / "adapter_config.json").is_file():
                continue
            recorded = read_metadata(source).get("backbone_fingerprint")
            if recorded and recorded != backbone.fingerprint:
                logger.warning("Skipping default expert %s: trained on backbone %s, running %s", name, recorded,
                               backbone.fingerprint)
                continue
            target = settings.experts_dir / name / "v1"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target)
            config = read_adapter_config(target)
            train, val = seed_prompts(name)
            register_expert(
                session, name=name, description=description, adapter_path=str(target), backbone=backbone,
                rank=int(config["r"]), target_modules=sorted(config.get("target_modules") or []),
                metrics=metrics.get(name, {}), source="seed", routing_train=train, routing_val=val, run_id=None,
            )
            added.append(name)
    if added:
        logger.info("Registered default experts: %s", ", ".join(added))
    return added


def register_default_router(settings: Settings, sessions: sessionmaker[Session], backbone: Backbone) -> bool:
    """Register the shipped router (trained by `python -m pipelines.train_default_experts --router` on the same
    seed data) when it fits exactly: same backbone, same experts. Saves the first run ~minutes of CPU."""
    config_file = DEFAULT_ROUTER_DIR / "router.json"
    if not config_file.is_file():
        return False
    shipped = json.loads(config_file.read_text())
    with sessions() as session:
        experts = sorted(e.name for e in repo.served_experts(session))
    if shipped.get("backbone_fingerprint") != backbone.fingerprint or shipped.get("labels") != [*experts, BASE_LABEL]:
        return False
    with sessions.begin() as session:
        version = repo.next_router_version(session)
        target = settings.routers_dir / f"v{version}"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(DEFAULT_ROUTER_DIR, target)
        repo.add_router_version(session, version=version, path=str(target), experts=shipped["labels"],
                                metrics=shipped.get("metrics", {}), data_summary={"source": "shipped default"})
        repo.promote_router(session, version)
    logger.info("Registered the shipped default router as v%d", version)
    return True


def ensure_defaults(settings: Settings, sessions: sessionmaker[Session], backbone: Backbone) -> None:
    register_default_experts(settings, sessions, backbone)
    with sessions() as session:
        has_router = repo.active_router(session) is not None
        has_experts = bool(repo.served_experts(session))
    if has_router or not has_experts or register_default_router(settings, sessions, backbone):
        return
    logger.info("No active router: training the first one")
    train_router(settings, sessions, backbone_encoder(settings, backbone), backbone.fingerprint)
