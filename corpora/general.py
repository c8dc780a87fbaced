"""general sources: real requests that belong to no expert domain (the router's `base` column).

Everything here is small talk, assistant commands (alarms, music, lights, weather, travel, cooking), trivia,
writing/coding/maths tasks and similar. Intents that belong to an expert domain (banking, cards, bills, taxes,
insurance, payroll, nutrition, vaccines, visas, orders/deliveries, complaints to companies, account/password
help) are dropped by intent, and every text also passes `_in_domain`, a keyword screen for health, money,
legal and customer-service words, so the label stays clean.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

from corpora.base import Files, Record, Source, csv_rows, json_lines

# --- shared filter ------------------------------------------------------------------------------------------

_IN_DOMAIN = re.compile(
    r"\b("
    # medical
    r"doctors?|physician|nurse|symptoms?|medicines?|medications?|meds|pills?|prescri\w*|pregnan\w*|diseases?|"
    r"sick|illness|fever|flu|covid|cancer|diabet\w*|headaches?|migraines?|allerg\w*|vaccin\w*|hospitals?|clinic|"
    r"therap\w*|depress\w*|anxiety|calories|nutrition\w*|diet|blood|injur\w*|pain|dentist|health\w*|surgery|"
    r"virus|infection|vitamins?|unhealthy|stress\w*|vomit\w*|lose weight|weight (?:gain|loss)|"
    # finance
    r"banks?|banking|credit|debit|loans?|mortgages?|invest\w*|stocks?|shares|retire\w*|401k|ira|tax|taxes|"
    r"insurance|budget\w*|savings?|debts?|interest rates?|salary|income|paycheck|payday|money|dollars?|"
    r"euros?|pounds sterling|mint|exchange rate|currency|finance\w*|financial|bitcoin|crypto\w*|pensions?|"
    r"payments?|pay|paid|bills?|prices?|cost|fees?|cheap\w*|expensive|afford\w*|"
    # legal
    r"lawyers?|attorneys?|sue|suing|lawsuit|courts?|legal\w*|illegal|laws?|visas?|immigra\w*|tenants?|"
    r"landlords?|lease|evict\w*|contracts?|divorce|custody|arrest\w*|police|crimes?|criminal|copyright|"
    r"rights|judge|"
    # support
    r"refunds?|returns?|my orders?|order status|track\w*|deliver\w*|packages?|parcels?|shipping|shipped|"
    r"passwords?|log ?in|sign ?in|accounts?|subscriptions?|customer service|complain\w*|warranty|"
    r"cancel my"
    r")\b",
    re.IGNORECASE,
)


def _in_domain(text: str) -> bool:
    """True when the text mentions a health, money, legal or customer-service word."""
    return bool(_IN_DOMAIN.search(text))


# --- clinc/oos-eval -------------------------------------------------------------------------------------------

CLINC_KEEP = frozenset({
    # travel (not: travel_notification = bank, exchange_rate = money, vaccines = health, international_visa =
    # immigration, lost_luggage = airline customer service)
    "plug_type", "translate", "flight_status", "timezone", "travel_suggestion", "travel_alert", "book_flight",
    "book_hotel", "carry_on", "car_rental",
    # kitchen_and_dining (not: calories, nutrition_info)
    "food_last", "confirm_reservation", "how_busy", "ingredients_list", "recipe", "restaurant_reviews",
    "restaurant_reservation", "meal_suggestion", "restaurant_suggestion", "cancel_reservation",
    "ingredient_substitution", "cook_time", "accept_reservations",
    # home (not: order, order_status)
    "what_song", "play_music", "todo_list_update", "reminder", "reminder_update", "calendar_update",
    "update_playlist", "shopping_list", "calendar", "next_song", "todo_list", "shopping_list_update", "smart_home",
    # auto_and_commute
    "current_location", "oil_change_when", "oil_change_how", "uber", "traffic", "tire_pressure",
    "schedule_maintenance", "gas", "mpg", "distance", "directions", "last_maintenance", "gas_type", "tire_change",
    "jump_start",
    # utility
    "weather", "alarm", "date", "find_phone", "share_location", "timer", "make_call", "calculator", "definition",
    "measurement_conversion", "flip_coin", "spelling", "time", "roll_dice", "text",
    # work (only the calendar-like ones; not pto, payroll, insurance, taxes, w2, 401k, direct deposit)
    "next_holiday", "meeting_schedule", "schedule_meeting",
    # small_talk
    "who_made_you", "meaning_of_life", "who_do_you_work_for", "do_you_have_pets", "what_are_your_hobbies",
    "fun_fact", "what_is_your_name", "where_are_you_from", "goodbye", "thank_you", "greeting", "tell_joke",
    "are_you_a_bot", "how_old_are_you", "what_can_i_ask_you",
    # meta
    "change_speed", "user_name", "whisper_mode", "yes", "change_volume", "no", "change_language", "repeat",
    "change_accent", "cancel", "sync_device", "change_user_name", "change_ai_name", "reset_settings", "maybe",
})


def _clinc_items(files: Files) -> Iterator[tuple[str, str]]:
    for data in files.values():
        for split in json.loads(data).values():
            yield from split


def parse_clinc_in_scope(files: Files) -> Iterator[Record]:
    """CLINC150 in-scope queries of the non-domain intents (travel, dining, home, commute, utility, small talk,
    meta), crowd-written assistant requests."""
    for text, intent in _clinc_items(files):
        if intent in CLINC_KEEP and not _in_domain(text):
            yield Record(text)


def parse_clinc_oos(files: Files) -> Iterator[Record]:
    """CLINC150 out-of-scope queries: crowd-written requests that fit none of its 150 intents."""
    for text, intent in _clinc_items(files):
        if intent == "oos" and not _in_domain(text):
            yield Record(text)


# --- xliuhw/NLU-Evaluation-Data (HWU64) -----------------------------------------------------------------------

_HWU_DIR = "CrossValidation/autoGeneFromRealAnno/autoGene_2018_03_22-13_01_25_169/CrossValidation/KFold_1"
_HWU_INTENTS = (
    "alarm_query", "alarm_remove", "alarm_set", "audio_volume_down", "audio_volume_mute", "audio_volume_up",
    "calendar_query", "calendar_remove", "calendar_set", "cooking_recipe", "datetime_convert", "datetime_query",
    "general_affirm", "general_commandstop", "general_confirm", "general_dontcare", "general_explain",
    "general_joke", "general_negate", "general_praise", "general_quirky", "general_repeat", "iot_cleaning",
    "iot_coffee", "iot_hue_lightchange", "iot_hue_lightdim", "iot_hue_lightoff", "iot_hue_lighton",
    "iot_hue_lightup", "iot_wemo_off", "iot_wemo_on", "lists_createoradd", "lists_query", "lists_remove",
    "music_likeness", "music_query", "music_settings", "news_query", "play_audiobook", "play_game", "play_music",
    "play_podcasts", "play_radio", "qa_definition", "qa_factoid", "qa_maths", "recommendation_events",
    "recommendation_locations", "recommendation_movies", "social_query", "takeaway_order", "transport_query",
    "transport_taxi", "transport_ticket", "transport_traffic", "weather_query",
)
"""All 64 intents except email_* (mail client), qa_stock and qa_currency (money), social_post (mostly
complaints to companies) and takeaway_query (where is my order)."""
HWU_PATHS = tuple(f"{_HWU_DIR}/{part}/{intent}.csv" for part in ("trainset", "testset/csv")
                  for intent in _HWU_INTENTS)


def parse_hwu(files: Files) -> Iterator[Record]:
    """HWU64 home-assistant utterances; KFold_1 train + test = the whole annotated set. Takes
    `answer_from_user` (the worker's own casing and punctuation), minus stray angle brackets."""
    for data in files.values():
        for row in csv_rows(data, delimiter=";"):
            text = (row.get("answer_from_user") or "").strip().strip("<>").replace("<", "").replace(">", "")
            if text and not _in_domain(text):
                yield Record(text)


# --- sonos/nlu-benchmark (Snips 2017) -------------------------------------------------------------------------

_SNIPS_INTENTS = ("AddToPlaylist", "BookRestaurant", "GetWeather", "PlayMusic", "RateBook",
                  "SearchCreativeWork", "SearchScreeningEvent")
SNIPS_PATHS = tuple(f"2017-06-custom-intent-engines/{i}/train_{i}_full.json" for i in _SNIPS_INTENTS)


def parse_snips(files: Files) -> Iterator[Record]:
    """Snips voice-assistant queries (music, weather, restaurants, books, films); the text is the
    concatenation of the annotated chunks."""
    for data in files.values():
        for items in json.loads(data.decode("utf-8", errors="replace")).values():
            for item in items:
                text = "".join(chunk["text"] for chunk in item["data"]).strip()
                if text and not _in_domain(text):
                    yield Record(text)


# --- yizhongw/self-instruct (human-written seed tasks) ---------------------------------------------------------

def parse_self_instruct_seed(files: Files) -> Iterator[Record]:
    """The 175 human-written seed tasks of Self-Instruct: the instruction, followed by its first instance's
    input when there is one (writing, coding, maths, reasoning, trivia requests)."""
    for data in files.values():
        for task in json_lines(data):
            instruction = task["instruction"].strip()
            instances = task.get("instances") or [{}]
            inp = (instances[0].get("input") or "").strip()
            text = f"{instruction}\n\n{inp}" if inp else instruction
            if not _in_domain(text):
                yield Record(text)


# --- dev: google-research-datasets/dstc8-schema-guided-dialogue -----------------------------------------------

SGD_PATHS = tuple(f"test/dialogues_{n:03d}.json" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14))
_SGD_DROP = ("Banks", "Payment", "Services_2", "Services_3", "Services_4")
"""Bank and payment services (support/finance), dentist, doctor and therapist search (medical)."""


def parse_sgd_first_turns(files: Files) -> Iterator[Record]:
    """Schema-Guided Dialogue (test split): the user's first turn of every dialogue whose services are all
    outside our domains (restaurants, flights, hotels, buses, trains, events, films, music, weather, alarms,
    ride-sharing, rental cars, homes, salons)."""
    for data in files.values():
        for dialogue in json.loads(data):
            if any(s.startswith(_SGD_DROP) for s in dialogue["services"]):
                continue
            turn = dialogue["turns"][0]
            if turn["speaker"] == "USER" and not _in_domain(turn["utterance"]):
                yield Record(turn["utterance"])


# --- dev: sebischair/NLU-Evaluation-Corpora -----------------------------------------------------------------

_SEBIS_KEEP = {
    "AskUbuntuCorpus.json": {"Software Recommendation", "Make Update", "Shutdown Computer", "Setup Printer",
                             "None"},
    "ChatbotCorpus.json": {"FindConnection", "DepartureTime"},
    "WebApplicationsCorpus.json": {"Find Alternative", "Export Data", "Download Video"},
}
"""Web-application intents about one's own account (delete account, change password, sync accounts, spam
filtering) are support-like and left out."""


def parse_sebis(files: Files) -> Iterator[Record]:
    """Braun et al. 2017 corpora: Ask Ubuntu and Web Apps Stack Exchange question titles, and questions sent by
    real users to a Munich public-transport Telegram bot."""
    for path, data in files.items():
        for sentence in json.loads(data)["sentences"]:
            text = sentence["text"].strip()
            if sentence["intent"] in _SEBIS_KEEP[path] and not _in_domain(text):
                yield Record(text)


# --- the sources ----------------------------------------------------------------------------------------------

SOURCES: list[Source] = [
    Source(
        name="clinc-general", repo="clinc/oos-eval", commit="828f8093932c8fe6ca7936c3d2e52903b1c523de",
        license="CC-BY-3.0", domain="general", role="train", kind="queries",
        paths=("data/data_full.json",), parse=parse_clinc_in_scope, limit=700,
        note="CLINC150 in-scope queries of 96 non-domain intents (travel, dining, home, commute, utility, work "
             "calendar, small talk, meta); keyword screen against health/money/legal/support words; sampled.",
    ),
    Source(
        name="clinc-general-oos", repo="clinc/oos-eval", commit="828f8093932c8fe6ca7936c3d2e52903b1c523de",
        license="CC-BY-3.0", domain="general", role="train", kind="queries",
        paths=("data/data_full.json", "data/data_oos_plus.json"), parse=parse_clinc_oos, limit=700,
        note="CLINC150 out-of-scope queries (all splits, plus the oos_plus extra training set), keyword-screened.",
    ),
    Source(
        name="hwu64-general", repo="xliuhw/NLU-Evaluation-Data", commit="f6071b496b17d71e6eb43f543af0707f4ff30557",
        license="CC-BY-4.0", domain="general", role="train", kind="queries",
        paths=HWU_PATHS, parse=parse_hwu, limit=700,
        note="HWU64 home-assistant utterances (KFold_1 train+test csv = whole set), original user wording; 56 of "
             "64 intents (no email, stock, currency, complaint posts, takeaway status); keyword-screened; sampled.",
    ),
    Source(
        name="snips-general", repo="sonos/nlu-benchmark", commit="b86ac7f1577868c42158d0dec77db50956046696",
        license="CC0-1.0", domain="general", role="train", kind="queries",
        paths=SNIPS_PATHS, parse=parse_snips, limit=300,
        note="Snips 2017 custom-intent benchmark, 7 intents (playlist, restaurant booking, weather, music, "
             "book rating, creative-work search, cinema showtimes); full training files; sampled.",
    ),
    Source(
        name="self-instruct-seed", repo="yizhongw/self-instruct", commit="0b26ccaa415992100fa32df62d41b994cf928e23",
        license="Apache-2.0", domain="general", role="train", kind="queries",
        paths=("data/seed_tasks.jsonl",), parse=parse_self_instruct_seed,
        note="The 175 human-written seed tasks (instruction + first instance input); keyword-screened. The "
             "GPT-3-generated tasks and the human_eval set (authors ask it not be trained on) are not used.",
    ),
    Source(
        name="sgd-general-dev", repo="google-research-datasets/dstc8-schema-guided-dialogue",
        commit="e852981ae34990f4358979625854259302feaa78",
        license="CC-BY-SA-4.0", domain="general", role="dev", kind="queries",
        paths=SGD_PATHS, parse=parse_sgd_first_turns, limit=400,
        note="Schema-Guided Dialogue test split: first user turn of each dialogue, without bank, payment, "
             "dentist, doctor and therapist services; keyword-screened; sampled.",
    ),
    Source(
        name="sebis-general-dev", repo="sebischair/NLU-Evaluation-Corpora",
        commit="9bac08b980f0f570c4166e2d7243c2971df50d8f",
        license="CC-BY-SA-3.0", domain="general", role="dev", kind="queries",
        paths=("AskUbuntuCorpus.json", "ChatbotCorpus.json", "WebApplicationsCorpus.json"), parse=parse_sebis,
        note="Braun et al. 2017: Ask Ubuntu / Web Apps question titles and Munich transport chatbot questions; "
             "account/password/spam intents left out; keyword-screened.",
    ),
]
