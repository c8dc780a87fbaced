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
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionChunkChoice,
    CompletionLogprobs,
    CompletionResponse,
    ExpertWeight,
    MoEInfo,
    TopLogprob,
    Usage,
)
from core.errors import MoEError
from experts.engine import TokenEvent, TokenLogprob

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


def usage(dispatch: Dispatch, completion_tokens: int) -> Usage:
    """OpenAI `usage`: every prompt counted once (whatever n), the tokens of every choice."""
    return Usage(prompt_tokens=dispatch.prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=dispatch.prompt_tokens + completion_tokens)


def _logprob(value: float) -> float:
    """JSON has no -inf (vLLM writes -9999.0 too), and rounding must not make a log-probability positive."""
    return min(value, 0.0) if value > -9999.0 else -9999.0


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(entries: list[TokenLogprob] | None) -> ChatLogprobs | None:
    if entries is None:
        return None
    return ChatLogprobs(content=[
        ChatTokenLogprob(token=e.token, logprob=_logprob(e.logprob), bytes=_bytes(e.token), top_logprobs=[
            TopLogprob(token=t, logprob=_logprob(lp), bytes=_bytes(t)) for t, lp in e.top])
        for e in entries])


class OpenAIFormatter:
    """Formats one dispatched request as a chat completion (`chat=True`) or a text completion."""

    def __init__(self, dispatch: Dispatch, chat: bool, include_usage: bool = False) -> None:
        self.dispatch = dispatch
        self.chat = chat
        self.include_usage = include_usage
        self.created = int(time.time())
        self.moe = moe_info(dispatch)
        self._offsets = [0] * dispatch.choices
        """Per choice, the text offset of its next token (completions' `text_offset` runs across chunks)."""

    def completion_logprobs(self, index: int, entries: list[TokenLogprob] | None) -> CompletionLogprobs | None:
        """The legacy shape; `top_logprobs` holds the most likely tokens and the sampled one, as OpenAI's does."""
        if entries is None:
            return None
        offsets = []
        for entry in entries:
            offsets.append(self._offsets[index])
            self._offsets[index] += len(entry.token)
        return CompletionLogprobs(
            tokens=[e.token for e in entries], token_logprobs=[_logprob(e.logprob) for e in entries],
            top_logprobs=[{**{t: _logprob(lp) for t, lp in e.top}, e.token: _logprob(e.logprob)} for e in entries],
            text_offset=offsets)

    def response(self, finals: list[TokenEvent]) -> ChatCompletionResponse | CompletionResponse:
        """The non-streamed answer; each final event's text is its choice's whole completion."""
        d = self.dispatch
        used = usage(d, sum(e.completion_tokens for e in finals))
        if self.chat:
            return ChatCompletionResponse(id=d.request_id, model=d.model, usage=used, moe=self.moe, choices=[
                ChatChoice(index=e.index, message=ChatMessage(role="assistant", content=e.text),
                           finish_reason=e.finish_reason, logprobs=chat_logprobs(e.logprobs)) for e in finals])
        return CompletionResponse(id=d.request_id, model=d.model, usage=used, moe=self.moe, choices=[
            CompletionChoice(index=e.index, text=e.text, finish_reason=e.finish_reason,
                             logprobs=self.completion_logprobs(e.index, e.logprobs)) for e in finals])

    def chunk(self, choices: list[ChatChunkChoice] | list[CompletionChunkChoice],
              used: Usage | None = None) -> ChatCompletionChunk | CompletionChunk:
        d = self.dispatch
        kind = ChatCompletionChunk if self.chat else CompletionChunk
        return kind(id=d.request_id, created=self.created, model=d.model, moe=self.moe, usage=used, choices=choices)

    def event_choice(self, event: TokenEvent) -> ChatChunkChoice | CompletionChunkChoice:
        """A choice's text delta (with the logprobs of its tokens); the final one carries the finish reason."""
        if self.chat:
            return ChatChunkChoice(index=event.index, delta=ChatDelta(content=event.text),
                                   finish_reason=event.finish_reason, logprobs=chat_logprobs(event.logprobs))
        return CompletionChunkChoice(index=event.index, text=event.text, finish_reason=event.finish_reason,
                                     logprobs=self.completion_logprobs(event.index, event.logprobs))

    async def frames(self, stream: AsyncIterator[TokenEvent], head: TokenEvent) -> AsyncIterator[str]:
        """The server-sent events of a streamed answer: `head` (already received) and the rest of `stream`, an
        error event if generation fails, then [DONE]. `usage` rides on the chunk that finishes the last choice,
        or with include_usage on a last chunk of its own with empty `choices` (OpenAI's stream_options).
        Closes `stream` however the client leaves."""
        if self.chat:  # each choice's role comes first, on its own
            for index in range(self.dispatch.choices):
                yield sse(self.chunk([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
                          .model_dump())
        finished: dict[int, TokenEvent] = {}
        latest: dict[int, int] = {}
        event: TokenEvent | None = head
        try:
            while event is not None:
                if event.finish_reason == "error":
                    yield sse({"error": {"message": event.error, "type": "server_error"}})
                    break
                latest[event.index] = event.completion_tokens
                if event.finish_reason:
                    finished[event.index] = event
                last = len(finished) == self.dispatch.choices and event.finish_reason is not None
                if event.text or event.finish_reason or event.logprobs:
                    used = usage(self.dispatch, sum(latest.values())) if last and not self.include_usage else None
                    yield sse(self.chunk([self.event_choice(event)], used).model_dump())
                if last and self.include_usage:
                    yield sse(self.chunk([], usage(self.dispatch, sum(latest.values()))).model_dump())
                event = await anext(stream, None)
        except MoEError as exc:
            yield sse(moe_error_body(exc))
        finally:
            await stream.aclose()
        yield DONE
