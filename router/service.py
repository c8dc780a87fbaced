"""The router at run time: the active router version from the registry, over features from the backbone.
Reloads when the active version changes (promotion, rollback), without a restart."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core.errors import DatabaseUnavailableError, RouterNotTrainedError
from core.settings import Settings
from experts.quant import amx_cpu, fbgemm_available, resolve_quant
from registry import repository as repo
from router.features import FeatureSpec, RouterFeatures
from router.gate import Router, RoutingDecision

logger = logging.getLogger(__name__)


def router_copy_kernel() -> str | None:
    """The kernel of the ingress's own router copy for one prompt's pass, whatever the engine serves: the gate was
    fitted on fp32 features. bf16 through oneDNN on an AMX CPU (0.74x fp16's time for the layer-10 feature pass
    there; fbgemm's fp16 was slower than fp32 on that CPU), else fbgemm's fp16 (the same top-1 on every dev query;
    an int8 copy routed the same and no faster: docs/design-notes.md); None without either (fp32)."""
    if amx_cpu():
        return "bf16"
    return "fp16" if fbgemm_available() else None


class RoutingService:
    """Routes texts with the registry's active router; `refresh()` picks up a new version."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], model, tokenizer,
                 own_backbone: bool = False) -> None:
        self.settings = settings
        self.sessions = sessions
        self.model = model
        self.tokenizer = tokenizer
        self.own_backbone = own_backbone
        self.router: Router | None = None
        self.allowed: set[str] = set()
        self._features = RouterFeatures(model, tokenizer)
        self._truncated_to: int | None = None
        self._lock = threading.Lock()
        self._encode_lock = threading.Lock()  # one encoder pass at a time: the early-exit hook holds state
        self.checked_at = 0.0

    def _prepare(self, spec: FeatureSpec) -> None:
        """Load what `spec` needs; a backbone copy that serves routing only keeps just the layers it needs."""
        if spec.layers:
            deepest = spec.layers[-1]
            if self._truncated_to is not None and deepest > self._truncated_to:
                raise RouterNotTrainedError(
                    f"Router needs layer {deepest} but this router copy was truncated; restart the ingress."
                )
            encoder = self._features.backbone_encoder(spec.layers)
            if self.own_backbone and self._truncated_to is None:
                encoder.truncate()
                self._truncated_to = deepest
                mode = resolve_quant(self.settings.backbone_quant, encoder.device)
                kernel = router_copy_kernel()
                if mode != "none" and kernel is not None:
                    packed = encoder.pack(kernel)
                    logger.info("Router backbone layers 1-%d served %s (%.0f MB)", deepest, kernel, packed / 2**20)
        if spec.sentence_encoder:
            self._features.sentence_encoder(spec.sentence_encoder)

    def refresh(self) -> bool:
        """Load the active router and the set of routable experts; True when the version changed."""
        with self.sessions() as session:
            active = repo.active_router(session)
            allowed = {e.name for e in repo.list_experts(session, ["active"])}
        self.checked_at = time.monotonic()
        changed = False
        with self._lock:
            self.allowed = allowed
            if active is None:
                self.router = None
                return False
            if self.router is None or self.router.version != active.version:
                self.router = Router.load(Path(active.path), active.version)
                self._prepare(self.router.config.spec)
                logger.info("Router v%d active (%s)", active.version, ", ".join(self.router.labels))
                changed = True
        return changed

    def maybe_refresh(self, every_s: float = 2.0) -> None:
        """The request-path check for a new router version. A registry that does not answer must not fail
        requests: keep routing with the loaded router and check again after `every_s`."""
        if time.monotonic() - self.checked_at <= every_s:
            return
        self.checked_at = time.monotonic()  # before the query: concurrent requests do not all retry it
        try:
            self.refresh()
        except SQLAlchemyError as exc:
            if self.router is None:
                raise DatabaseUnavailableError("The registry database is unavailable and no router is loaded yet; "
                                               "retry shortly.", retry_after=5) from exc
            logger.warning("Router refresh failed (%s); routing with v%s until the registry answers",
                           exc.__class__.__name__, self.version)

    @property
    def version(self) -> int | None:
        return self.router.version if self.router else None

    def route(self, texts: Sequence[str], top_k: int | None = None, progress: bool = False,
              batch_size: int = 32) -> list[RoutingDecision]:
        with self._lock:
            router, allowed = self.router, set(self.allowed)
        if router is None:
            raise RouterNotTrainedError("No router is active yet; run `moe router train`.")
        with self._encode_lock:
            features = self._features.encode(texts, router.config.spec, progress=progress, batch_size=batch_size)
        return router.decide(
            features, top_k=top_k or self.settings.router_top_k,
            abstain_threshold=self.settings.router_abstain_threshold, allowed=allowed,
        )
