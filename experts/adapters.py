"""LoRA adapters as files: peft folders (adapter_config.json + adapter_model.safetensors) plus our
metadata sidecar. Loading never unpickles; validation checks an adapter against the backbone."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from core.errors import AdapterValidationError
from core.names import validate_expert_name as validate_expert_name  # re-exported: the rule is in core.names
from core.settings import Settings
from experts.backbone import Backbone

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
METADATA_FILE = "moe_expert.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")


def lora_config_from_settings(settings: Settings) -> LoraConfig:
    return LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=0.05,
        target_modules=list(settings.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


@dataclass
class LoraWeights:
    """A LoRA adapter in memory, keyed by the backbone's module path (e.g. model.layers.0.self_attn.q_proj)."""

    name: str
    rank: int
    """Largest rank over the modules."""
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """module path -> (A [r, in_features], B [out_features, r] already multiplied by the scaling)."""
    config: dict = field(default_factory=dict)
    """The peft adapter_config.json as read."""

    @property
    def num_parameters(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.modules.values())


def _refuse_pickles(folder: Path) -> None:
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise AdapterValidationError(
            f"{folder} holds pickled weights ({', '.join(pickled)}); only safetensors are loaded. "
            "Re-save the adapter with save_pretrained(..., safe_serialization=True)."
        )


def read_adapter_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterValidationError(f"{folder} has no {CONFIG_FILE}; it is not a peft adapter folder.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterValidationError(f"{path} is not valid JSON.") from exc
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterValidationError(f"{path}: peft_type must be LORA.")
    if config.get("use_dora"):
        raise AdapterValidationError(f"{path}: DoRA adapters are not supported by the batched engine.")
    if config.get("modules_to_save"):
        raise AdapterValidationError(f"{path}: modules_to_save is not supported; only LoRA weights can be shared.")
    if config.get("bias", "none") != "none":
        raise AdapterValidationError(f"{path}: LoRA bias terms are not supported (bias must be 'none').")
    return config


def read_metadata(folder: Path) -> dict:
    path = folder / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterValidationError(f"{path} is not valid JSON.") from exc


def write_metadata(folder: Path, metadata: dict) -> None:
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True), encoding="utf-8")


def _scaling(config: dict, module: str, rank: int) -> float:
    alpha = float(config.get("lora_alpha", rank))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.search(pattern, module):
            alpha = float(value)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def load_lora_weights(folder: str | Path, name: str, dtype: torch.dtype = torch.float32) -> LoraWeights:
    """Read an adapter folder (safetensors only) into LoraWeights; shape checks come in `validate_against`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterValidationError(f"Adapter folder {folder} does not exist.")
    _refuse_pickles(folder)
    config = read_adapter_config(folder)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterValidationError(f"{folder} has no {WEIGHTS_FILE}.")
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterValidationError(f"{weights_path} is corrupted or not a safetensors file ({exc}).") from exc
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise AdapterValidationError(f"{weights_path}: unexpected tensor {key!r} (only lora_A/lora_B).")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    if not parts:
        raise AdapterValidationError(f"{weights_path} holds no LoRA tensors.")
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, pair in parts.items():
        if set(pair) != {"A", "B"}:
            raise AdapterValidationError(f"{weights_path}: {module} lacks its lora_A or lora_B tensor.")
        a, b = pair["A"], pair["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterValidationError(f"{weights_path}: {module} has mismatched LoRA shapes.")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterValidationError(f"{weights_path}: {module} contains NaN or infinite values.")
        rank = a.shape[0]
        modules[module] = (a.to(dtype), (b.float() * _scaling(config, module, rank)).to(dtype))
    rank = max(a.shape[0] for a, _ in modules.values())
    return LoraWeights(name=name, rank=rank, modules=modules, config=config)


def validate_against(weights: LoraWeights, backbone: Backbone, settings: Settings, folder: Path | None = None):
    """Check that every adapted module exists in the backbone as a Linear of matching shape, the rank
    limit, and the backbone fingerprint when the adapter records one."""
    if weights.rank > settings.max_lora_rank:
        raise AdapterValidationError(
            f"Adapter rank {weights.rank} exceeds the limit {settings.max_lora_rank} (MOE_MAX_LORA_RANK)."
        )
    if folder is not None:
        recorded = read_metadata(folder).get("backbone_fingerprint")
        if recorded and recorded != backbone.fingerprint:
            raise AdapterValidationError(
                f"Adapter was trained on backbone {recorded}, the service runs {backbone.fingerprint} "
                f"({backbone.name}); retrain it on this backbone or set MOE_BACKBONE."
            )
    named = dict(backbone.model.named_modules())
    for module, (a, b) in weights.modules.items():
        target = named.get(module)
        base = getattr(target, "base", target)  # already wrapped by the multi-LoRA layer
        if not isinstance(base, nn.Linear):
            raise AdapterValidationError(
                f"Adapter targets {module}, which is not a linear layer of backbone {backbone.name}."
            )
        if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
            raise AdapterValidationError(
                f"Adapter shapes for {module} ({tuple(b.shape[:1])}x{tuple(a.shape[1:])}) do not fit the "
                f"backbone ({base.out_features}x{base.in_features})."
            )


def load_validated(folder: str | Path, name: str, backbone: Backbone, settings: Settings) -> LoraWeights:
    weights = load_lora_weights(folder, name, dtype=backbone.dtype)
    validate_against(weights, backbone, settings, Path(folder))
    return weights
