"""finance sources: personal-finance and money knowledge/advice questions (credit, loans and mortgages as
decisions, saving, investing, retirement, taxes), and answers to them.

Openly licensed real personal-finance text is scarce on GitHub (Stack Exchange personal finance and everything
built from FiQA are reserved for the independent evaluation), so this domain has:

* train: the Ask CFPB knowledge base (US-government answers, public domain / CC0) and three advice-type intents
  of CLINC150 (CC BY 3.0);
* dev: the finance questions of the Dolly-15k `open_qa` subset (CC BY-SA 3.0; prompts and answers written by
  Databricks employees).

See corpora/notes/finance.md for what was searched and rejected.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable, Iterator

from corpora.base import Domain, Files, Record, Source, csv_rows

# --- Ask CFPB (catops/ask-cfpb-bot) ----------------------------------------------------------------------

ASK_CFPB_REPO = "catops/ask-cfpb-bot"
ASK_CFPB_COMMIT = "90c86064c751cb47107b65749d9b37e73732d252"
ASK_CFPB_PATH = "ask.csv"

_LEGAL_QUESTION = re.compile(
    r"\b(legal|illegal|law|laws|lawsuit|sue|sued|suing|court|attorney|lawyer|discriminat\w*|rights?|harass\w*|"
    r"arrest\w*|garnish\w*|foreclos\w*|bankrupt\w*)\b",
    re.I,
)
"""Questions about one's rights, courts or law enforcement: `legal` by the routing convention, so left out."""

_SERVICING_QUESTION = re.compile(
    r"\b(lost|stolen|was charged|charged me|can they do that|can it do that|is this possible|is that allowed)\b",
    re.I,
)
"""Lost cards, disputed charges and "can they do that?" complaints read as bank customer service (`support`)."""

_MAX_ANSWER = 2000


def ask_cfpb_entries(files: Files) -> Iterator[tuple[str, str, str]]:
    """(topic, question, answer) of every APPROVED Ask CFPB entry. The full answer is used; where it is longer
    than the 2,000-character limit the agency's own short answer is used instead, if there is one."""
    for row in csv_rows(files[ASK_CFPB_PATH]):
        if row.get("Status") != "APPROVED":
            continue
        question = html.unescape(row.get("Question") or "").strip()
        answer = html.unescape(row.get("Answer") or "").strip()
        if len(answer) > _MAX_ANSWER:
            answer = html.unescape(row.get("ShortAnswer") or "").strip()
        if question and answer:
            yield row.get("Topic") or "", question, answer


def is_legal_question(topic: str, question: str) -> bool:
    """The Ask CFPB entries that belong to `legal`: the "Debt collection" topic (collectors' conduct, the law
    that limits it) and questions about one's rights, courts, foreclosure or bankruptcy."""
    return topic == "Debt collection" or bool(_LEGAL_QUESTION.search(question))


def parse_ask_cfpb(files: Files) -> Iterator[Record]:
    """Ask CFPB: the Consumer Financial Protection Bureau's consumer-finance Q&A knowledge base (a 2017 export
    of consumerfinance.gov/askcfpb, 1,086 entries). Questions are phrased in the consumer's voice ("I applied for
    a credit card and was turned down. What can I do?"), answers are written by the agency.

    Kept for `finance`: the entries that are not legal questions (`is_legal_question`; those go to `legal`) and
    do not read as account servicing (lost or stolen cards, "I was charged ... can they do that?": `support`)."""
    for topic, question, answer in ask_cfpb_entries(files):
        if not is_legal_question(topic, question) and not _SERVICING_QUESTION.search(question):
            yield Record(question, answer)


def ask_cfpb_source(name: str, domain: Domain, parse: Callable[[Files], Iterator[Record]], note: str) -> Source:
    """A training QA source over the Ask CFPB snapshot (finance takes one part of it, legal the other)."""
    return Source(name=name, repo=ASK_CFPB_REPO, commit=ASK_CFPB_COMMIT,
                  license="CC0-1.0 (US Government work, public domain)", domain=domain, role="train", kind="qa",
                  paths=(ASK_CFPB_PATH,), parse=parse, note=note,
                  url=f"https://github.com/{ASK_CFPB_REPO}/blob/{ASK_CFPB_COMMIT}/{ASK_CFPB_PATH}")


# --- CLINC150 (clinc/oos-eval) ---------------------------------------------------------------------------

CLINC_PATH = "data/data_full.json"
CLINC_FINANCE_INTENTS = frozenset({"improve_credit_score", "rollover_401k", "taxes"})
"""Advice/knowledge-type money intents; CLINC's banking and credit-card servicing intents go to `support`."""


def parse_clinc_finance(files: Files) -> Iterator[Record]:
    """CLINC150: crowd-sourced assistant queries in 150 intents. Takes every split (train/val/test) of the
    intents improve_credit_score, rollover_401k and taxes: short search-box style money questions."""
    data = json.loads(files[CLINC_PATH])
    for split in ("train", "val", "test"):
        for text, intent in data[split]:
            if intent in CLINC_FINANCE_INTENTS:
                yield Record(text)


# --- Dolly-15k open_qa (prp-e/chinkara-openqa-dataset) ----------------------------------------------------

DOLLY_OPENQA_PATH = "chinkara-open_qa.jsonl"

_FINANCE_TERMS = re.compile(
    r"\b(financ\w*|money|invest\w*|stocks?|stock market|bonds?|retire\w*|401k|401\(k\)|ira|roth|tax(es)?|"
    r"budget\w*|savings?|saving money|debt|loans?|mortgages?|credit|interest rates?|insurance|inflation|"
    r"dividends?|etf|index fund|mutual funds?|pension|annuit\w*|compound interest|net worth|crypto\w*|"
    r"bitcoin|portfolio|brokerage|capital gains?|homeownership|equity|derivative|futures|hedge)\b",
    re.I,
)
_NOT_FINANCE = re.compile(
    r"\b(james bond|bond girl|ionic|covalent|bond angle|daylight|veronica roth|divergent|protein|chess|"
    r"monopoly|nobel|george lucas|abel prize|greta|euro ?song|investigation|lucasfilm|google drive|"
    r"coins? without|nickels|quarter|who won|world investment report|whitepaper published|when was|"
    r"which institute|who is|who was|first credit card|yarns?|tools)\b",
    re.I,
)


def parse_dolly_openqa_finance(files: Files) -> Iterator[Record]:
    """Dolly-15k `open_qa` (questions and answers written by Databricks employees, 2023), as re-packaged by
    the chinkara project ("### Human: ... ### Assistant: ..."). Keeps the questions about money, personal
    finance and investing (keyword match, minus trivia and false friends such as chemical bonds)."""
    for line in files[DOLLY_OPENQA_PATH].decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        text = json.loads(line).get("text", "")
        if "### Assistant:" not in text:
            continue
        question, answer = text.split("### Assistant:", 1)
        question = question.replace("### Human:", "", 1).strip()
        answer = answer.strip()
        if _FINANCE_TERMS.search(question) and not _NOT_FINANCE.search(question):
            yield Record(question, answer)


SOURCES: list[Source] = [
    ask_cfpb_source(
        "ask-cfpb", "finance", parse_ask_cfpb,
        "Ask CFPB consumer-finance knowledge base (consumer-voice questions, agency answers); debt-collection topic "
        "and rights/law/court questions left out (legal); over-long answers replaced by the short answer.",
    ),
    Source(
        name="clinc-finance",
        repo="clinc/oos-eval",
        commit="828f8093932c8fe6ca7936c3d2e52903b1c523de",
        license="CC-BY-3.0",
        domain="finance",
        role="train",
        kind="queries",
        paths=(CLINC_PATH,),
        parse=parse_clinc_finance,
        note="CLINC150 intents improve_credit_score, rollover_401k, taxes (all splits).",
    ),
    Source(
        name="dolly-openqa-finance",
        repo="prp-e/chinkara-openqa-dataset",
        commit="6720f527aa8da8318e57f3667ffbba23a8a196bb",
        license="CC-BY-SA-3.0 (databricks-dolly-15k)",
        domain="finance",
        role="dev",
        kind="qa",
        paths=(DOLLY_OPENQA_PATH,),
        parse=parse_dolly_openqa_finance,
        note="Finance questions of Dolly-15k open_qa (human-written questions and answers), keyword-filtered.",
    ),
]
