"""medical sources: real consumer health questions, with answers by clinicians, therapists and health agencies.

train: doctor answers scraped from iCliniq / eHealth Forum / Question Doctors (LasseRegin), licensed-therapist
answers from counselchat.com (counsel-chat), CDC/FDA COVID-19 FAQs (JHU-COVID-QA scraping).
dev: K-QA (real patient questions from the K Health app, physician-written answers) and MeQSum (consumer health
questions sent to the U.S. National Library of Medicine). See corpora/notes/medical.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator

from core.text import text_key
from corpora.base import Files, Record, Source, csv_rows, json_lines, recase

# --- helpers --------------------------------------------------------------------------------------------------



_XLSX_NS = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main"}


def xlsx_rows(data: bytes) -> Iterator[list[str]]:
    """Rows of the first worksheet of an .xlsx file (stdlib only: shared strings and inline strings)."""
    book = zipfile.ZipFile(io.BytesIO(data))
    shared: list[str] = []
    if "xl/sharedStrings.xml" in book.namelist():
        for si in ET.fromstring(book.read("xl/sharedStrings.xml")).findall("m:si", _XLSX_NS):
            shared.append("".join(t.text or "" for t in si.iter(f"{{{_XLSX_NS['m']}}}t")))
    sheet = ET.fromstring(book.read("xl/worksheets/sheet1.xml"))
    for row in sheet.iter(f"{{{_XLSX_NS['m']}}}row"):
        cells: dict[int, str] = {}
        for c in row.findall("m:c", _XLSX_NS):
            ref = re.match(r"[A-Z]+", c.get("r", "A"))
            col = 0
            for ch in ref.group(0) if ref else "A":
                col = col * 26 + ord(ch) - 64
            kind = c.get("t")
            if kind == "s":
                v = c.find("m:v", _XLSX_NS)
                value = shared[int(v.text)] if v is not None and v.text else ""
            elif kind == "inlineStr":
                value = "".join(t.text or "" for t in c.iter(f"{{{_XLSX_NS['m']}}}t"))
            else:
                v = c.find("m:v", _XLSX_NS)
                value = v.text or "" if v is not None else ""
            cells[col - 1] = value
        if cells:
            yield [cells.get(i, "") for i in range(max(cells) + 1)]


# --- LasseRegin/medical-question-answer-data (train) -----------------------------------------------------------

LASSE_REPO = "LasseRegin/medical-question-answer-data"
LASSE_COMMIT = "685c9168058f0d68335fdbf728d221afcc71d1a6"
LASSE_FILES = ("icliniqQAs.json", "ehealthforumQAs.json", "questionDoctorQAs.json")
_ICLINIQ_TAIL = re.compile(r"\s*(revert (back )?(with|after)[^.]*|for further (information|queries)[^.]*)"
                           r"(consult|to) an? [^.]*online\s*-->\s*<link>\.?\s*$", re.I)
_LINK_TAIL = re.compile(r"[^.]*-->\s*<link>\.?\s*$", re.I)


def _lasse_items(files: Files, paths: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    """(patient's question, doctor's answer) from the scraped sites, one pair per distinct question (the longest
    answer); the patient's own text is `question_text` where the scrape kept it (iCliniq, Question Doctors),
    else `question` (eHealth Forum, lower-cased by the scraper)."""
    best: dict[str, tuple[str, str]] = {}
    for path in paths:
        for item in json.loads(files[path].decode("utf-8")):
            question = (item.get("question_text") or item.get("question") or "").strip()
            question = re.sub(r"^(hi|hello|hey)?\s*(doctor|dr\.?)\s*,?\s*\n", "", question, flags=re.I).strip()
            answer = (item.get("answer") or "").strip()
            answer = _LINK_TAIL.sub("", _ICLINIQ_TAIL.sub("", answer)).strip()
            key = text_key(question)
            if key not in best or len(answer) > len(best[key][1]):
                best[key] = (question, recase(answer))
    yield from best.values()


def _to_qa(question: str, answer: str, share: int) -> bool:
    """Whether a pair goes to QA: an answer of 200+ characters (short ones are mostly 'see a doctor'), and for
    the big Question Doctors file only a fixed pseudo-random `share` of 1/`share` (the rest are routing queries)."""
    if len(answer) < 200:
        return False
    return share <= 1 or int(hashlib.sha1(question.encode()).hexdigest(), 16) % share == 0


def parse_lasse_forum_qa(files: Files) -> Iterator[Record]:
    """QA from iCliniq and eHealth Forum (long patient posts with backstory)."""
    for question, answer in _lasse_items(files, LASSE_FILES[:2]):
        if _to_qa(question, answer, 1):
            yield Record(question, answer)


def parse_lasse_qd_qa(files: Files) -> Iterator[Record]:
    """QA from Question Doctors (short question titles), about half of the long-answer pairs."""
    for question, answer in _lasse_items(files, LASSE_FILES[2:]):
        if _to_qa(question, answer, 2):
            yield Record(question, answer)


def parse_lasse_queries(files: Files) -> Iterator[Record]:
    """Routing queries: the patient questions not taken as QA above."""
    for paths, share in ((LASSE_FILES[:2], 1), (LASSE_FILES[2:], 2)):
        for question, answer in _lasse_items(files, paths):
            if not _to_qa(question, answer, share):
                yield Record(question)


# --- nbertagnolli/counsel-chat (train) --------------------------------------------------------------------------

COUNSEL_TOPICS = {
    "depression", "anxiety", "trauma", "self-esteem", "anger-management", "substance-abuse", "diagnosis",
    "grief-and-loss", "self-harm", "sleep-improvement", "eating-disorders", "stress", "addiction",
    "counseling-fundamentals", "behavioral-change", "children-adolescents",
}
"""Mental-health topics only; relationships, intimacy, parenting, marriage, family conflict, spirituality,
legal/regulatory, workplace and professional-ethics questions are left out (not clearly `medical`)."""


def parse_counsel_chat(files: Files) -> Iterator[Record]:
    """counselchat.com: a person's question (title + body) and the most up-voted licensed therapist's answer."""
    best: dict[str, dict[str, str]] = {}
    for row in csv_rows(files["data/20200325_counsel_chat.csv"]):
        if row.get("topic") not in COUNSEL_TOPICS:
            continue
        qid = row["questionID"]
        votes = int(row.get("upvotes") or 0)
        if qid not in best or votes > int(best[qid].get("upvotes") or 0):
            best[qid] = row
    for row in best.values():
        title, body = row["questionTitle"].strip(), row["questionText"].strip()
        text = body if title.lower().rstrip("?.") in body.lower() else f"{title}\n{body}".strip()
        yield Record(text, row["answerText"].strip())


# --- JHU-COVID-QA/scraping-qas (train) --------------------------------------------------------------------------

JHU_FILES = (
    "data/scraping/schema_v0.1/CDC_v0.1.jsonl",
    "data/scraping/schema_v0.1/CDC_new_v0.1.jsonl",
    "data/scraping/schema_v0.1/CDC_Children_v0.1.jsonl",
    "data/scraping/schema_v0.1/CDC_Pregnancy_v0.1.jsonl",
    "data/scraping/schema_v0.1/CDC_Individuals_v0.1.jsonl",
    "data/scraping/schema_v0.3/FDA_v0.3.jsonl",
)


def parse_jhu_us_gov(files: Files) -> Iterator[Record]:
    """CDC and FDA COVID-19 FAQ entries (US-government works): FAQ question -> agency answer."""
    for path in JHU_FILES:
        for item in json_lines(files[path]):
            if item.get("typeOfInfo", "QA") != "QA" or not item.get("hasAnswer", True):
                continue
            question = (item.get("questionText") or "").strip()
            answer = (item.get("answerText") or "").strip()
            if question and answer:
                yield Record(question, answer)


# --- Itaymanes/K-QA (dev) ----------------------------------------------------------------------------------------

def parse_kqa_qa(files: Files) -> Iterator[Record]:
    """K-QA: real patient questions from the K Health app with free-form answers written by physicians."""
    for item in json_lines(files["dataset/questions_w_answers.jsonl"]):
        yield Record(item["Question"], item.get("Free_form_answer") or "")


def parse_kqa_queries(files: Files) -> Iterator[Record]:
    """K-QA: the 1,212 real patient questions (chat register; those with answers are taken by the QA source);
    context-dependent follow-ups (under 6 words, or opening with or/and/so/but) are skipped."""
    for item in json_lines(files["dataset/questions.jsonl"]):
        question = item["Question"].strip()
        # follow-ups that only make sense after an earlier turn ("Or maybe ibuprofen?") are left out
        if len(question.split()) >= 6 and not re.match(r"^(or|and|so|but)\b", question, re.I):
            yield Record(question)


# --- abachaa/MeQSum (dev) ---------------------------------------------------------------------------------------

MEQSUM_FILE = "MeQSum_ACL2019_BenAbacha_Demner-Fushman.xlsx"


def parse_meqsum(files: Files) -> Iterator[Record]:
    """MeQSum: consumer health questions sent to the U.S. National Library of Medicine (the `CHQ` column);
    the `SUBJECT:` / `MESSAGE:` headers are dropped, a subject that says something is kept as the first line."""
    rows = xlsx_rows(files[MEQSUM_FILE])
    header = [h.strip().lower() for h in next(rows)]
    col = header.index("chq")
    for row in rows:
        if col >= len(row):
            continue
        chq = row[col].strip()
        m = re.match(r"^\s*SUBJECT:\s*(.*?)\s*\n?\s*MESSAGE:\s*(.*)$", chq, re.I | re.S)
        if m:
            subject, message = m.group(1).strip(), m.group(2).strip()
            if re.search(r"clinicaltrials\.gov|question\s*-|^re:|^fw:", subject, re.I):
                subject = ""
            if subject and subject.lower() not in {"question", "questions", "inquiry", "help", "information"} \
                    and subject.lower() not in message.lower():
                chq = f"{subject}\n{message}"
            else:
                chq = message
        chq = re.sub(r"^\s*(MESSAGE|SUBJECT):\s*", "", chq, flags=re.I)
        yield Record(chq)


# --- the sources --------------------------------------------------------------------------------------------------

SOURCES: list[Source] = [
    Source(
        name="medical_doctor_forum_qa",
        repo=LASSE_REPO, commit=LASSE_COMMIT, license="MIT",
        domain="medical", role="train", kind="qa", paths=LASSE_FILES, parse=parse_lasse_forum_qa,
        note="iCliniq and eHealth Forum (scraped 2017): patient posts and doctor answers >= 200 chars; answers "
             "were lower-cased by the scraper (sentence capitals and 'I' restored), 'consult ... online --> "
             "<link>' tails cut.",
    ),
    Source(
        name="medical_question_doctors_qa",
        repo=LASSE_REPO, commit=LASSE_COMMIT, license="MIT",
        domain="medical", role="train", kind="qa", paths=LASSE_FILES, parse=parse_lasse_qd_qa, limit=400,
        note="Question Doctors (scraped 2017): short patient questions, longest doctor answer (>= 200 chars), "
             "a fixed half of them; answers lower-cased by the scraper (sentence capitals restored).",
    ),
    Source(
        name="medical_doctor_site_questions",
        repo=LASSE_REPO, commit=LASSE_COMMIT, license="MIT",
        domain="medical", role="train", kind="queries", paths=LASSE_FILES, parse=parse_lasse_queries,
        note="The other patient questions of the same scrape (mostly short Question Doctors titles).",
    ),
    Source(
        name="medical_counsel_chat",
        repo="nbertagnolli/counsel-chat", commit="e202e19c5002482f4f6631af754c276dd9adf7f2", license="MIT",
        domain="medical", role="train", kind="qa", paths=("data/20200325_counsel_chat.csv",),
        parse=parse_counsel_chat,
        note="counselchat.com: people's mental-health questions and the top licensed-therapist answer; "
             "mental-health topics only.",
    ),
    Source(
        name="medical_cdc_fda_covid_faq",
        repo="JHU-COVID-QA/scraping-qas", commit="9869dd7a0fd795620c2ebb538074d833e157b2de",
        license="Apache-2.0 (repo); CDC/FDA text is US-government public domain",
        domain="medical", role="train", kind="qa", paths=JHU_FILES, parse=parse_jhu_us_gov, limit=200,
        note="CDC and FDA COVID-19 FAQ question/answer pairs (2020); only US-government sources taken.",
    ),
    Source(
        name="medical_kqa_dev_qa",
        repo="Itaymanes/K-QA", commit="ef403d012e199fcfa0d8c02b38a96ff95164f4d0", license="MIT",
        domain="medical", role="dev", kind="qa", paths=("dataset/questions_w_answers.jsonl",),
        parse=parse_kqa_qa,
        note="K-QA: real patient questions (K Health app) with physician-written free-form answers.",
    ),
    Source(
        name="medical_kqa_dev_queries",
        repo="Itaymanes/K-QA", commit="ef403d012e199fcfa0d8c02b38a96ff95164f4d0", license="MIT",
        domain="medical", role="dev", kind="queries", paths=("dataset/questions.jsonl",),
        parse=parse_kqa_queries, limit=300,
        note="K-QA: further real patient questions, chat register (a few depend on earlier context).",
    ),
    Source(
        name="medical_meqsum_dev",
        repo="abachaa/MeQSum", commit="51e36cf65c12602333b6fdc3ae8ecf10430529f7", license="CC-BY-4.0",
        domain="medical", role="dev", kind="queries", paths=(MEQSUM_FILE,), parse=parse_meqsum, limit=300,
        note="MeQSum: consumer health questions (e-mails) sent to the U.S. National Library of Medicine.",
    ),
]
