"""Routing features from the shared backbone: mean-pooled hidden states of one early-to-middle layer over
the prompt tokens, adapters off. A forward hook stops the pass at that layer, so routing costs only the
layers below it; a router that owns its backbone copy drops the rest with `truncate`."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return decoder.layers


class FeatureEncoder:
    """Texts -> [N, hidden] float32 features from backbone layer `layer` (1-based: output of layer `layer`)."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layer: int, max_tokens: int = 256
    ) -> None:
        layers = decoder_layers(model)
        if not 1 <= layer <= len(layers):
            raise ValueError(f"router layer {layer} outside 1..{len(layers)} (MOE_ROUTER_LAYER)")
        self.model = model
        self.tokenizer = tokenizer
        self.layer = layer
        self.max_tokens = max_tokens
        self._captured: torch.Tensor | None = None
        self._active = False  # the hook only stops passes started by encode(); generation runs through
        layers[layer - 1].register_forward_hook(self._hook)

    def _hook(self, _module: nn.Module, _inputs: tuple, output: object) -> None:
        if not self._active:
            return
        self._captured = output[0] if isinstance(output, tuple) else output
        raise _StopForward

    def truncate(self) -> None:
        """Drop every layer above `layer` and the LM head: this copy of the backbone is the router's alone."""
        decoder = self.model.get_decoder()
        decoder.layers = decoder.layers[: self.layer]
        self.model.config.num_hidden_layers = self.layer
        if hasattr(self.model, "lm_head"):
            self.model.lm_head = nn.Identity()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.model.config.hidden_size)
        # Longest first: batches pad little; the original order is restored at the end.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.zeros(len(texts), self.model.config.hidden_size)
        starts = range(0, len(order), batch_size)
        for start in tqdm(starts, desc="route features", unit="batch", disable=not progress):
            index = order[start : start + batch_size]
            batch = self.tokenizer(
                [texts[i] or " " for i in index], return_tensors="pt", padding=True, truncation=True,
                max_length=self.max_tokens, add_special_tokens=False,
            )
            ids = batch["input_ids"].to(self.device)
            mask = batch["attention_mask"].to(self.device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            self._captured, self._active = None, True
            try:
                self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
            except _StopForward:
                pass
            finally:
                self._active = False
            hidden = self._captured.float()  # [B, T, H]
            weights = mask.unsqueeze(-1).float()  # [B, T, 1]
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)  # [B, H]
            out[index] = pooled.cpu()
        return out
