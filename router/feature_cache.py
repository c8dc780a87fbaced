"""A disk cache of routing features keyed by (backbone fingerprint, layers, text): retraining the router after
a new expert or new feedback encodes only the new texts. Stored as safetensors (one matrix) plus a JSON
index, never pickled."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)


def _digest(text: str) -> str:
    """The cache key of a text: its exact bytes (features depend on casing and spacing)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class FeatureCache:
    def __init__(self, folder: Path, fingerprint: str, layers_name: str) -> None:
        """`layers_name` names the feature layout, e.g. 'L6-10-16' (router.features.layers_key)."""
        self.matrix_path = folder / f"{fingerprint}-{layers_name}.safetensors"
        self.index_path = folder / f"{fingerprint}-{layers_name}.json"
        self._lock = threading.Lock()
        self.index: dict[str, int] = {}
        self.matrix: torch.Tensor | None = None
        if self.matrix_path.is_file() and self.index_path.is_file():
            try:
                self.matrix = load_file(str(self.matrix_path))["features"]
                self.index = json.loads(self.index_path.read_text())
            except Exception:  # a damaged cache is rebuilt, never trusted
                logger.warning("Ignoring unreadable feature cache %s", self.matrix_path)
                self.index, self.matrix = {}, None

    def lookup(self, texts: Sequence[str], encode: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
        """Features for `texts` [N, H]; only texts not seen before are encoded (and then stored)."""
        with self._lock:
            keys = [_digest(t) for t in texts]
            missing = sorted({k: t for k, t in zip(keys, texts, strict=True) if k not in self.index}.items())
            if missing:
                fresh = encode([t for _, t in missing])
                start = 0 if self.matrix is None else self.matrix.shape[0]
                self.matrix = fresh if self.matrix is None else torch.cat([self.matrix, fresh])
                self.index.update({k: start + i for i, (k, _) in enumerate(missing)})
                self._save()
            logger.info("Feature cache: %d cached, %d encoded", len(texts) - len(missing), len(missing))
            return self.matrix[[self.index[k] for k in keys]]

    def _save(self) -> None:
        self.matrix_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_matrix = self.matrix_path.with_name(self.matrix_path.name + ".tmp")
        save_file({"features": self.matrix.contiguous()}, str(tmp_matrix))
        tmp_index = self.index_path.with_name(self.index_path.name + ".tmp")
        tmp_index.write_text(json.dumps(self.index))
        tmp_matrix.replace(self.matrix_path)
        tmp_index.replace(self.index_path)
