"""Request fidelity: which OpenAI request fields the server honours, which it refuses (400, naming the field)
and which it ignores, and the checks that turn a parsed request into what the gateway generates from.

A field that would change the answer but is not implemented is refused rather than dropped, so a client never
gets a silently different result; a field that cannot change the answer (metadata, store, parallel_tool_calls
without tools, ...) is ignored, as the schemas keep unknown fields without validating them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from api.schemas import ChatCompletionRequest, CompletionRequest, RequestMessage
from core.errors import InvalidInputError, UnsupportedFieldError


def _absent(value: Any) -> bool:
    return value is None


def _off(value: Any) -> bool:
    return value in (None, False, 0, "", [], {})


def _text_format(value: Any) -> bool:
    return value is None or (isinstance(value, dict) and value.get("type") == "text")


@dataclass(frozen=True)
class Refusal:
    """A field that is refused unless its value is one that changes nothing."""

    field: str
    harmless: Callable[[Any], bool]
    why: str


REFUSED: tuple[Refusal, ...] = (
    Refusal("tools", _off, "tool calling is not implemented"),
    Refusal("tool_choice", lambda v: v in (None, "none"), "tool calling is not implemented; only 'none'"),
    Refusal("functions", _off, "function calling is not implemented"),
    Refusal("function_call", lambda v: v in (None, "none"), "function calling is not implemented; only 'none'"),
    Refusal("response_format", _text_format, "only {'type': 'text'} is implemented (no JSON mode or schemas)"),
    Refusal("echo", _off, "echoing the prompt is not implemented"),
    Refusal("suffix", _off, "insertion (suffix) is not implemented"),
    Refusal("audio", _absent, "audio output is not implemented"),
    Refusal("modalities", lambda v: v in (None, ["text"]), "only the 'text' modality is implemented"),
    Refusal("prediction", _absent, "predicted outputs are not implemented"),
    Refusal("web_search_options", _absent, "web search is not implemented"),
    # vLLM's sampling extensions: the reference server honours them, so ignoring them would change answers
    Refusal("top_k", lambda v: v in (None, -1, 0), "top_k sampling is not implemented"),
    Refusal("min_p", lambda v: v in (None, 0), "min_p sampling is not implemented"),
    Refusal("min_tokens", lambda v: v in (None, 0), "min_tokens is not implemented"),
    Refusal("ignore_eos", _off, "ignore_eos is not implemented"),
    Refusal("stop_token_ids", _off, "stop_token_ids is not implemented"),
    Refusal("prompt_logprobs", _absent, "prompt logprobs are not implemented"),
    Refusal("guided_json", _absent, "guided decoding is not implemented"),
    Refusal("guided_regex", _absent, "guided decoding is not implemented"),
    Refusal("guided_choice", _absent, "guided decoding is not implemented"),
    Refusal("guided_grammar", _absent, "guided decoding is not implemented"),
)


def refuse_unsupported(body: ChatCompletionRequest | CompletionRequest) -> None:
    """Raise UnsupportedFieldError (400) for the first field that would change the answer but is not
    implemented, and InvalidInputError (400) for contradictory fields."""
    extra = body.model_extra or {}
    for refusal in REFUSED:
        if refusal.field in extra and not refusal.harmless(extra[refusal.field]):
            raise UnsupportedFieldError(f"'{refusal.field}' is not supported: {refusal.why}.", param=refusal.field)
    best_of = extra.get("best_of")
    if best_of is not None and best_of != body.n:
        raise UnsupportedFieldError(f"'best_of' is not supported: best_of={best_of!r} would pick the best of "
                                    f"several samples; only best_of == n ({body.n}) or none.", param="best_of")
    if body.max_tokens and body.max_completion_tokens and body.max_tokens != body.max_completion_tokens:
        raise InvalidInputError(f"'max_tokens' ({body.max_tokens}) and 'max_completion_tokens' "
                                f"({body.max_completion_tokens}) differ; send one of them.",
                                param="max_completion_tokens")
    if isinstance(body, ChatCompletionRequest) and body.top_logprobs and not body.logprobs:
        raise InvalidInputError("'top_logprobs' needs 'logprobs': true.", param="top_logprobs")


def plain_messages(messages: Sequence[RequestMessage]) -> list[dict[str, str]]:
    """Messages as {role, content: str} for the chat template: text parts joined with newlines (as vLLM does),
    'developer' as 'system', a null assistant content as ''. Any non-text part is refused (400)."""
    plain = []
    for i, message in enumerate(messages):
        content = message.content
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        else:
            for j, part in enumerate(content):
                if part.type != "text":
                    raise UnsupportedFieldError(
                        f"messages[{i}].content[{j}]: content parts of type {part.type!r} are not supported "
                        "(the backbone reads text only); send 'text' parts.", param=f"messages[{i}].content[{j}]")
                if part.text is None:
                    raise InvalidInputError(f"messages[{i}].content[{j}]: a 'text' part needs 'text'.",
                                            param=f"messages[{i}].content[{j}].text")
            text = "\n".join(part.text or "" for part in content)
        plain.append({"role": "system" if message.role == "developer" else message.role, "content": text})
    return plain


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} as (id, bias) pairs; a key that is not a token id is refused (400)."""
    pairs = []
    for key, value in (bias or {}).items():
        digits = key.strip()
        token = int(digits) if digits.isascii() and digits.isdigit() and len(digits) < 12 else -1
        if not 0 <= token < vocab_size:
            raise InvalidInputError(f"logit_bias: {key[:32]!r} is not a token id (0..{vocab_size - 1}).",
                                    param="logit_bias")
        pairs.append((token, float(value)))
    return tuple(pairs)
