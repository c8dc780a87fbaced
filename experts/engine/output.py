"""Output processing: token ids to text deltas. Stop strings end a row (and are cut from its text), and while
a row runs its visible text holds back an incomplete UTF-8 tail and any tail that could still become a stop
string, so a client never sees text that is later taken back."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from experts.engine.batch import Row
from experts.engine.request import TokenLogprob


def holdback(text: str, stops: Sequence[str]) -> str:
    """Hide an incomplete UTF-8 tail and any tail that could still become a stop string."""
    text = text.rstrip("\ufffd")
    cut = len(text)
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                cut = min(cut, len(text) - k)
                break
    return text[:cut]


class OutputProcessor:
    """Detokenizes rows incrementally and decides when they finish (stop, length)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_positions: int) -> None:
        self.tokenizer = tokenizer
        self.max_positions = max_positions
        self._token_text: dict[int, str] = {}
        """Token id -> its text alone; bounded by the vocabulary, and logprobs ask for the same ids often."""

    def token_text(self, ids: list[int]) -> list[str]:
        missing = [i for i in dict.fromkeys(ids) if i not in self._token_text]
        if missing:  # one call into the tokenizer for all of a step's new ids
            texts = self.tokenizer.batch_decode([[i] for i in missing], skip_special_tokens=False)
            self._token_text.update(zip(missing, texts, strict=True))
        return [self._token_text[i] for i in ids]

    def token_logprob(self, token: int, logprob: float, top_ids: list[int], top_logprobs: list[float]) -> TokenLogprob:
        """A generated token's logprob entry, the token and its alternatives as text."""
        text, *top_texts = self.token_text([token, *top_ids])
        return TokenLogprob(token, text, logprob, tuple(zip(top_texts, top_logprobs, strict=True)))

    def process(self, row: Row, eos: bool) -> tuple[str, str | None]:
        """After a step appended its token to `row.generated` (or hit `eos`): the text not sent yet and the
        finish reason (None while the row runs). A running row's delta may be empty (held back)."""
        params = row.request.params
        reason = "stop" if eos else None
        text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
        for stop in params.stop:
            at = text.find(stop)
            if at != -1:
                text, reason = text[:at], "stop"
        if reason is None and (len(row.generated) >= params.max_tokens or row.position + 1 >= self.max_positions):
            reason = "length"
        visible = text if reason else holdback(text, params.stop)
        if len(visible) <= row.emitted_chars and not reason:
            return "", None
        delta = visible[row.emitted_chars:]
        row.emitted_chars = max(row.emitted_chars, len(visible))
        return delta, reason
