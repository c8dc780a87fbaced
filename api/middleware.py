"""ASGI middleware of the app."""

from __future__ import annotations

from collections.abc import Callable

from api.errors import error_response


class BodyLimitMiddleware:
    """Enforces the body limit on the declared Content-Length and, for chunked bodies, on the bytes actually
    received: either way an oversized body is a 413 before any route runs."""

    def __init__(self, app, limit_for: Callable[[str], tuple[int, str]]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self.limit_for(scope["path"])
        message = f"Request body over {limit} bytes ({setting})."
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await error_response(413, message, "body_too_large")(scope, receive, send)
            return
        if declared is not None:
            await self.app(scope, receive, send)
            return
        # Chunked body: read it up to the limit before the app sees it (bounded memory), then replay it.
        chunks, received, more = [], 0, True
        while more:
            event = await receive()
            if event["type"] != "http.request":
                break
            chunks.append(event.get("body", b""))
            received += len(chunks[-1])
            more = event.get("more_body", False)
            if received > limit:
                await error_response(413, message, "body_too_large")(scope, receive, send)
                return
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
