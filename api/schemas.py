"""HTTP schemas: OpenAI-compatible requests and responses plus the `moe` routing object. One schema per
purpose; field descriptions end up in the OpenAPI document."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

MAX_STOP = 4
MAX_N = 16
MAX_LOGPROBS = 20
MAX_PROMPTS = 16
MAX_LOGIT_BIAS = 300
MAX_TEXT = 200_000


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"] = Field(description="Author of the message.")
    content: str = Field(max_length=MAX_TEXT, description="Message text.")


class ContentPart(BaseModel):
    """One part of a message's content. Only 'text' parts are served; any other type is refused (400)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(max_length=64, description="'text' (image_url, input_audio, file: refused, 400).")
    text: str | None = Field(default=None, max_length=MAX_TEXT, description="The text of a 'text' part.")


class RequestMessage(BaseModel):
    """A message of a request: text, or a list of text parts (joined with newlines)."""

    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="Author of the message; 'developer' is treated as 'system'.")
    content: Annotated[str, Field(max_length=MAX_TEXT)] | Annotated[list[ContentPart], Field(max_length=64)] | None = (
        Field(default=None, description="Text, or a list of text parts; null only for assistant messages."))

    @model_validator(mode="after")
    def _content_unless_assistant(self) -> RequestMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError("content may be null only in assistant messages")
        return self


class StreamOptions(BaseModel):
    include_usage: bool = Field(
        default=False, description="Send a last chunk with empty `choices` and the request's `usage`.")


LogitBias = dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]]


class _SamplingFields(BaseModel):
    # Unknown fields are kept (not validated) so that api/request_fields.py can refuse the ones that would
    # change the answer (tools, response_format, ...) and ignore the harmless rest.
    model_config = ConfigDict(extra="allow")

    model: str = Field(default="auto", max_length=48, description="'auto' (routed) or an expert name.")
    max_tokens: int | None = Field(default=None, ge=1, description="Most tokens to generate.")
    max_completion_tokens: int | None = Field(
        default=None, ge=1, description="Most tokens to generate (OpenAI's newer name; if both are given they "
        "must be equal).")
    n: int = Field(default=1, ge=1, le=MAX_N, description="Choices to generate (decoded as n rows of one batch).")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0,
                                    description="Subtracted from the logits of tokens already generated.")
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0,
                                     description="Subtracted per occurrence from the logits of generated tokens.")
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0, description="vLLM's extension: > 1 "
                                      "discourages tokens of the prompt and the output (1 = off).")
    logit_bias: LogitBias | None = Field(default=None, max_length=MAX_LOGIT_BIAS,
                                         description="Token id (as a string) -> bias added to its logit.")
    stop: str | list[str] | None = Field(default=None, description="Up to 4 stop strings.")
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1,
                             description="Sampling seed (a 64-bit integer, as torch takes it); choice k uses seed+k.")
    stream: bool = Field(default=False, description="Stream server-sent events.")
    stream_options: StreamOptions | None = Field(default=None, description="Streaming options.")
    user: str | None = Field(default=None, max_length=256, description="End-user id (logged).")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP or any(not s or len(s) > 64 for s in stops):
            raise ValueError(f"at most {MAX_STOP} non-empty stop strings of up to 64 characters")
        return stops


class ChatCompletionRequest(_SamplingFields):
    messages: list[RequestMessage] = Field(min_length=1, max_length=256, description="The conversation so far.")
    logprobs: bool = Field(default=False, description="Return each generated token's log-probability.")
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS,
                                     description="Most likely alternatives per token (needs logprobs=true).")

    @field_validator("messages")
    @classmethod
    def _has_user(cls, value: list[RequestMessage]) -> list[RequestMessage]:
        if not any(m.role == "user" for m in value):
            raise ValueError("at least one message must have role 'user'")
        return value

    def logprob_count(self) -> int | None:
        """None when no logprobs were asked for, else how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingFields):
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_TEXT)] | Annotated[
        list[Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]], Field(min_length=1, max_length=MAX_PROMPTS)
    ] = Field(description="Raw prompt text (no chat template), or a list of them: one choice each, in order.")
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS, description="Return each generated "
                                 "token's log-probability and this many most likely alternatives.")

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def logprob_count(self) -> int | None:
        return self.logprobs


class ExpertWeight(BaseModel):
    name: str = Field(description="Expert name, or 'base' for the bare backbone.")
    weight: float = Field(description="Renormalised gate weight.")


class MoEInfo(BaseModel):
    experts: list[ExpertWeight] = Field(description="Experts that answered, best first.")
    router_version: int | None = Field(description="Router version that decided (None when forced).")
    confidence: float | None = Field(description="Calibrated top-1 gate probability (None when forced).")
    request_id: str = Field(description="Id to send feedback for.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str = Field(description="The token as text (a partial UTF-8 character shows as U+FFFD).")
    logprob: float = Field(description="Log-probability under the model's raw logits (before penalties, "
                           "logit_bias, temperature and top_p).")
    bytes: list[int] | None = Field(description="UTF-8 bytes of `token`.")


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="The most likely tokens at this position, best first.")


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = Field(description="One entry per generated token.")


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(description="The generated tokens as text.")
    token_logprobs: list[float | None] = Field(description="Their log-probabilities (raw logits).")
    top_logprobs: list[dict[str, float] | None] = Field(
        description="Per token: the most likely tokens and the sampled one -> log-probability.")
    text_offset: list[int] = Field(description="Character offset of each token in the choice's text.")


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    moe: MoEInfo


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    moe: MoEInfo


class ChatDelta(BaseModel):
    """The new part of the assistant message; fields that are not set are left out of the chunk."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _set_fields_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class CompletionChunkChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class _Chunk(BaseModel):
    """A server-sent event's data; `usage` only on the last chunk of a request (with include_usage, a chunk of
    its own with empty `choices`)."""

    @model_serializer(mode="wrap")
    def _usage_when_final(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if data.get("usage") is None:
            data.pop("usage", None)
        return data


class ChatCompletionChunk(_Chunk):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    moe: MoEInfo
    usage: Usage | None = None


class CompletionChunk(_Chunk):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    moe: MoEInfo
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "moe"
    description: str = ""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class RouteRequest(BaseModel):
    text: str | None = Field(default=None, min_length=1, max_length=200_000, description="Text to route.")
    messages: list[RequestMessage] | None = Field(default=None, min_length=1, description="Or a conversation.")
    top_k: int | None = Field(default=None, ge=1, le=8, description="Experts to return.")


class RouteResponse(BaseModel):
    experts: list[ExpertWeight]
    confidence: float
    abstained: bool
    router_version: int | None


class FeedbackRequest(BaseModel):
    request_id: str = Field(min_length=1, max_length=64, description="The `moe.request_id` of a response.")
    expert: str | None = Field(default=None, max_length=48, description="The expert that should have answered.")
    rating: float | None = Field(default=None, ge=-1.0, le=5.0, description="Quality rating.")


class FeedbackResponse(BaseModel):
    id: int
    request_id: str


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
