"""Fitting a gate on cached features: class-balanced batches, cross-entropy plus load-balancing and z-loss,
optional noisy-logit or Gumbel exploration; then temperature calibration, the abstain threshold, and the
metrics every router version is judged by."""

from __future__ import annotations

import copy
import itertools
import logging
import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch

from router.features import FeatureSpec
from router.gate import Gate, GateConfig, Router
from router.losses import LOAD_BALANCE_COEF, Z_LOSS_COEF, distillation_loss, router_loss

logger = logging.getLogger(__name__)


@dataclass
class RouterTrainConfig:
    """Hyper-parameters of router training."""

    epochs: int = 80
    """Passes over the training features (each is cheap: the backbone is not run again)."""
    batch_size: int = 64
    """Rows per step, drawn class-balanced (every label equally likely)."""
    learning_rate: float = 2e-3
    """AdamW learning rate."""
    warm_epochs: int = 20
    """Passes when warm-starting from the active router's gate. That gate already fits the replayed rows, so
    a quarter of the cold passes is enough for the new rows; each pass over the seed features costs seconds
    on a CPU, so this makes `retrain --from-logs` and registering an expert about 4x faster to fit."""
    warm_learning_rate: float = 5e-4
    """AdamW learning rate when warm-starting from the active router's gate (a new expert, a retrain from
    logs): smaller steps keep the existing experts' decisions, so their recall does not drift by chance."""
    distill_coef: float = 1.0
    """When warm-starting, weight of a KL term that keeps the candidate's output equal to the active router's on
    replayed rows (seed prompts of labels it already knew), so only the new labels move decisions; 0 = off.
    Without it a retrain from logs drifted 0.5-1 point of validation accuracy by training noise alone and the
    promotion gate (never lower accuracy) rejected it."""
    weight_decay: float = 1e-2
    """AdamW weight decay."""
    hidden_size: int = 256
    """Width of the gate's hidden layer."""
    dropout: float = 0.2
    """Dropout inside the gate."""
    exploration: Literal["none", "noisy", "gumbel"] = "noisy"
    """noisy: Gaussian noise on the logits (noisy top-k); gumbel: Gumbel-softmax relaxation."""
    noise_std: float = 0.3
    """Std of the logit noise (noisy) or Gumbel temperature (gumbel)."""
    feature_noise: float = 0.1
    """Std of Gaussian noise added to standardised features: robustness to unseen phrasing."""
    label_smoothing: float = 0.05
    """Cross-entropy label smoothing."""
    load_balance_coef: float = LOAD_BALANCE_COEF
    """Weight of the Switch load-balancing loss."""
    z_loss_coef: float = Z_LOSS_COEF
    """Weight of the router z-loss."""
    top_k: int = 1
    """Top-k stored in the router config (serving may override with MOE_ROUTER_TOP_K)."""
    max_recall_loss: float = 0.001
    """The abstain threshold may turn at most this share of correct validation decisions into abstentions. Real
    queries from other sources are less confident than the validation split: at 0.01 the threshold sent 7.7% of
    real in-domain dev queries to `base` (3.8% without abstention); on the layer-10 router, 0.003 sent 4.8% (0.001:
    3.3%, no abstention 3.1%) while out-of-domain queries to `base` went 84.3% -> 82.6% (81.2%), docs/benchmarks.md."""
    augment_per_label: int = 1000
    """At most this many training prompts per label also get a noisy variant (router.augment). On a warm start
    only the new rows (log labels, a new expert's prompts) get one: the replayed rows' variants are in the
    active gate already."""
    replay_per_label: int = 600
    """Warm start (a retrain from logs, a new expert): at most this many of the active router's seed prompts per
    label are replayed and distilled from it, hash-chosen so the feature cache hits. Every replayed prompt
    costs a backbone pass the first time; the validation split is always used whole."""
    prototype_scale: float = 10.0
    """Weight of the prototype scores in the gate's logits when the features end with a sentence embedding
    (GateConfig.prototype_scale); 0 = an MLP alone."""
    seed: int = 0
    """Sampling and initialisation seed."""


def fit_gate(
    features: torch.Tensor,
    labels: torch.Tensor,
    config: GateConfig,
    train: RouterTrainConfig,
    init: Gate | None = None,
    anchor: torch.Tensor | None = None,
) -> Gate:
    """features [N, H] float32, labels [N] long (index into config.labels); anchor [N] bool marks the rows
    distilled from `init` (replayed rows), used only when warm-starting with train.distill_coef > 0."""
    torch.manual_seed(train.seed)
    teacher = None
    if init is not None and anchor is not None and train.distill_coef > 0 and bool(anchor.any()):
        teacher = copy.deepcopy(init).eval()  # frozen: keeps its own feature statistics
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
    gate = init if init is not None else Gate(config)
    mean, std = features.mean(0), features.std(0).clamp(min=1e-4)
    gate.feature_mean.copy_(mean)
    gate.feature_std.copy_(std)
    gate.set_prototypes(features, labels)
    counts = torch.bincount(labels, minlength=len(config.labels)).float()
    present = counts > 0
    row_weights = (1.0 / counts.clamp(min=1))[labels]  # class-balanced sampling
    steps_per_epoch = max(1, math.ceil(len(labels) / train.batch_size))
    optimizer = torch.optim.AdamW(gate.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay)
    total = steps_per_epoch * train.epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=train.learning_rate, total_steps=total)
    gate.train()
    for step in range(total):
        index = torch.multinomial(row_weights, train.batch_size, replacement=True)
        x = features[index]
        if train.feature_noise > 0:
            x = x + torch.randn_like(x) * std * train.feature_noise
        logits = gate(x)
        logits = logits.masked_fill(~present, -1e4)  # a label with no examples is never a target
        if train.exploration == "noisy":
            logits = logits + torch.randn_like(logits) * train.noise_std
        elif train.exploration == "gumbel":
            gumbel = -torch.empty_like(logits).exponential_().log()
            logits = (logits + gumbel) / max(train.noise_std, 1e-3)
        loss, parts = router_loss(
            logits, labels[index], train.load_balance_coef, train.z_loss_coef, train.label_smoothing
        )
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(x).masked_fill(~present, -1e4)
            distill = distillation_loss(logits, teacher_logits, anchor[index])
            loss = loss + train.distill_coef * distill
            parts["distill"] = distill.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % max(1, total // 5) == 0:
            logger.info("router step %d/%d loss %.4f %s", step + 1, total, loss.item(), parts)
    return gate.eval()


@torch.no_grad()
def fit_temperature(gate: Gate, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Temperature scaling: the T in a log grid that minimises validation NLL."""
    logits = gate(features)
    best, best_nll = 1.0, float("inf")
    for t in np.exp(np.linspace(np.log(0.25), np.log(8.0), 60)):
        nll = float(torch.nn.functional.cross_entropy(logits / float(t), labels))
        if nll < best_nll:
            best, best_nll = float(t), nll
    return best


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def pick_abstain_threshold(confidence: np.ndarray, correct: np.ndarray, max_recall_loss: float) -> float:
    """The highest threshold that abstains on at most `max_recall_loss` of the correct decisions: it catches
    the low-confidence mistakes while keeping almost every right answer routed."""
    right = np.sort(confidence[correct])
    if len(right) == 0:
        return 0.0
    allowed = math.floor(max_recall_loss * len(right))
    return float(right[allowed]) if allowed > 0 else float(max(0.0, right[0] - 1e-6))


def evaluate(router: Router, features: torch.Tensor, labels: torch.Tensor, allowed: set[str] | None = None) -> dict:
    """Top-1 accuracy (abstentions count as 'base'), per-label precision and recall, ECE, confusion matrix.
    `allowed`: the columns serving would route to (unrouted experts masked, as Router.decide masks them)."""
    names = router.labels
    decisions = router.decide(features, top_k=1, allowed=allowed)
    predicted = np.array([names.index(d.experts[0][0]) for d in decisions])
    truth = labels.numpy()
    confidence = np.array([d.confidence for d in decisions])
    raw = router.probabilities(features).argmax(-1).numpy()
    matrix = np.zeros((len(names), len(names)), dtype=int)
    for t, p in zip(truth, predicted, strict=True):
        matrix[t, p] += 1
    per_label = {}
    for i, name in enumerate(names):
        support = int(matrix[i].sum())
        predicted_i = int(matrix[:, i].sum())
        per_label[name] = {
            "precision": float(matrix[i, i] / predicted_i) if predicted_i else 0.0,
            "recall": float(matrix[i, i] / support) if support else 0.0,
            "support": support,
        }
    return {
        "accuracy": float((predicted == truth).mean()) if len(truth) else 0.0,
        "accuracy_no_abstain": float((raw == truth).mean()) if len(truth) else 0.0,
        "abstain_rate": float(np.mean([d.abstained for d in decisions])) if decisions else 0.0,
        "ece": expected_calibration_error(confidence, raw == truth),
        "per_label": per_label,
        "confusion": matrix.tolist(),
        "n": len(truth),
    }


def train_router_on_features(
    labels_order: list[str],
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    spec: FeatureSpec,
    fingerprint: str,
    train: RouterTrainConfig,
    init: Gate | None = None,
    anchor: torch.Tensor | None = None,
    prototype_dims: int = 0,
) -> Router:
    """anchor [N] bool: training rows the warm-start gate already covered (replay), distilled from it;
    prototype_dims: width of the trailing sentence-embedding block of the features (0 = none)."""
    config = GateConfig(
        labels=labels_order, input_size=train_x.shape[1], layers=list(spec.layers), hidden_size=train.hidden_size,
        dropout=train.dropout, top_k=train.top_k, backbone_fingerprint=fingerprint,
        sentence_encoder=spec.sentence_encoder, prototype_dims=prototype_dims,
        prototype_scale=train.prototype_scale if prototype_dims else 0.0,
    )
    if init is not None:
        init = init.grow(labels_order)
        init.config.dropout = train.dropout
        train = replace(train, learning_rate=train.warm_learning_rate, epochs=train.warm_epochs)
    gate = fit_gate(train_x, train_y, config if init is None else init.config, train, init=init, anchor=anchor)
    gate.config.temperature = fit_temperature(gate, val_x, val_y) if len(val_y) else 1.0
    router = Router(gate)
    if len(val_y):
        probs = router.probabilities(val_x)
        confidence, predicted = probs.max(-1)
        correct = (predicted == val_y).numpy()
        gate.config.abstain_threshold = pick_abstain_threshold(confidence.numpy(), correct, train.max_recall_loss)
    return router
