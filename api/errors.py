"""The one place where errors become HTTP responses (OpenAI error shape). Bad input is a 4xx with a
message that names the field or the setting; only real faults are 5xx."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import MoEError, OverloadedError

logger = logging.getLogger(__name__)


def error_response(status: int, message: str, code: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def moe_error_response(exc: MoEError) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if isinstance(exc, OverloadedError) else None
    return error_response(exc.status_code, exc.message, exc.code, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MoEError)
    async def _moe(_request: Request, exc: MoEError) -> JSONResponse:
        return moe_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid body"}
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return error_response(422, f"{field}: {first.get('msg')}", "validation_error", param=field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), "http_error")

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("Unhandled error")
        return error_response(500, "Internal error; see the server log.", "internal_error")
