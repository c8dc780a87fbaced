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
    """How to pick tokens for one request (OpenAI semantics; `repetition_penalty` is vLLM's extension)."""

    max_tokens: int = 128
    """Most new tokens to generate."""
    temperature: float = 1.0
    """0 = greedy; otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; they are not included in the output."""
    seed: int | None = None
    """Per-request sampling seed for reproducible samples (choice k of n uses seed + k)."""
    n: int = 1
    """Independent completions of the prompt, decoded as n rows of the batch (TokenEvent.index tells them apart)."""
    logprobs: int | None = None
    """None: no log-probabilities; k >= 0: each generated token's log-probability and the k most likely ones."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token generated so far (OpenAI, -2..2)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated so far (OpenAI, -2..2)."""
    repetition_penalty: float = 1.0
    """Divides positive / multiplies negative logits of tokens in the prompt or the output (vLLM, HF); 1 = off."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before sampling (OpenAI, -100..100)."""

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass
class GenerationRequest:
    """One prompt to continue: its token ids, the experts mixed for it, how to sample."""

    prompt_ids: list[int]
    mixture: Mixture = ()
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=new_request_id)
    trace: dict[str, str] = field(default_factory=dict)
    """W3C trace-context headers of the ingress's span ({} without tracing): the pool's span joins its trace."""


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability under the model (raw logits: before penalties, logit_bias,
    temperature and top_p, as vLLM reports by default), and the most likely alternatives at that step."""

    token_id: int
    token: str
    """The token decoded on its own (a partial UTF-8 character decodes to U+FFFD)."""
    logprob: float
    top: tuple[tuple[str, float], ...] = ()
    """(token, logprob) of the most likely tokens, most likely first."""


@dataclass(frozen=True)
class RowTiming:
    """Where one choice's time went inside the engine, in seconds (the ingress turns it into queue time, time
    to first token and inter-token latency, also for a non-streamed answer that crosses the boundary once)."""

    queued_s: float
    """Submitted -> admitted into a prefill (-> finished, for a choice that never was)."""
    decode_s: float | None
    """First token sampled -> finished; None when no token was sampled (cancelled or failed while waiting)."""


@dataclass
class TokenEvent:
    """A streamed piece of output; the last event of a request's choice has a finish_reason."""

    request_id: str
    text: str
    finish_reason: str | None
    """stop, length, cancelled or error; None while generating."""
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    index: int = 0
    """Which of the request's n choices this event belongs to."""
    logprobs: list[TokenLogprob] | None = None
    """The tokens generated since the choice's previous event (when the request asked for logprobs)."""
    timing: RowTiming | None = None
    """Set on the choice's finish event."""


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
    """A sink that joins each choice's pieces (text and logprobs) on the engine thread and hands over only its
    finish event, carrying the whole completion: the consumer is woken once per choice, not once per token."""
    parts: dict[int, list[str]] = {}
    logprobs: dict[int, list[TokenLogprob]] = {}

    def sink(event: TokenEvent) -> None:
        parts.setdefault(event.index, []).append(event.text)
        if event.logprobs is not None:
            logprobs.setdefault(event.index, []).extend(event.logprobs)
        if event.finish_reason is not None:
            event.text = "".join(parts.pop(event.index))
            event.logprobs = logprobs.pop(event.index, event.logprobs)
            on_finish(event)

    return sink
