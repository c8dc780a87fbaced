"""The one place where errors become HTTP responses (OpenAI error shape). Bad input is a 4xx with a
message that names the field or the setting; only real faults are 5xx, and transient ones (overload, a
restarting pool replica, the database away) are 503 with Retry-After so clients retry instead of failing."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.schemas import ErrorResponse
from core.errors import DatabaseUnavailableError, MoEError, UnavailableError

logger = logging.getLogger(__name__)

_DESCRIPTIONS = {
    400: "Invalid input or over a limit (the message names the field or setting).",
    401: "Missing or invalid bearer token.",
    403: "Admin endpoints disabled or wrong admin token.",
    404: "Unknown expert, router version, request or job.",
    409: "Conflicts with the current state (existing name, no active router).",
    413: "Request body over the limit.",
    422: "Malformed body or parameter (the message names the field).",
    429: "Rate limited; retry after Retry-After seconds.",
    503: "Overloaded or temporarily unavailable; retry after Retry-After seconds.",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
QUERY_ERRORS = (400, 401, 404, 409, 413, 422, 429, 503)
ADMIN_ERRORS = (400, 401, 403, 404, 409, 413, 422, 503)


def documented_errors(codes: tuple[int, ...]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error codes a route can answer, all in the ErrorResponse shape."""
    return {
        code: {"model": ErrorResponse, "description": _DESCRIPTIONS[code],
               **({"headers": _RETRY_AFTER} if code in (429, 503) else {})}
        for code in codes
    }


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error object (ErrorResponse) as sent in a response or a server-sent event."""
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, code: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


def moe_error_body(exc: MoEError) -> dict[str, Any]:
    return error_body(exc.status_code, exc.message, exc.code, exc.param)


def moe_error_response(exc: MoEError) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if isinstance(exc, UnavailableError) else {}
    if exc.request_id:
        headers["X-MoE-Request-Id"] = exc.request_id
    return JSONResponse(moe_error_body(exc), status_code=exc.status_code, headers=headers or None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MoEError)
    async def _moe(_request: Request, exc: MoEError) -> JSONResponse:
        return moe_error_response(exc)

    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeoutError)
    async def _database(_request: Request, exc: Exception) -> JSONResponse:
        # Connection-level failures only (refused, reset, pool exhausted): a transient outage, not a bug.
        logger.warning("Registry database unavailable: %s", exc.__class__.__name__)
        return moe_error_response(DatabaseUnavailableError(
            "The registry database is unavailable; retry shortly (generation keeps working).", retry_after=5))

    @app.exception_handler(DataError)
    async def _unstorable(_request: Request, exc: DataError) -> JSONResponse:
        # PostgreSQL refuses some values SQLite takes (NUL in text, integers over 64 bits): the input's fault.
        return error_response(400, "A value in the request cannot be stored or looked up in the registry "
                              "(e.g. a NUL character or an out-of-range number).", "invalid_value")

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
