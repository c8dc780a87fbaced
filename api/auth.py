"""Bearer-token checks: optional API keys on query endpoints, a required admin token on admin endpoints.
Tokens are compared in constant time and never logged."""

from __future__ import annotations

import hmac

from fastapi import Request

from core.errors import ForbiddenError, UnauthorizedError
from core.settings import Settings


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str, secrets: list[str]) -> bool:
    found = False
    for secret in secrets:  # no early exit: timing does not tell which key matched
        found |= hmac.compare_digest(token.encode(), secret.encode())
    return found


def check_api_key(request: Request, settings: Settings) -> None:
    keys = [k.get_secret_value() for k in settings.api_keys]
    admin = settings.admin_token.get_secret_value() if settings.admin_token else None
    if not keys:
        return
    token = _bearer(request)
    if token is None:
        raise UnauthorizedError("Missing API key: send 'Authorization: Bearer <key>'.")
    if not _matches(token, keys + ([admin] if admin else [])):
        raise UnauthorizedError("Invalid API key.")


def check_admin(request: Request, settings: Settings) -> None:
    if settings.admin_token is None:
        raise ForbiddenError("Admin endpoints are disabled; set MOE_ADMIN_TOKEN to enable them.")
    token = _bearer(request)
    if token is None:
        raise UnauthorizedError("Missing admin token: send 'Authorization: Bearer <MOE_ADMIN_TOKEN>'.")
    if not _matches(token, [settings.admin_token.get_secret_value()]):
        raise ForbiddenError("Invalid admin token.")
