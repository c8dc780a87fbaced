"""Text augmentation for router training: one noisy variant per prompt, so the router sees the casing,
typos, truncation and chatty openers of real traffic, not only the seed data's phrasing. Deterministic
for a seed."""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Sequence

OPENERS = ("hi, ", "hey ", "quick question: ", "hello, ", "pls help ", "Question: ", "ok so ", "")
CLOSERS = ("", "", " thanks", " ?", " pls", " Thank you in advance.", " any ideas?")


def _lower(text: str, rng: random.Random) -> str:
    return text.lower()


def _strip_punctuation(text: str, rng: random.Random) -> str:
    return re.sub(f"[{re.escape(string.punctuation)}]", "", text)


def _typos(text: str, rng: random.Random) -> str:
    words = text.split()
    candidates = [i for i, w in enumerate(words) if len(w) > 3]
    for i in rng.sample(candidates, k=min(len(candidates), max(1, len(words) // 6))):
        w = list(words[i])
        j = rng.randrange(len(w) - 1)
        if rng.random() < 0.5:
            w[j], w[j + 1] = w[j + 1], w[j]
        else:
            del w[j]
        words[i] = "".join(w)
    return " ".join(words)


def _truncate(text: str, rng: random.Random) -> str:
    words = text.split()
    if len(words) < 8:
        return text
    return " ".join(words[: max(4, int(len(words) * rng.uniform(0.35, 0.7)))])


def _chatty(text: str, rng: random.Random) -> str:
    return rng.choice(OPENERS) + text + rng.choice(CLOSERS)


OPS: tuple[Callable[[str, random.Random], str], ...] = (_lower, _strip_punctuation, _typos, _truncate, _chatty)


def augment(texts: Sequence[str], seed: int = 0) -> list[str]:
    """One variant per text, each with two random operations. The randomness is seeded per text, so a text gets
    the same variant in every retrain and its features come from the feature cache."""
    out = []
    for text in texts:
        rng = random.Random(f"{seed}:{text}")
        variant = text
        for op in rng.sample(OPS, k=2):
            variant = op(variant, rng)
        out.append(variant.strip() or text)
    return out
