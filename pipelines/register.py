"""Verb: register an existing peft LoRA adapter folder as an expert (`moe expert add NAME --adapter DIR`).

Everything is checked before anything changes: the name, safetensors only (pickles refused), the backbone
fingerprint when recorded, target modules and shapes, the rank limit, the routing prompts file. Only then
is the adapter copied into the data home and registered (as `unrouted` until a router learns it).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings
from experts.adapters import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    load_validated,
    read_metadata,
    validate_expert_name,
    write_metadata,
)
from experts.backbone import Backbone
from experts.data import load_texts
from experts.seed import split_texts
from pipelines.train_expert import register_expert
from registry import repository as repo
from registry.models import ExpertStatus


def register_adapter(settings: Settings, sessions: sessionmaker[Session], backbone: Backbone, name: str,
                     adapter_dir: Path, description: str = "", prompts: Path | None = None) -> int:
    validate_expert_name(name)
    with sessions() as session:
        repo.require_new_expert(session, name)
    weights = load_validated(adapter_dir, name, backbone, settings)
    texts = load_texts(prompts) if prompts is not None else []
    train, val = split_texts(texts)
    target = settings.experts_dir / name / "v1"
    staging = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=settings.experts_dir))
    try:
        for file in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copy2(adapter_dir / file, staging / file)
        write_metadata(staging, {**read_metadata(adapter_dir), "name": name,
                                 "backbone_fingerprint": backbone.fingerprint})
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    modules = sorted({path.rsplit(".", 1)[-1] for path in weights.modules})
    try:
        with sessions.begin() as session:
            return register_expert(session, name=name, description=description, adapter_path=str(target),
                                   backbone=backbone, rank=weights.rank, target_modules=modules, metrics={},
                                   source="adapter", routing_train=train, routing_val=val, run_id=None,
                                   status=ExpertStatus.UNROUTED)
    except Exception:
        shutil.rmtree(target, ignore_errors=True)  # nothing half-registered stays behind
        raise
