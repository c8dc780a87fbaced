"""Verb: train a router version on the registry's labelled routing prompts, compare it with the active
router on the same held-out set, and promote it only when it wins.

The promotion rule is pipelines.promotion's. Experts the router learned are then switched from `unrouted` to
`active`; one whose label fell short of the majority rule stays `unrouted` (masked when serving), and the rest of
the candidate is judged with it masked.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import torch
from sqlalchemy.orm import Session, sessionmaker

from core.errors import InvalidInputError
from core.settings import Settings
from core.text import text_key
from experts.seed import split_digest
from pipelines.plots import save_confusion_matrix
from pipelines.promotion import compare, held_back, held_back_reason
from pipelines.tracking import mlflow_run
from registry import repository as repo
from registry.models import ExpertStatus, RouterStatus
from router.augment import augment
from router.feature_cache import FeatureCache
from router.features import FeatureSpec, RouterFeatures
from router.gate import BASE, Router
from router.training import RouterTrainConfig, evaluate, train_router_on_features

logger = logging.getLogger(__name__)

NEW_ROW_SOURCES = ("log:", "prompts:")
"""Source prefixes of rows a warm start trains as new even when their label is known (training_rows): feedback
labels and prompts added to a registered expert (pipelines.routing_prompts)."""

Encode = Callable[[Sequence[str], FeatureSpec], torch.Tensor]
"""(texts, spec) -> features [N, F] in the layout `spec` names."""


@dataclass
class LabelledSet:
    texts: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    def add(self, text: str, label: str, source: str) -> None:
        self.texts.append(text)
        self.labels.append(label)
        self.sources.append(source)

    def subset(self, rows: Sequence[int]) -> LabelledSet:
        return LabelledSet([self.texts[i] for i in rows], [self.labels[i] for i in rows],
                           [self.sources[i] for i in rows])


@dataclass
class RouterReport:
    version: int
    promoted: bool
    reasons: list[str]
    metrics: dict
    active_version: int | None
    active_metrics: dict | None
    run_id: str | None
    path: str


def make_encoder(model, tokenizer, cache_dir: Path | None = None, fingerprint: str = "",
                 sentence_loader=None) -> Encode:
    """(texts, spec) -> features; with `cache_dir`, features are cached on disk per backbone and layout."""
    features = RouterFeatures(model, tokenizer, sentence_loader)
    caches: dict[FeatureSpec, FeatureCache] = {}

    def encode(texts: Sequence[str], spec: FeatureSpec) -> torch.Tensor:
        def run(todo: Sequence[str]) -> torch.Tensor:
            return features.encode(list(todo), spec, progress=len(todo) > 256)

        if cache_dir is None:
            return run(texts)
        if spec not in caches:
            caches[spec] = FeatureCache(cache_dir, fingerprint, spec.key)
        return caches[spec].lookup(list(texts), run)

    return encode


def backbone_encoder(settings: Settings, backbone) -> Encode:
    """The encoder every pipeline uses: the backbone's features, cached under <home>/cache/features."""
    return make_encoder(backbone.model, backbone.tokenizer, settings.cache_dir / "features", backbone.fingerprint)


def sentence_width(encode: Encode, spec: FeatureSpec, text: str) -> int:
    """Width of the sentence-embedding block that ends `spec`'s features (0 without a sentence encoder): the gate
    scores class prototypes in that block (GateConfig.prototype_dims)."""
    if not spec.sentence_encoder:
        return 0
    return int(encode([text], FeatureSpec(sentence_encoder=spec.sentence_encoder)).shape[1])


def load_labelled(session: Session, labels: Sequence[str]) -> tuple[LabelledSet, LabelledSet]:
    train, val = LabelledSet(), LabelledSet()
    seen: set[tuple[str, str]] = set()
    for row in repo.routing_examples(session, list(labels)):
        key = (text_key(row.text), row.label)
        if key in seen:
            continue
        seen.add(key)
        (val if row.split == "val" else train).add(row.text, row.label, row.source)
    return train, val


def rows_per_label(train: LabelledSet, per_label: int) -> list[int]:
    """Every row of a label with at most `per_label` rows (a new expert's few prompts, log labels), a fixed
    hash-chosen `per_label` of a bigger one, in row order. Fixed, so the feature cache keeps hitting across
    retrains. Used for the rows that get a noisy variant (real text brings its own typos and casing; variants
    matter most where a label has little data, and each one costs a backbone pass) and for the replayed rows."""
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(train.labels):
        by_label.setdefault(label, []).append(i)
    chosen: list[int] = []
    for members in by_label.values():
        chosen += sorted(members, key=lambda i: split_digest(train.texts[i]))[:per_label]
    return sorted(chosen)


def _log_router_run(prefix: str, metrics: dict, labels: list[str], tmp: Path) -> None:
    mlflow.log_metrics(
        {
            f"{prefix}accuracy": metrics["accuracy"],
            f"{prefix}ece": metrics["ece"],
            f"{prefix}abstain_rate": metrics["abstain_rate"],
            **{f"{prefix}recall_{k}": v["recall"] for k, v in metrics["per_label"].items()},
            **{f"{prefix}precision_{k}": v["precision"] for k, v in metrics["per_label"].items()},
        }
    )
    image = save_confusion_matrix(
        np.array(metrics["confusion"]), labels, tmp / f"{prefix or 'candidate_'}confusion.png",
        title=f"{prefix or 'candidate '}router (acc {metrics['accuracy']:.3f})",
    )
    mlflow.log_artifact(str(image))


@dataclass
class TrainingRows:
    """What one fit trains on: the labelled rows kept, the noisy variants' source rows, the replay mask."""

    train: LabelledSet
    augmented_from: list[int]
    """Indices into `train` that also get a noisy variant; their rows follow the originals, in this order."""
    replay: list[bool]
    """Per original row: a seed prompt of a label the warm-start gate already knows (distilled from it)."""


def training_rows(train: LabelledSet, known_labels: Sequence[str] | None, config: RouterTrainConfig) -> TrainingRows:
    """Cold start (`known_labels` None): every row, and noisy variants for up to `augment_per_label` per label.
    Warm start: the new rows (log labels, added prompts, a new expert's prompts) all, each with a noisy variant;
    of the replayed seed rows a fixed hash-chosen `replay_per_label` per label, without variants. The active gate
    already fits the seed rows and distillation keeps its answers on those replayed; the full replay cost a backbone
    pass per seed prompt on the first retrain (about 20,000 on the real-text data, 10-18 min on 2 CPU cores)."""
    if known_labels is None:
        return TrainingRows(train, rows_per_label(train, config.augment_per_label), [False] * len(train.texts))
    replay = [not source.startswith(NEW_ROW_SOURCES) and label in known_labels
              for source, label in zip(train.sources, train.labels, strict=True)]
    replay_rows = [i for i, replayed in enumerate(replay) if replayed]
    new_rows = [i for i, replayed in enumerate(replay) if not replayed]
    kept_replay = [replay_rows[j] for j in rows_per_label(train.subset(replay_rows), config.replay_per_label)]
    new = train.subset(new_rows)
    augmented_from = [len(kept_replay) + i for i in rows_per_label(new, config.augment_per_label)]
    return TrainingRows(train.subset(kept_replay + new_rows), augmented_from,
                        [True] * len(kept_replay) + [False] * len(new_rows))


def routable_state(sessions: sessionmaker[Session]) -> tuple[list[str], list[str], LabelledSet, LabelledSet,
                                                               tuple[int, Path] | None]:
    """(routed experts, labels with `base` last, train, val, active router's (version, path))."""
    with sessions() as session:
        served = [e.name for e in repo.served_experts(session)]
        with_examples = {row.label for row in repo.routing_examples(session, served)}
        # An expert imported without routing prompts can be served by name but not routed to.
        experts = [name for name in served if name in with_examples]
        skipped = sorted(set(served) - set(experts))
        if skipped:
            logger.warning("No routing prompts for %s: they stay unrouted", skipped)
        if not experts:
            raise InvalidInputError(
                "No registered expert has routing prompts; add one with `moe expert add NAME --data FILE`."
            )
        labels = [*sorted(experts), BASE]
        train, val = load_labelled(session, labels)
        active = repo.active_router(session)
        return experts, labels, train, val, ((active.version, Path(active.path)) if active else None)


def train_router(
    settings: Settings,
    sessions: sessionmaker[Session],
    encode: Encode,
    fingerprint: str,
    config: RouterTrainConfig | None = None,
    extra_train: LabelledSet | None = None,
    extra_val: LabelledSet | None = None,
    promote: str = "auto",
    run_tags: dict[str, str] | None = None,
) -> RouterReport:
    """Train, evaluate against the active router, store, and (per `promote`: auto/always/never) promote."""
    config = config or RouterTrainConfig(top_k=settings.router_top_k)
    experts, labels, train, val, active_info = routable_state(sessions)
    for extra, target in ((extra_train, train), (extra_val, val)):
        if extra:
            for text, label, source in zip(extra.texts, extra.labels, extra.sources, strict=True):
                if label in labels:
                    target.add(text, label, source)
    missing = [label for label in experts if label not in train.labels]
    if missing:
        raise InvalidInputError(f"No training prompts for {missing} (all fell in the validation split); add more.")
    spec = settings.router_features
    active_router = Router.load(active_info[1], active_info[0]) if active_info else None
    same_features = active_router is not None and active_router.config.spec == spec
    init = active_router.gate if same_features else None
    rows = training_rows(train, active_router.labels if init is not None else None, config)
    train = rows.train
    augmented = augment([train.texts[i] for i in rows.augmented_from], seed=config.seed)
    logger.info("Encoding %d training (+%d augmented) and %d validation prompts (%s)",
                len(train.texts), len(augmented), len(val.texts), spec.key)
    train_x = encode(train.texts + augmented, spec)
    train_y = torch.tensor([labels.index(label) for label in train.labels + [train.labels[i] for i in
                                                                             rows.augmented_from]])
    val_x = encode(val.texts, spec)
    val_y = torch.tensor([labels.index(label) for label in val.labels], dtype=torch.long)
    anchor = None
    if init is not None:  # the augmented copies follow the originals, same order
        anchor = torch.tensor(rows.replay + [rows.replay[i] for i in rows.augmented_from])
    router = train_router_on_features(labels, train_x, train_y, val_x, val_y, spec, fingerprint, config, init=init,
                                      anchor=anchor, prototype_dims=sentence_width(encode, spec, train.texts[0]))
    metrics = evaluate(router, val_x, val_y)
    active_metrics, pending, held = None, [], []
    if active_router is not None:
        with sessions() as session:
            routed = {e.name for e in repo.list_experts(session, [ExpertStatus.ACTIVE])}
        # unrouted experts (new, or held back before) and any the active router has no column for
        pending = [label for label in experts if label not in routed or label not in active_router.labels]
        held = held_back(metrics, pending)
        active_x = val_x if same_features else encode(val.texts, active_router.config.spec)
        known = [i for i, label in enumerate(val.labels) if label in active_router.labels]
        active_y = torch.tensor([active_router.labels.index(val.labels[i]) for i in known], dtype=torch.long)
        active_metrics = evaluate(active_router, active_x[known], active_y, allowed=routed)
        # unknown labels count as misses for the active router: it cannot route there at all
        active_metrics["accuracy"] *= len(known) / max(1, len(val.labels))
    unmasked = metrics
    if held:  # judged as it would serve: those columns masked
        metrics = evaluate(router, val_x, val_y, allowed=set(labels) - set(held))
    ok, reasons = compare(metrics, active_metrics, [label for label in pending if label not in held], held)
    reasons = [held_back_reason(unmasked, label) for label in held] + reasons
    promoted = promote == "always" or (promote == "auto" and ok)
    summary = {
        "train": dict(Counter(train.labels)), "val": dict(Counter(val.labels)),
        "sources": dict(Counter(train.sources + val.sources)), "augmented": len(augmented),
    }
    return _store(settings, sessions, router, [e for e in experts if e not in held], labels, config, metrics,
                  active_metrics, active_router.labels if active_router else [], summary, promoted, reasons, run_tags,
                  active_info[0] if active_info else None)


def _store(settings: Settings, sessions: sessionmaker[Session], router: Router, experts: list[str],
           labels: list[str], config: RouterTrainConfig, metrics: dict, active_metrics: dict | None,
           active_labels: list[str], summary: dict, promoted: bool, reasons: list[str],
           run_tags: dict[str, str] | None, active_version: int | None) -> RouterReport:
    """Save the candidate, log it to MLflow, record it in the registry and, when `promoted`, make it active and
    mark the experts it learned as routed."""
    with sessions.begin() as session:
        version = repo.next_router_version(session)
    path = router.save(settings.routers_dir / f"v{version}")
    with mlflow_run(settings, run_name=f"router:v{version}", tags={"kind": "train_router", **(run_tags or {})}) as run:
        mlflow.log_params({"features": router.config.spec.key, "labels": ",".join(labels),
                           "top_k": router.config.top_k, "temperature": router.config.temperature,
                           "abstain_threshold": router.config.abstain_threshold,
                           **{f"train_{k}": v for k, v in vars(config).items()}})
        mlflow.log_dict(summary, "data_summary.json")
        with tempfile.TemporaryDirectory() as tmp:
            _log_router_run("", metrics, labels, Path(tmp))
            if active_metrics is not None:
                _log_router_run("active_", active_metrics, active_labels, Path(tmp))
        mlflow.log_artifacts(str(path), artifact_path="router")
        mlflow.set_tag("promoted", str(promoted))
        run_id = run.info.run_id
    with sessions.begin() as session:
        repo.add_router_version(
            session, version=version, path=str(path), experts=labels, metrics=metrics, data_summary=summary,
            status=RouterStatus.CANDIDATE if promoted else RouterStatus.REJECTED, mlflow_run_id=run_id,
        )
        if promoted:
            repo.promote_router(session, version)
            for name in experts:
                expert = repo.require_expert(session, name)
                if expert.status == ExpertStatus.UNROUTED:
                    expert.status = ExpertStatus.ACTIVE
    logger.info("Router v%d: accuracy %.3f, promoted=%s (%s)", version, metrics["accuracy"], promoted,
                "; ".join(reasons))
    (path / "report.json").write_text(json.dumps({"promoted": promoted, "reasons": reasons}, indent=2))
    return RouterReport(version, promoted, reasons, metrics, active_version, active_metrics, run_id, str(path))
