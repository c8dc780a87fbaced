"""The sparse top-k gate: features -> one logit per expert plus a `base` column (no expert) -> softmax
(temperature-calibrated) -> top-k renormalised, with an abstain threshold that falls back to the bare
backbone when the router is unsure. Saved as safetensors plus a JSON config."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from router.features import FeatureSpec

BASE = "base"


@dataclass
class GateConfig:
    """Shape and behaviour of one router version."""

    labels: list[str]
    """Gate columns in order: expert names, then 'base'."""
    input_size: int
    """Feature size (the backbone's hidden size times the number of layers, plus the sentence embedding's)."""
    layers: list[int]
    """Backbone layers (1-based, ascending) whose pooled outputs are concatenated into the features; must
    match at serving time. Empty: no backbone features."""
    hidden_size: int = 256
    """Width of the gate's hidden layer."""
    dropout: float = 0.1
    """Dropout inside the gate during training."""
    top_k: int = 1
    """Columns kept per request; their weights are renormalised to sum to 1."""
    temperature: float = 1.0
    """Softmax temperature fitted on validation data (calibration)."""
    abstain_threshold: float = 0.0
    """Below this top-1 probability the request goes to the bare backbone."""
    backbone_fingerprint: str = ""
    """Backbone the features were computed with."""
    sentence_encoder: str = ""
    """Sentence encoder whose embedding follows the backbone features ('' = none), e.g. 'all-MiniLM-L6-v2'."""
    prototype_dims: int = 0
    """Width of the trailing feature block (the sentence embedding) that class prototypes live in; 0 = none."""
    prototype_scale: float = 0.0
    """Weight of each column's prototype score, cos(embedding, mean training embedding of the column), added to
    its logit. A column learned from a few dozen prompts generalises through its prototype where the MLP only
    memorises them (docs/design-notes.md, bordering domains)."""
    metrics: dict = field(default_factory=dict)
    """Validation metrics at training time."""


    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec(tuple(self.layers), self.sentence_encoder)


class Gate(nn.Module):
    """Standardised features -> MLP -> logits [N, E+1]."""

    def __init__(self, config: GateConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("feature_mean", torch.zeros(config.input_size))
        self.register_buffer("feature_std", torch.ones(config.input_size))
        if config.prototype_dims:
            self.register_buffer("prototypes", torch.zeros(len(config.labels), config.prototype_dims))
        self.net = nn.Sequential(
            nn.Linear(config.input_size, config.hidden_size),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden_size, len(config.labels)),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, E+1]
        logits = self.net((features - self.feature_mean) / self.feature_std)
        if self.config.prototype_dims and self.config.prototype_scale:
            embedding = nn.functional.normalize(features[:, -self.config.prototype_dims :], dim=-1)  # [N, D]
            logits = logits + self.config.prototype_scale * embedding @ self.prototypes.T  # [N, E+1]
        return logits

    @torch.no_grad()
    def set_prototypes(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Each column's prototype: the normalised mean of its training rows' trailing embedding block."""
        if not self.config.prototype_dims:
            return
        embedding = nn.functional.normalize(features[:, -self.config.prototype_dims :], dim=-1)
        for column in range(len(self.config.labels)):
            rows = embedding[labels == column]
            self.prototypes[column] = nn.functional.normalize(rows.mean(0), dim=0) if len(rows) else 0.0

    def grow(self, labels: list[str]) -> Gate:
        """A gate for a longer label list, warm-started: shared columns keep their weights, new columns start
        from the mean of the old expert columns (a neutral prior)."""
        config = GateConfig(**{**asdict(self.config), "labels": labels, "metrics": {}})
        new = Gate(config)
        new.load_state_dict({k: v for k, v in self.state_dict().items()
                             if not k.startswith("net.3") and k != "prototypes"}, strict=False)
        old_w, old_b = self.net[3].weight.data, self.net[3].bias.data
        with torch.no_grad():
            for j, label in enumerate(labels):
                if label in self.config.labels:
                    i = self.config.labels.index(label)
                    new.net[3].weight[j], new.net[3].bias[j] = old_w[i], old_b[i]
                    if self.config.prototype_dims:  # a warm start's teacher must score exactly as this gate
                        new.prototypes[j] = self.prototypes[i]
                else:
                    new.net[3].weight[j], new.net[3].bias[j] = old_w.mean(0), old_b.mean() - 1.0
        return new


@dataclass
class RoutingDecision:
    """The router's answer for one request."""

    experts: list[tuple[str, float]]
    """Chosen columns, best first, with renormalised weights; [('base', 1.0)] = bare backbone."""
    confidence: float
    """Calibrated probability of the top column."""
    abstained: bool
    """True when confidence fell below the abstain threshold."""
    probabilities: dict[str, float]
    """Calibrated probability of every column."""

    @property
    def mixture(self) -> list[tuple[str, float]]:
        """What the engine runs: expert columns only. A `base` share in a top-k mixture stays out of the
        sum, which scales the experts' deltas down by that share."""
        return [(name, weight) for name, weight in self.experts if name != BASE]


def top_k_renormalised(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """probs [N, C] -> (weights [N, k] summing to 1, indices [N, k]), best first."""
    values, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return values / values.sum(-1, keepdim=True).clamp(min=1e-12), indices


class Router:
    """A trained gate plus its config: turns features into routing decisions."""

    def __init__(self, gate: Gate, version: int | None = None) -> None:
        self.gate = gate.eval()
        self.version = version

    @property
    def config(self) -> GateConfig:
        return self.gate.config

    @property
    def labels(self) -> list[str]:
        return self.config.labels

    @torch.no_grad()
    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.gate(features) / self.config.temperature, dim=-1)

    def decide(
        self, features: torch.Tensor, top_k: int | None = None, abstain_threshold: float | None = None,
        allowed: set[str] | None = None,
    ) -> list[RoutingDecision]:
        """`allowed` masks columns (e.g. retired experts) before top-k; `base` is always allowed."""
        probs = self.probabilities(features)
        if allowed is not None:
            keep = torch.tensor([label in allowed or label == BASE for label in self.labels])
            probs = probs * keep
            probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-12)
        k = top_k or self.config.top_k
        threshold = self.config.abstain_threshold if abstain_threshold is None else abstain_threshold
        weights, indices = top_k_renormalised(probs, k)
        decisions = []
        for row in range(probs.shape[0]):
            confidence = float(probs[row, indices[row, 0]])
            abstained = confidence < threshold
            if abstained:
                experts = [(BASE, 1.0)]
            else:
                experts = [
                    (self.labels[int(i)], float(w)) for i, w in zip(indices[row], weights[row], strict=True) if w > 0
                ]
            decisions.append(
                RoutingDecision(
                    experts=experts, confidence=confidence, abstained=abstained,
                    probabilities={label: float(p) for label, p in zip(self.labels, probs[row], strict=True)},
                )
            )
        return decisions

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.gate.state_dict().items()}, str(folder / "router.safetensors"))
        (folder / "router.json").write_text(json.dumps(asdict(self.config), indent=2, sort_keys=True))
        return folder

    @classmethod
    def load(cls, folder: Path, version: int | None = None) -> Router:
        raw = json.loads((folder / "router.json").read_text())
        if "layer" in raw:  # routers saved before multi-layer features: one layer
            raw["layers"] = [raw.pop("layer")]
        gate = Gate(GateConfig(**raw))
        gate.load_state_dict(load_file(str(folder / "router.safetensors")))
        return cls(gate, version=version)
