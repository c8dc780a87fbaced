"""Typed errors. Each carries the HTTP status it maps to; `api.errors` is the one place that maps them.

Messages say what to change (a setting, a file, a name), so a user can act on them.
"""

from __future__ import annotations


class MoEError(Exception):
    """Base of every error this project raises on purpose."""

    status_code: int = 500
    code: str = "internal_error"
    request_id: str | None = None
    """Set when the request got as far as the request log: the client can quote it (X-MoE-Request-Id;
    Ray Serve owns X-Request-Id and overwrites it with its own id)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        """The request field at fault (OpenAI's `error.param`), when there is one."""


class InvalidInputError(MoEError):
    """The caller sent something malformed or out of limits."""

    status_code = 400
    code = "invalid_request"


class UnsupportedFieldError(InvalidInputError):
    """A request field this server understands but does not implement (tools, response_format, ...): refused
    rather than ignored, because ignoring it would change the answer silently."""

    code = "unsupported_field"


class PromptTooLongError(InvalidInputError):
    """The prompt exceeds `MOE_MAX_PROMPT_TOKENS`."""


class DataFormatError(InvalidInputError):
    """A data file cannot be read as expert training or evaluation data."""


class InvalidNameError(InvalidInputError):
    """An expert name breaks the naming rules."""


class AdapterValidationError(InvalidInputError):
    """An adapter does not fit the backbone or breaks the safety rules."""


class UnauthorizedError(MoEError):
    status_code = 401
    code = "unauthorized"


class ForbiddenError(MoEError):
    status_code = 403
    code = "forbidden"


class NotFoundError(MoEError):
    status_code = 404
    code = "not_found"


class ExpertNotFoundError(NotFoundError):
    code = "expert_not_found"


class ConflictError(MoEError):
    status_code = 409
    code = "conflict"


class UnavailableError(MoEError):
    """A transient fault: the request may succeed if retried after `retry_after` seconds (503 + Retry-After)."""

    status_code = 503
    code = "unavailable"

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OverloadedError(UnavailableError):
    """Too many requests are waiting; the client should retry later."""

    code = "overloaded"


class PoolUnavailableError(UnavailableError):
    """The expert pool replica serving the request died or is restarting; a retry lands on a live replica."""

    code = "pool_unavailable"


class DatabaseUnavailableError(UnavailableError):
    """The registry database does not answer (requests that only generate keep working; the log spills)."""

    code = "database_unavailable"


class ModelUnavailableError(MoEError):
    """A model or package the configuration names is not installed or not in the local cache."""

    status_code = 503
    code = "model_unavailable"


class RouterNotTrainedError(MoEError):
    status_code = 409
    code = "router_not_trained"
