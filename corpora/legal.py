"""legal sources: real legal-aid questions about tenancy, family, debt, employment, consumer and court matters.

train: the utterances of the Legal Navigator (Legal Services Corporation / Microsoft Access-to-Justice portal)
LUIS intent model, CC BY 4.0: lay questions drawn from state legal-aid self-help content and user phrasings.
train, qa: the Ask CFPB entries (U.S. Consumer Financial Protection Bureau, public domain) about debt collection and
consumers' rights, courts, foreclosure and bankruptcy, with the agency's answers (the rest of Ask CFPB is finance's).
dev: Worker.gov (U.S. Departments of Labor and Justice, EEOC, NLRB; public domain / CC0): first-person worker
situations ("I was laid off because I told my supervisor I was pregnant.") with the agencies' statement of the
worker's rights. Small (about 60 items). Licensed, real lay legal Q&A is scarce on GitHub (Law Stack Exchange
copies are all single files over the 4 MiB snapshot limit or LFS pointers; r/legaladvice and ABA Free Legal Answers
have no open licence; Learned Hands is CC BY-NC-SA and inside LegalBench). See corpora/notes/legal.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

from corpora.base import Files, Record, Source, recase
from corpora.finance import ask_cfpb_entries, ask_cfpb_source, is_legal_question

# --- Legal Navigator LUIS model --------------------------------------------------------------------------------

LUIS_PATH = "LUISModels/A2JLegalIntentEngine.json"

_NOT_LEGAL_INTENTS = frozenset({
    "None",  # Microsoft prebuilt Places/Events utterances (restaurants, tickets, taxis): general, not legal
    "Managing money", "Credit problems", "Student loans",  # money advice: finance
    "Medical bills", "Emergency shelter & assistance",  # benefit eligibility, not a legal question
    "Utilities & phones", "Utilities and telecommunications",  # mostly account servicing
})
"""Intents whose utterances do not fit the `legal` label of this product."""

_QUESTION_START = re.compile(
    r"^(i|i'm|im|my|we|our|me|can|could|do|does|did|is|are|am|was|will|would|should|what|when|where|who|whom|"
    r"why|how|if|which|must|may|after|before|a|an|the|as|no|he|she|they|landlord|someone)\b"
)


def _is_question(text: str) -> bool:
    """Keep real questions and situation descriptions; drop bare topic headings ("bankruptcy", "abuse and
    harassment", "agencies and other organizations that can help")."""
    words = text.split()
    if len(words) < 4:
        return False
    return text.rstrip().endswith("?") or bool(_QUESTION_START.match(text))


def parse_legal_navigator(files: Files) -> Iterator[Record]:
    """Legal Navigator (LSCOIT/LegalNavigator) LUIS app `A2JLegalIntentEngine`: every utterance of a legal
    intent (tenant's rights, eviction, divorce, custody, debt, domestic violence, foreclosure, going to court,
    discrimination...), recased, headings dropped."""
    data = json.loads(files[LUIS_PATH].decode("utf-8-sig"))
    for utterance in data.get("utterances", []):
        if utterance.get("intent") in _NOT_LEGAL_INTENTS:
            continue
        text = " ".join(str(utterance.get("text", "")).split())
        text = re.sub(r"\s+([?.,!])", r"\1", text)
        if not _is_question(text):
            continue
        yield Record(recase(text))


# --- Worker.gov (DOL / DOJ / EEOC / NLRB) -------------------------------------------------------------------

WORKER_GOV_COMMIT = "bfcb92159b65b56ac6afa0b4429daf95ad2f75e2"
WORKER_GOV_PATHS = (
    "_profiles/all/age-discrimination-violation.md", "_profiles/all/agefired-discrimination-violation.md",
    "_profiles/all/child-labor.md", "_profiles/all/citizenship-discrimination-violation.md",
    "_profiles/all/color-discrimination-violation.md", "_profiles/all/disability-discrimination-violation.md",
    "_profiles/all/documentation-violation.md", "_profiles/all/equal-pay.md", "_profiles/all/fmla-violation.md",
    "_profiles/all/gi-discrimination-violation.md", "_profiles/all/harassment-violation.md",
    "_profiles/all/health-safety-violation.md", "_profiles/all/hiring-discrimination-violation.md",
    "_profiles/all/hiringaccent-discrimination-violation.md",
    "_profiles/all/hiringpregnancy-discrimination-violation.md", "_profiles/all/hispanic-discrimination-violation.md",
    "_profiles/all/hours-worked-violation.md", "_profiles/all/injuryemployerblame.md",
    "_profiles/all/inspector-safety-violation.md", "_profiles/all/job-discrimination.md",
    "_profiles/all/laidoffpregnant-discrimination-violation.md", "_profiles/all/language-violation.md",
    "_profiles/all/min-wage-violation.md", "_profiles/all/no-discrimination-violation.md",
    "_profiles/all/ofccp-violation.md", "_profiles/all/osha-inspection.md", "_profiles/all/overtime-violation.md",
    "_profiles/all/race-discrimination-violation.md", "_profiles/all/recordkeeping-violation.md",
    "_profiles/all/religion-discrimination-violation.md", "_profiles/all/safety-gear-violation.md",
    "_profiles/all/sex-discrimination-violation.md", "_profiles/all/tip-violation.md",
    "_profiles/all/union-compuse.md", "_profiles/all/union-compuse2.md", "_profiles/all/union-demoted.md",
    "_profiles/all/union-engagement-violation.md", "_profiles/all/union-formation-retaliation-hiring.md",
    "_profiles/all/union-formation-retaliation.md", "_profiles/all/union-handbook.md",
    "_profiles/all/union-meet-violation.md", "_profiles/all/union-nailtechs.md",
    "_profiles/all/union-steward-retaliation.md", "_profiles/all/union-strike.md",
    "_profiles/all/union-supporter.md", "_profiles/all/union-voting-violation.md",
    "_profiles/all/wage-discrimination-violation.md", "_profiles/all/wage-theft.md",
    "_profiles/all/whistleblower-retaliation.md", "_profiles/all/womenconstruction-discrimination-violation.md",
    "_profiles/all/womenhiring-discrimination-violation.md",
    "_profiles/all/workingconditions-discrimination-violation.md",
)
"""The `Explore all rights` pages: every situation the site covers (the per-occupation folders repeat them)."""

_EXPERIENCE = re.compile(r'^experience:\s*"(.*)"\s*$', re.M)
_ENTITLEMENT = re.compile(r"^\s*-\s*(header|description):\s*(.*?)\s*$", re.M)


def parse_worker_gov(files: Files) -> Iterator[Record]:
    """Worker.gov rights pages (Jekyll front matter): the worker's situation in the first person (`experience`)
    and the agencies' statement of the right that applies (the `entitlement` header and description)."""
    for path in WORKER_GOV_PATHS:
        page = files[path].decode("utf-8", errors="replace")
        experience = _EXPERIENCE.search(page)
        if not experience:
            continue
        body = page.split("entitlement:", 1)[-1].split("actions:", 1)[0]
        parts = [value.strip().strip('"') for _, value in _ENTITLEMENT.findall(body)]
        answer = " ".join(p.rstrip(".") + "." for p in parts if p)
        text = " ".join(experience.group(1).split())
        text = text[:1].upper() + text[1:]
        if not text.endswith((".", "?", "!")):
            text += "."
        yield Record(text, answer)


# --- Ask CFPB, its legal part --------------------------------------------------------------------------------

def parse_ask_cfpb_legal(files: Files) -> Iterator[Record]:
    """The Ask CFPB entries `corpora.finance` leaves out as legal (`is_legal_question`): what debt collectors may
    and may not do, disputing a debt, foreclosure, bankruptcy, discrimination, one's rights under consumer law;
    the agency's answers."""
    for topic, question, answer in ask_cfpb_entries(files):
        if is_legal_question(topic, question):
            yield Record(question, answer)


SOURCES: list[Source] = [
    Source(
        name="legal-navigator-luis",
        repo="LSCOIT/LegalNavigator",
        commit="e47e5243f8b1b949c97f9409b25e8d30a0d7fc27",
        license="CC-BY-4.0",
        domain="legal",
        role="train",
        kind="queries",
        paths=(LUIS_PATH,),
        parse=parse_legal_navigator,
        note="Legal-aid questions (Washington/Alaska/Hawaii self-help topics) from the Legal Navigator intent "
             "model; non-legal intents (prebuilt places/events, money, benefits, utilities) and bare topic "
             "headings dropped; lower-case export recased.",
    ),
    ask_cfpb_source(
        "ask-cfpb-legal", "legal", parse_ask_cfpb_legal,
        "Ask CFPB entries of the debt-collection topic and questions about rights, law, courts, foreclosure or "
        "bankruptcy (the part finance leaves out); consumer-voice questions, agency answers; over-long answers "
        "replaced by the short answer.",
    ),
    Source(
        name="worker-gov-rights",
        repo="presidential-innovation-fellows/worker-dol-gov",
        commit=WORKER_GOV_COMMIT,
        license="CC0-1.0 (U.S. government work, public domain)",
        domain="legal",
        role="dev",
        kind="qa",
        paths=WORKER_GOV_PATHS,
        parse=parse_worker_gov,
        note="Worker.gov (U.S. DOL, DOJ, EEOC, NLRB): a worker's situation in the first person (wages, overtime, "
             "leave, discrimination, harassment, retaliation, unions, safety) and the agencies' statement of the "
             "right that applies. Written by the government team from user research, not by the workers; small.",
    ),
]
