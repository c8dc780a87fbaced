"""The FastAPI app: thin routes over the Gateway. Ray Serve wraps it with `serve.ingress`; tests use it
directly with an in-process pool."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from api.admin import build_admin_router
from api.auth import check_api_key
from api.errors import QUERY_ERRORS, documented_errors, error_response, install_error_handlers, moe_error_response
from api.gateway import Dispatch, Gateway
from api.schemas import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ExpertWeight,
    FeedbackRequest,
    FeedbackResponse,
    ModelCard,
    ModelList,
    MoEInfo,
    RouteRequest,
    RouteResponse,
    Usage,
)
from core.errors import InvalidInputError, MoEError
from experts.data import routing_text


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


def _usage(last: dict) -> Usage:
    """OpenAI `usage` from the engine's final event."""
    prompt, completion = last.get("prompt_tokens", 0), last.get("completion_tokens", 0)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _moe_info(dispatch: Dispatch) -> MoEInfo:
    return MoEInfo(
        experts=[ExpertWeight(name=n, weight=round(w, 4)) for n, w in dispatch.experts],
        router_version=dispatch.router_version,
        confidence=None if dispatch.confidence is None else round(dispatch.confidence, 4),
        request_id=dispatch.request_id,
    )


# OpenAPI: every documented status, so clients (and the schema fuzzer) know the error shape and SSE bodies.
_ERRORS = documented_errors(QUERY_ERRORS)
_STREAMED = {200: {"description": "A completion; with stream=true, server-sent events.",
                   "content": {"text/event-stream": {"schema": {
                       "type": "object", "required": ["data"],
                       "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}}}}


def create_app(get_gateway: Callable[[], Gateway]) -> FastAPI:
    app = FastAPI(title="moe-lora", version="0.1.0",
                  description="One OpenAI-compatible endpoint over many LoRA experts on one backbone.")
    install_error_handlers(app)

    def gateway() -> Gateway:
        return get_gateway()

    def api_key(request: Request, gw: Gateway = Depends(gateway)) -> Gateway:
        check_api_key(request, gw.settings)
        return gw

    def body_limit(path: str) -> tuple[int, str]:
        settings = get_gateway().settings
        if path.startswith("/admin/") and path.endswith("/upload"):
            return settings.max_upload_bytes, "MOE_MAX_UPLOAD_BYTES"
        return settings.max_body_bytes, "MOE_MAX_BODY_BYTES"

    app.add_middleware(BodyLimitMiddleware, limit_for=body_limit)

    async def _collect(gw: Gateway, dispatch: Dispatch) -> tuple[str, dict[str, Any]]:
        parts, last = [], {}
        async for event in gw.stream(dispatch, coalesce=True):
            parts.append(event.get("text", ""))
            last = event
        if last.get("finish_reason") == "error":
            raise MoEError(f"Generation failed: {last.get('error')}")
        return "".join(parts), last

    async def _sse(gw: Gateway, dispatch: Dispatch, chat: bool) -> StreamingResponse:
        created = int(time.time())
        moe = _moe_info(dispatch).model_dump()

        def chunk(delta_text: str | None, finish: str | None, extra: dict | None = None) -> str:
            if chat:
                delta = {} if delta_text is None else {"content": delta_text}
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
                body = {"id": dispatch.request_id, "object": "chat.completion.chunk", "created": created,
                        "model": dispatch.model, "choices": [choice], "moe": moe}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": finish, "logprobs": None}
                body = {"id": dispatch.request_id, "object": "text_completion", "created": created,
                        "model": dispatch.model, "choices": [choice], "moe": moe}
            body.update(extra or {})
            return f"data: {json.dumps(body)}\n\n"

        async def events(stream: AsyncIterator[dict[str, Any]], head: dict[str, Any]) -> AsyncIterator[str]:
            if chat:
                first = json.loads(chunk(None, None)[6:])
                first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                yield f"data: {json.dumps(first)}\n\n"
            event: dict[str, Any] | None = head
            try:
                while event is not None:
                    finish = event.get("finish_reason")
                    if finish == "error":
                        failure = {"error": {"message": event.get("error"), "type": "server_error"}}
                        yield f"data: {json.dumps(failure)}\n\n"
                        break
                    if event.get("text") or finish:
                        usage = None
                        if finish:
                            p, c = event.get("prompt_tokens", 0), event.get("completion_tokens", 0)
                            usage = {"usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}}
                        yield chunk(event.get("text", ""), finish, usage)
                    event = await anext(stream, None)
            except MoEError as exc:
                yield f"data: {json.dumps(json.loads(moe_error_response(exc).body))}\n\n"
            finally:
                await stream.aclose()
            yield "data: [DONE]\n\n"

        # The first event is awaited before the response starts, so a full queue or a failing pool is a
        # real HTTP status (503 with Retry-After), not an error inside a 200 stream.
        stream = gw.stream(dispatch)
        head = await anext(stream)
        return StreamingResponse(events(stream, head), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-MoE-Request-Id": dispatch.request_id})

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={**_STREAMED, **_ERRORS})
    async def chat_completions(body: ChatCompletionRequest, gw: Gateway = Depends(api_key)):
        dispatch = await gw.prepare(body)
        if body.stream:
            return await _sse(gw, dispatch, chat=True)
        text, last = await _collect(gw, dispatch)
        usage = _usage(last)
        return ChatCompletionResponse(
            id=dispatch.request_id, model=body.model, usage=usage, moe=_moe_info(dispatch),
            choices=[ChatChoice(message=ChatMessage(role="assistant", content=text),
                                finish_reason=last.get("finish_reason"))],
        )

    @app.post("/v1/completions", response_model=CompletionResponse, responses={**_STREAMED, **_ERRORS})
    async def completions(body: CompletionRequest, gw: Gateway = Depends(api_key)):
        dispatch = await gw.prepare(body)
        if body.stream:
            return await _sse(gw, dispatch, chat=False)
        text, last = await _collect(gw, dispatch)
        usage = _usage(last)
        return CompletionResponse(
            id=dispatch.request_id, model=body.model, usage=usage, moe=_moe_info(dispatch),
            choices=[CompletionChoice(text=text, finish_reason=last.get("finish_reason"))],
        )

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def models(gw: Gateway = Depends(api_key)) -> ModelList:
        placement = await gw.refresh_placement(force=True)
        cards = [ModelCard(id="auto", description="Routed to the best expert mixture")]
        cards += [ModelCard(id=name, description="LoRA expert") for name in sorted(placement)]
        return ModelList(data=cards)

    @app.post("/v1/route", response_model=RouteResponse, responses=_ERRORS)
    async def route(body: RouteRequest, gw: Gateway = Depends(api_key)) -> RouteResponse:
        if (body.text is None) == (body.messages is None):
            raise InvalidInputError("Send exactly one of 'text' or 'messages'.")
        text = body.text if body.text is not None else routing_text([m.model_dump() for m in body.messages])
        decision = await gw.route_only(text, body.top_k)
        return RouteResponse(
            experts=[ExpertWeight(name=n, weight=round(w, 4)) for n, w in decision.experts],
            confidence=round(decision.confidence, 4), abstained=decision.abstained,
            router_version=gw.routing.version,
        )

    @app.post("/v1/feedback", response_model=FeedbackResponse, responses=_ERRORS)
    async def feedback(body: FeedbackRequest, gw: Gateway = Depends(api_key)) -> FeedbackResponse:
        return FeedbackResponse(id=gw.feedback(body.request_id, body.expert, body.rating), request_id=body.request_id)

    @app.get("/healthz", responses=documented_errors((503,)))
    async def healthz(gw: Gateway = Depends(gateway)) -> dict[str, Any]:
        placement = await gw.refresh_placement()
        return {"status": "ok", "router_version": gw.routing.version, "experts": sorted(placement)}

    @app.get("/metrics", responses={200: {"description": "Prometheus text format.",
                                          "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics(gw: Gateway = Depends(gateway)) -> Response:
        writer = gw.log_writer
        gw.metrics.observe_log_writer(writer.written, writer.spilled, writer.replayed, writer.rejected)
        return Response(gw.metrics.render(), media_type="text/plain; version=0.0.4")

    app.include_router(build_admin_router(get_gateway))

    return app


