"""HTTP schemas: OpenAI-compatible requests and responses plus the `moe` routing object. One schema per
purpose; field descriptions end up in the OpenAPI document."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer

MAX_STOP = 4


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"] = Field(description="Author of the message.")
    content: str = Field(max_length=200_000, description="Message text.")


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(default="auto", max_length=48, description="'auto' (routed) or an expert name.")
    max_tokens: int | None = Field(default=None, ge=1, description="Most tokens to generate.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 = greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    stop: str | list[str] | None = Field(default=None, description="Up to 4 stop strings.")
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1,
                             description="Sampling seed (a 64-bit integer, as torch takes it).")
    stream: bool = Field(default=False, description="Stream server-sent events.")
    user: str | None = Field(default=None, max_length=256, description="End-user id (logged).")

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
    messages: list[ChatMessage] = Field(min_length=1, max_length=256, description="The conversation so far.")

    @field_validator("messages")
    @classmethod
    def _has_user(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.role == "user" for m in value):
            raise ValueError("at least one message must have role 'user'")
        return value


class CompletionRequest(_SamplingFields):
    prompt: str = Field(min_length=1, max_length=200_000, description="Raw prompt text (no chat template).")


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


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    finish_reason: str | None


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
    logprobs: None = None


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


class CompletionChunkChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class _Chunk(BaseModel):
    """A server-sent event's data; `usage` only on the last chunk of a request."""

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
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, description="Or a conversation.")
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
