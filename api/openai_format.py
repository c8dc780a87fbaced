"""The OpenAI wire format in one place: the `moe` object, `usage`, whole responses and the server-sent-event
chunks of a streamed answer, all built from the gateway's `Dispatch` and the pool's `TokenEvent`s."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from api.errors import moe_error_body
from api.gateway import Dispatch
from api.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessage,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionResponse,
    ExpertWeight,
    MoEInfo,
    Usage,
)
from core.errors import MoEError
from experts.engine import TokenEvent

DONE = "data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data)}\n\n"


def expert_weights(experts: list[tuple[str, float]]) -> list[ExpertWeight]:
    return [ExpertWeight(name=n, weight=round(w, 4)) for n, w in experts]


def moe_info(dispatch: Dispatch) -> MoEInfo:
    return MoEInfo(
        experts=expert_weights(dispatch.experts),
        router_version=dispatch.router_version,
        confidence=None if dispatch.confidence is None else round(dispatch.confidence, 4),
        request_id=dispatch.request_id,
    )


def usage(final: TokenEvent) -> Usage:
    """OpenAI `usage` from a request's final event."""
    return Usage(prompt_tokens=final.prompt_tokens, completion_tokens=final.completion_tokens,
                 total_tokens=final.prompt_tokens + final.completion_tokens)


class OpenAIFormatter:
    """Formats one dispatched request as a chat completion (`chat=True`) or a text completion."""

    def __init__(self, dispatch: Dispatch, chat: bool) -> None:
        self.dispatch = dispatch
        self.chat = chat
        self.created = int(time.time())
        self.moe = moe_info(dispatch)

    def response(self, final: TokenEvent) -> ChatCompletionResponse | CompletionResponse:
        """The non-streamed answer; `final.text` is the whole completion."""
        d = self.dispatch
        if self.chat:
            return ChatCompletionResponse(
                id=d.request_id, model=d.model, usage=usage(final), moe=self.moe,
                choices=[ChatChoice(message=ChatMessage(role="assistant", content=final.text),
                                    finish_reason=final.finish_reason)],
            )
        return CompletionResponse(
            id=d.request_id, model=d.model, usage=usage(final), moe=self.moe,
            choices=[CompletionChoice(text=final.text, finish_reason=final.finish_reason)],
        )

    def chunk(self, delta: ChatDelta | str, finish: str | None = None,
              final: TokenEvent | None = None) -> ChatCompletionChunk | CompletionChunk:
        d, used = self.dispatch, None if final is None else usage(final)
        if self.chat:
            return ChatCompletionChunk(id=d.request_id, created=self.created, model=d.model, moe=self.moe, usage=used,
                                       choices=[ChatChunkChoice(delta=delta, finish_reason=finish)])
        return CompletionChunk(id=d.request_id, created=self.created, model=d.model, moe=self.moe, usage=used,
                               choices=[CompletionChunkChoice(text=delta, finish_reason=finish)])

    def event_chunk(self, event: TokenEvent) -> ChatCompletionChunk | CompletionChunk:
        """A text delta; the final one carries the finish reason and `usage`."""
        finish = event.finish_reason
        delta = ChatDelta(content=event.text) if self.chat else event.text
        return self.chunk(delta, finish, event if finish else None)

    async def frames(self, stream: AsyncIterator[TokenEvent], head: TokenEvent) -> AsyncIterator[str]:
        """The server-sent events of a streamed answer: `head` (already received) and the rest of `stream`, an
        error event if generation fails, then [DONE]. Closes `stream` however the client leaves."""
        if self.chat:  # the role comes first, on its own
            yield sse(self.chunk(ChatDelta(role="assistant", content="")).model_dump())
        event: TokenEvent | None = head
        try:
            while event is not None:
                if event.finish_reason == "error":
                    yield sse({"error": {"message": event.error, "type": "server_error"}})
                    break
                if event.text or event.finish_reason:
                    yield sse(self.event_chunk(event).model_dump())
                event = await anext(stream, None)
        except MoEError as exc:
            yield sse(moe_error_body(exc))
        finally:
            await stream.aclose()
        yield DONE
