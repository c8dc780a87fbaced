"""The typed contract between the ingress, the expert pool and the engine: what to generate
(`GenerationRequest`, `SamplingParams`) and what comes back (`TokenEvent`). Plain dataclasses, so they
pickle across the Ray boundary unchanged."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from experts.multi_lora import Mixture


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request (OpenAI semantics)."""

    max_tokens: int = 128
    """Most new tokens to generate."""
    temperature: float = 1.0
    """0 = greedy; otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; they are not included in the output."""
    seed: int | None = None
    """Per-request sampling seed for reproducible samples."""


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass
class GenerationRequest:
    """One prompt to continue: its token ids, the experts mixed for it, how to sample."""

    prompt_ids: list[int]
    mixture: Mixture = ()
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=new_request_id)


@dataclass
class TokenEvent:
    """A streamed piece of output; the last event of a request has a finish_reason."""

    request_id: str
    text: str
    finish_reason: str | None
    """stop, length, cancelled or error; None while generating."""
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


@dataclass
class Completion:
    """A whole answer (the blocking helpers' result)."""

    request_id: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


Sink = Callable[[TokenEvent], None]
"""Called on the engine thread with every event of one request."""


def joining_sink(on_finish: Callable[[TokenEvent], None]) -> Sink:
    """A sink that joins a request's pieces on the engine thread and hands over only the finish event, its
    text the whole completion: the consumer is woken once per request, not once per token."""
    parts: list[str] = []

    def sink(event: TokenEvent) -> None:
        parts.append(event.text)
        if event.finish_reason is not None:
            event.text = "".join(parts)
            on_finish(event)

    return sink
