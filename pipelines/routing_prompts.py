"""Verb: add routing prompts to a registered expert (`moe expert prompts NAME --prompts FILE`).

How a domain that borders others (hr beside legal and finance) reaches more of its traffic: the router's verdict
asks for it when a new label takes less than 90% of its held-out prompts (pipelines.promotion.compare).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from core.text import text_key
from experts.seed import split_texts
from registry import repository as repo

ADDED_PROMPTS_SOURCE = "prompts:cli"
"""Source of the added rows. Its prefix is one of pipelines.train_router.NEW_ROW_SOURCES: like feedback labels,
they train as new rows on a warm start; replayed and distilled from the active router, they could not change what
it does."""


@dataclass(frozen=True)
class AddedPrompts:
    train: int
    """Rows added to the training split."""
    val: int
    """Rows added to the validation split (split as at registration: experts.seed.split_texts)."""
    known: int
    """Texts the expert already had (or repeated in the file): skipped."""


def add_routing_prompts(sessions: sessionmaker[Session], name: str, texts: Sequence[str]) -> AddedPrompts:
    """Store the texts `name` does not have yet as its routing prompts, in one transaction."""
    with sessions.begin() as session:
        repo.require_expert(session, name)
        known = {text_key(row.text) for row in repo.routing_examples(session, [name])}
        fresh = list(dict.fromkeys(t for t in texts if text_key(t) not in known))
        train, val = split_texts(fresh)
        repo.add_routing_examples(session, name, train, "train", ADDED_PROMPTS_SOURCE)
        repo.add_routing_examples(session, name, val, "val", ADDED_PROMPTS_SOURCE)
    return AddedPrompts(train=len(train), val=len(val), known=len(texts) - len(fresh))
