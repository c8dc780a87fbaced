"""What the commands share: settings, and the heavy parts built only when a command first needs them."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING

from core.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from experts.backbone import Backbone
    from router.service import RoutingService

BackboneLoader = Callable[[Settings], "Backbone"]


class Context:
    """Lazily built heavy parts, so `moe --help`, `moe expert list` and every refusal of bad input stay fast:
    the registry opens on first use, the backbone loads (seconds to minutes) on first use."""

    def __init__(self, settings: Settings, load_backbone: BackboneLoader | None = None) -> None:
        self.settings = settings
        self._load_backbone = load_backbone

    @cached_property
    def sessions(self) -> sessionmaker[Session]:
        from registry.db import session_factory

        return session_factory(self.settings)

    @cached_property
    def backbone(self) -> Backbone:
        if self._load_backbone is not None:
            return self._load_backbone(self.settings)
        from experts.backbone import load_backbone

        return load_backbone(self.settings)

    def release_backbone(self) -> None:
        self.__dict__.pop("backbone", None)

    def routing(self) -> RoutingService:
        from router.service import RoutingService

        service = RoutingService(self.settings, self.sessions, self.backbone.model, self.backbone.tokenizer)
        service.refresh()
        return service

    def bootstrap(self) -> None:
        from pipelines.bootstrap import ensure_defaults

        ensure_defaults(self.settings, self.sessions, self.backbone)
