"""The expert naming rule, in a module that imports nothing heavy: `moe expert add Bad-Name` must be refused
before torch, the registry or the backbone load."""

from __future__ import annotations

import re

from core.errors import InvalidNameError

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{1,47}$")
RESERVED_NAMES = frozenset({"auto", "base", "none", "default"})


def validate_expert_name(name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise InvalidNameError(
            f"Invalid expert name {name!r}: use 2-48 characters, lower-case letters, digits, '-' or '_', "
            "starting with a letter."
        )
    if name in RESERVED_NAMES:
        raise InvalidNameError(f"Expert name {name!r} is reserved; choose another.")
    return name
