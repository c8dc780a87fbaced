"""Routing features: mean-pooled hidden states of a few backbone layers over the prompt tokens (adapters off;
a forward hook stops the pass at the deepest of them, so routing costs only the layers below it, and a router
that owns its backbone copy drops the rest with `truncate`), and/or the embedding of a small sentence encoder
(router.sentence). `FeatureSpec` names the layout; `RouterFeatures` computes it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

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


def longest_first_batches(texts: Sequence[str], batch_size: int, desc: str, progress: bool) -> Iterator[list[int]]:
    """Indices of `texts` in batches, longest text first: each batch pads little; callers write results back by
    index, which restores the original order."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
        yield order[start : start + batch_size]


def layers_key(layers: Sequence[int]) -> str:
    """A stable name for a layer set: (6, 10, 16) -> 'L6-10-16' (cache files, logs)."""
    return "L" + "-".join(str(layer) for layer in sorted(set(layers)))


@dataclass(frozen=True)
class FeatureSpec:
    """What a router reads: backbone layers (1-based; empty = none) and a sentence encoder ('' = none).
    The feature vector is the pooled layers in ascending order, then the sentence embedding."""

    layers: tuple[int, ...] = ()
    sentence_encoder: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(sorted(set(self.layers))))
        if not self.layers and not self.sentence_encoder:
            raise ValueError("a router needs backbone layers or a sentence encoder "
                             "(MOE_ROUTER_LAYERS / MOE_ROUTER_SENTENCE_ENCODER)")

    @property
    def key(self) -> str:
        """A stable name for cache files and logs: 'L6-10-16', 'S-all-MiniLM-L6-v2', 'L16+S-all-MiniLM-L6-v2'."""
        parts = [layers_key(self.layers)] if self.layers else []
        if self.sentence_encoder:
            parts.append("S-" + "".join(c if c.isalnum() or c in "-_." else "_" for c in self.sentence_encoder))
        return "+".join(parts)


class RouterFeatures:
    """Computes any FeatureSpec's features from one backbone and lazily loaded sentence encoders. Not
    thread-safe: the backbone hooks hold per-pass state, so callers serialise `encode`."""

    def __init__(
        self, model: PreTrainedModel | None, tokenizer: PreTrainedTokenizerBase | None,
        sentence_loader: Callable[[str], object] | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self._sentence_loader = sentence_loader
        self._backbone: dict[tuple[int, ...], FeatureEncoder] = {}
        self._sentence: dict[str, object] = {}

    def backbone_encoder(self, layers: tuple[int, ...]) -> FeatureEncoder:
        if layers not in self._backbone:
            if self.model is None or self.tokenizer is None:
                raise ValueError(f"router features need backbone layers {list(layers)} but no backbone was given")
            self._backbone[layers] = FeatureEncoder(self.model, self.tokenizer, layers)
        return self._backbone[layers]

    def sentence_encoder(self, name: str):
        if name not in self._sentence:
            if self._sentence_loader is None:
                from router.sentence import SentenceEncoder

                # beside the backbone: on a GPU worker both run there (the device came from the settings)
                device = next(self.model.parameters()).device if self.model is not None else "cpu"
                self._sentence[name] = SentenceEncoder(name, device=device)
            else:
                self._sentence[name] = self._sentence_loader(name)
        return self._sentence[name]

    def encode(self, texts: Sequence[str], spec: FeatureSpec, progress: bool = False,
               batch_size: int = 32) -> torch.Tensor:
        """texts -> [N, sum of part sizes] float32."""
        parts = []
        if spec.layers:
            parts.append(self.backbone_encoder(spec.layers).encode(texts, batch_size, progress=progress))
        if spec.sentence_encoder:
            parts.append(self.sentence_encoder(spec.sentence_encoder).encode(texts, batch_size, progress=progress))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


class FeatureEncoder:
    """Texts -> [N, hidden * len(layers)] float32 features: the mean-pooled output of each listed backbone layer
    (1-based), concatenated in ascending layer order. Shallow layers carry wording and register, deeper ones
    topic; together they route better than any single layer (docs/benchmarks.md, router layer study)."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layers: Sequence[int] | int,
        max_tokens: int = 256,
    ) -> None:
        decoder_stack = decoder_layers(model)
        wanted = sorted({layers} if isinstance(layers, int) else set(layers))
        if not wanted or not all(1 <= layer <= len(decoder_stack) for layer in wanted):
            raise ValueError(f"router layers {wanted} must lie in 1..{len(decoder_stack)} (MOE_ROUTER_LAYERS)")
        self.model = model
        self.tokenizer = tokenizer
        self.layers: tuple[int, ...] = tuple(wanted)
        self.max_tokens = max_tokens
        self._captured: dict[int, torch.Tensor] = {}
        self._active = False  # the hooks only act in passes started by encode(); generation runs through
        self._truncated = False
        for layer in self.layers:
            decoder_stack[layer - 1].register_forward_hook(self._make_hook(layer))

    @property
    def output_size(self) -> int:
        return self.model.config.hidden_size * len(self.layers)

    def _make_hook(self, layer: int):
        def hook(_module: nn.Module, _inputs: tuple, output: object) -> None:
            if not self._active:
                return
            self._captured[layer] = output[0] if isinstance(output, tuple) else output
            if layer == self.layers[-1]:
                raise _StopForward  # nothing above the deepest routing layer is needed

        return hook

    def truncate(self) -> None:
        """Drop every layer above the deepest routing layer and the LM head: this backbone copy is the
        router's alone."""
        decoder = self.model.get_decoder()
        decoder.layers = decoder.layers[: self.layers[-1]]
        self._truncated = True
        self.model.config.num_hidden_layers = self.layers[-1]
        if hasattr(self.model, "lm_head"):
            self.model.lm_head = nn.Identity()

    def pack(self, mode: str) -> int:
        """Give the kept decoder layers low-bit copies (`mode`: experts.quant) that narrow passes read; returns
        their bytes. Only for a truncated copy that is the router's alone: one prompt's routing pass is bound
        by these layers' weight bytes (fp16 halves them; docs/benchmarks.md, routing cost), while a batch of
        prompts (the route batcher under load) is wide enough to read the fp32 weights the gate was fitted on."""
        from experts.quant import pack_linears

        if not self._truncated:
            raise ValueError("pack() serves a truncated router copy; call truncate() first")
        return pack_linears(decoder_layers(self.model), mode)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        if not texts:
            return torch.zeros(0, self.output_size)
        out = torch.zeros(len(texts), self.output_size)
        for index in longest_first_batches(texts, batch_size, "route features", progress):
            batch = self.tokenizer(
                [texts[i] or " " for i in index], return_tensors="pt", padding=True, truncation=True,
                max_length=self.max_tokens, add_special_tokens=False,
            )
            ids = batch["input_ids"].to(self.device)
            mask = batch["attention_mask"].to(self.device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            self._captured, self._active = {}, True
            try:
                self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
            except _StopForward:
                pass
            finally:
                self._active = False
            weights = mask.unsqueeze(-1).float()  # [B, T, 1]
            pooled = [
                (self._captured[layer].float() * weights).sum(1) / weights.sum(1).clamp(min=1)  # [B, H]
                for layer in self.layers
            ]
            out[index] = torch.cat(pooled, dim=-1).cpu()  # [B, H * len(layers)]
        return out
