"""The one text key: the same request written with other casing or spacing is the same request.

Used wherever text is deduplicated or hashed into a split (seed prompts, routing examples, log labels), so a
prompt lands in the same split and is dropped as a duplicate by the same rule everywhere. Near-duplicate
detection in the corpus build uses a stricter key (corpora.base.normalise: punctuation dropped too)."""

from __future__ import annotations


def text_key(text: str) -> str:
    """Lower case, runs of whitespace as one space, no leading or trailing space."""
    return " ".join(text.lower().split())
