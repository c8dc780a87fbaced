"""The OpenAI-compatible routes (and the two `moe` additions, /v1/route and /v1/feedback), behind the API
keys. Formatting is api/openai_format.py; preparing, routing, generating and logging are the Gateway's."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.auth import check_api_key
from api.errors import QUERY_ERRORS, documented_errors
from api.gateway import Gateway
from api.openai_format import OpenAIFormatter, expert_weights
from api.request_fields import plain_messages
from api.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    FeedbackRequest,
    FeedbackResponse,
    ModelCard,
    ModelList,
    RouteRequest,
    RouteResponse,
)
from core.errors import InvalidInputError
from experts.data import routing_text

# OpenAPI: every documented status, so clients (and the schema fuzzer) know the error shape and SSE bodies.
_ERRORS = documented_errors(QUERY_ERRORS)
_STREAMED = {200: {"description": "A completion; with stream=true, server-sent events.",
                   "content": {"text/event-stream": {"schema": {
                       "type": "object", "required": ["data"],
                       "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}}}}


async def answer(gw: Gateway, body: ChatCompletionRequest | CompletionRequest, chat: bool):
    """Prepare, generate and format one completion request, streamed or whole."""
    dispatch = await gw.prepare(body)
    formatter = OpenAIFormatter(dispatch, chat, include_usage=body.include_usage)
    if not body.stream:
        return formatter.response(await gw.complete(dispatch))
    # The first event is awaited before the response starts, so a full queue or a failing pool is a
    # real HTTP status (503 with Retry-After), not an error inside a 200 stream.
    stream = gw.stream(dispatch)
    head = await anext(stream)
    return StreamingResponse(formatter.frames(stream, head), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-MoE-Request-Id": dispatch.request_id})


def build_openai_router(get_gateway: Callable[[], Gateway]) -> APIRouter:
    router = APIRouter()

    def api_key(request: Request) -> Gateway:
        gw = get_gateway()
        check_api_key(request, gw.settings)
        return gw

    @router.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses={**_STREAMED, **_ERRORS})
    async def chat_completions(body: ChatCompletionRequest, gw: Gateway = Depends(api_key)):
        return await answer(gw, body, chat=True)

    @router.post("/v1/completions", response_model=CompletionResponse, responses={**_STREAMED, **_ERRORS})
    async def completions(body: CompletionRequest, gw: Gateway = Depends(api_key)):
        return await answer(gw, body, chat=False)

    @router.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def models(gw: Gateway = Depends(api_key)) -> ModelList:
        placement = await gw.refresh_placement(force=True)
        cards = [ModelCard(id="auto", description="Routed to the best expert mixture")]
        cards += [ModelCard(id=name, description="LoRA expert") for name in sorted(placement)]
        return ModelList(data=cards)

    @router.post("/v1/route", response_model=RouteResponse, responses=_ERRORS)
    async def route(body: RouteRequest, gw: Gateway = Depends(api_key)) -> RouteResponse:
        if (body.text is None) == (body.messages is None):
            raise InvalidInputError("Send exactly one of 'text' or 'messages'.")
        text = body.text if body.text is not None else routing_text(plain_messages(body.messages))
        decision = await gw.route_only(text, body.top_k)
        return RouteResponse(experts=expert_weights(decision.experts), confidence=round(decision.confidence, 4),
                             abstained=decision.abstained, router_version=gw.routing.version)

    @router.post("/v1/feedback", response_model=FeedbackResponse, responses=_ERRORS)
    async def feedback(body: FeedbackRequest, gw: Gateway = Depends(api_key)) -> FeedbackResponse:
        # flushes the request log and writes the registry: off the event loop
        feedback_id = await run_in_threadpool(gw.feedback, body.request_id, body.expert, body.rating)
        return FeedbackResponse(id=feedback_id, request_id=body.request_id)

    return router
