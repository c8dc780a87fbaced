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
from registry import repository as repo
from router.features import FeatureEncoder
from router.gate import Router, RoutingDecision

logger = logging.getLogger(__name__)


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
        self._encoders: dict[tuple[int, ...], FeatureEncoder] = {}
        self._lock = threading.Lock()
        self._encode_lock = threading.Lock()  # one encoder pass at a time: the early-exit hook holds state
        self.checked_at = 0.0

    def _encoder(self, layers: Sequence[int]) -> FeatureEncoder:
        key = tuple(sorted(layers))
        if key not in self._encoders:
            if self.own_backbone and self._encoders and max(key) > self.model.config.num_hidden_layers:
                raise RouterNotTrainedError(
                    f"Router needs layer {max(key)} but this router copy was truncated; restart the ingress."
                )
            encoder = FeatureEncoder(self.model, self.tokenizer, key)
            if self.own_backbone and not self._encoders:
                encoder.truncate()  # this backbone copy serves routing only: keep the layers it needs
            self._encoders[key] = encoder
        return self._encoders[key]

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
                self._encoder(self.router.config.layers)
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
            features = self._encoder(router.config.layers).encode(texts, batch_size=batch_size, progress=progress)
        return router.decide(
            features, top_k=top_k or self.settings.router_top_k,
            abstain_threshold=self.settings.router_abstain_threshold, allowed=allowed,
        )
