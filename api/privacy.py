"""What of a prompt reaches the request log: the text, a redacted text, or only its hash."""

from __future__ import annotations

import hashlib
import re

from core.settings import Settings

EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
PHONE = re.compile(r"(?<!\w)\+?\d[\d ()./-]{7,}\d(?!\w)")
DIGITS = re.compile(r"\d{6,}")


def redact(text: str) -> str:
    text = EMAIL.sub("[EMAIL]", text)
    text = PHONE.sub("[PHONE]", text)
    return DIGITS.sub("[NUMBER]", text)


def prompt_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def loggable_prompt(text: str, settings: Settings) -> str | None:
    if settings.log_hash_only:
        return None
    return redact(text) if settings.log_redact else text
