"""Dataset formats and chat templating.

Expert training data: JSONL or CSV with either a `messages` column (a chat list of
{"role", "content"}) or `prompt` / `response` columns. The user turns double as routing
examples for the domain. Every bad record is reported with its line number.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from core.errors import DataFormatError

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
MAX_RECORDS = 200_000


@dataclass(frozen=True)
class ChatExample:
    """One training conversation; the last message is the assistant turn the loss is taken on."""

    messages: tuple[dict[str, str], ...]

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        return list(self.messages[:-1])

    @property
    def response(self) -> str:
        return self.messages[-1]["content"]

    @property
    def routing_text(self) -> str:
        return routing_text(self.prompt_messages)


def routing_text(messages: Sequence[dict[str, str]]) -> str:
    """The text the router reads: the user turns, latest last (system prompts say little about domain)."""
    return "\n".join(m["content"] for m in messages if m.get("role") == "user").strip()


def _record_to_example(record: object, where: str) -> ChatExample:
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected an object with 'messages' or 'prompt'/'response'.")
    if "messages" in record and record["messages"] not in (None, ""):
        messages = record["messages"]
        if isinstance(messages, str):  # CSV cells carry the list as JSON text
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{where}: 'messages' is not valid JSON ({exc.msg}).") from exc
        if not isinstance(messages, list) or len(messages) < 2:
            raise DataFormatError(f"{where}: 'messages' must be a list of at least two turns.")
        clean = []
        for turn in messages:
            if not isinstance(turn, dict) or turn.get("role") not in ROLES:
                raise DataFormatError(f"{where}: every turn needs a role in {ROLES}.")
            if not isinstance(turn.get("content"), str) or not turn["content"].strip():
                raise DataFormatError(f"{where}: every turn needs non-empty text 'content'.")
            clean.append({"role": turn["role"], "content": turn["content"]})
        if clean[-1]["role"] != "assistant":
            raise DataFormatError(f"{where}: the last turn must be the assistant's answer.")
        if not any(t["role"] == "user" for t in clean):
            raise DataFormatError(f"{where}: there is no user turn.")
        return ChatExample(tuple(clean))
    prompt, response = record.get("prompt"), record.get("response")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataFormatError(f"{where}: missing 'messages', or a non-empty 'prompt'.")
    if not isinstance(response, str) or not response.strip():
        raise DataFormatError(f"{where}: missing a non-empty 'response'.")
    return ChatExample(({"role": "user", "content": prompt}, {"role": "assistant", "content": response}))


def _iter_records(path: Path) -> Iterable[tuple[str, object]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{path.name} line {number}", json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataFormatError(f"{path.name} line {number}: not valid JSON ({exc.msg}).") from exc
    elif suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = set(reader.fieldnames or [])
            if "messages" not in columns and not {"prompt", "response"} <= columns:
                raise DataFormatError(f"{path.name}: CSV needs a 'messages' column or 'prompt' and 'response'.")
            for number, row in enumerate(reader, start=2):
                yield f"{path.name} line {number}", row
    else:
        raise DataFormatError(f"{path.name}: unsupported file type {suffix!r}; use .jsonl or .csv.")


MIN_EXAMPLES = 4
"""Fewest records a new expert trains from: one fifth goes to the held-out split, and it must not be empty."""


def load_examples(path: str | Path, min_records: int = 1) -> list[ChatExample]:
    """Read and validate a whole data file before anything trains on it."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"Data file {path} does not exist.")
    examples: list[ChatExample] = []
    for where, record in _iter_records(path):
        examples.append(_record_to_example(record, where))
        if len(examples) > MAX_RECORDS:
            raise DataFormatError(f"{path.name}: more than {MAX_RECORDS} records; split the file.")
    if len(examples) < min_records:
        raise DataFormatError(f"{path.name}: {len(examples)} usable records; at least {min_records} needed.")
    return examples


def load_texts(path: str | Path, field: str = "text") -> list[str]:
    """Read a JSONL file of objects with a text field (routing prompts, `moe route` input)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"Input file {path} does not exist.")
    texts = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{path.name} line {number}: not valid JSON ({exc.msg}).") from exc
            value = record.get(field) if isinstance(record, dict) else None
            if not isinstance(value, str) or not value.strip():
                raise DataFormatError(f"{path.name} line {number}: needs a non-empty string field {field!r}.")
            texts.append(value)
    return texts


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> str:
    """Chat-template the conversation so far, ending where the assistant's answer begins."""
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


@dataclass
class TokenizedExample:
    input_ids: list[int]
    """Prompt then response tokens (the response ends with the end-of-turn token)."""
    labels: list[int]
    """-100 on prompt tokens, so the loss covers the response only."""


def tokenize_example(
    tokenizer: PreTrainedTokenizerBase, example: ChatExample, max_length: int
) -> TokenizedExample | None:
    """Tokenize prompt and response separately so the boundary is exact; None if the prompt alone
    does not fit in `max_length`."""
    prompt_ids = tokenizer(render_prompt(tokenizer, example.prompt_messages), add_special_tokens=False)[
        "input_ids"
    ]
    end = tokenizer.eos_token or ""
    response_ids = tokenizer(example.response + end, add_special_tokens=False)["input_ids"]
    if len(prompt_ids) >= max_length - 8:
        return None
    response_ids = response_ids[: max_length - len(prompt_ids)]
    return TokenizedExample(
        input_ids=prompt_ids + response_ids, labels=[-100] * len(prompt_ids) + list(response_ids)
    )
