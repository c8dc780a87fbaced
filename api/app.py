"""The FastAPI app: error handlers, the body limit and the routes (api/routes/) over one Gateway. Ray Serve
wraps it with `serve.ingress`; tests use it directly with an in-process pool."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.gateway import Gateway
from api.middleware import BodyLimitMiddleware
from api.routes.admin import build_admin_router
from api.routes.health import build_health_router
from api.routes.openai import build_openai_router


def create_app(get_gateway: Callable[[], Gateway]) -> FastAPI:
    app = FastAPI(title="moe-lora", version="0.1.0",
                  description="One OpenAI-compatible endpoint over many LoRA experts on one backbone.")
    install_error_handlers(app)

    def body_limit(path: str) -> tuple[int, str]:
        settings = get_gateway().settings
        if path.startswith("/admin/") and path.endswith("/upload"):
            return settings.max_upload_bytes, "MOE_MAX_UPLOAD_BYTES"
        return settings.max_body_bytes, "MOE_MAX_BODY_BYTES"

    app.add_middleware(BodyLimitMiddleware, limit_for=body_limit)
    app.include_router(build_openai_router(get_gateway))
    app.include_router(build_health_router(get_gateway))
    app.include_router(build_admin_router(get_gateway))
    return app
