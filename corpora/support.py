"""support sources: real customer-service requests (to shops, apps, banks, insurers, airlines, telcos) and,
where any licensed text exists, agent replies.

Routing convention: `support` = a customer asking a company about THEIR account / order / service (orders,
delivery, returns, refunds, billing, passwords, app trouble, bank-account servicing such as lost cards, transfers,
disputes). Money advice (what to invest in, how to improve a credit score) is `finance`, not support; every parser
below drops the intents that are advice or knowledge questions rather than servicing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

from corpora.base import Files, Record, Source, csv_rows, json_lines

# --- clinc/oos-eval (CLINC150) ---------------------------------------------------------------------------------

CLINC_SUPPORT_INTENTS = frozenset({
    # banking (not interest_rate: rate knowledge, claimed by nobody as support)
    "transfer", "transactions", "balance", "freeze_account", "pay_bill", "bill_balance", "bill_due", "routing",
    "min_payment", "order_checks", "pin_change", "report_fraud", "account_blocked", "spending_history",
    # credit_cards (not credit_score / improve_credit_score: finance advice)
    "report_lost_card", "credit_limit", "rewards_balance", "new_card", "application_status", "card_declined",
    "international_fees", "apr", "redeem_rewards", "credit_limit_change", "damaged_card",
    "replacement_card_duration", "expiration_date",
    # servicing intents of other CLINC groups that the general helper left out as support
    "travel_notification", "order", "order_status", "lost_luggage",
})


def parse_clinc_support(files: Files) -> Iterator[Record]:
    """CLINC150 (crowd-written assistant requests): the bank-account and card servicing intents, plus shop-order
    status and lost luggage; all splits of data_full.json."""
    for data in files.values():
        for split in json.loads(data).values():
            for text, intent in split:
                if intent in CLINC_SUPPORT_INTENTS:
                    yield Record(text)


# --- awslabs/multi-domain-goal-oriented-dialogues-dataset (MultiDoGO) -----------------------------------------

MULTIDOGO_DIR = "data/paper_splits/splits_annotated_at_turn_level"
MULTIDOGO_DOMAINS = ("airline", "finance", "insurance", "media", "software")
"""Not `fastfood`: its turns are menu orders ("2 pizzas and 1 salad"), food ordering rather than servicing."""
MULTIDOGO_PATHS = tuple(f"{MULTIDOGO_DIR}/{d}/{s}.tsv" for d in MULTIDOGO_DOMAINS for s in ("train", "dev", "test"))
MULTIDOGO_NOT_TASK = frozenset({
    "contentonly", "confirmation", "rejection", "thankyou", "openinggreeting", "closinggreeting", "outofdomain",
    "", "intent",
    # booking a new flight is travel (the router's `general`), not servicing an existing booking
    "bookflight",
})


def parse_multidogo(files: Files) -> Iterator[Record]:
    """MultiDoGO customer turns (human-human customer-service chats with crowd customers): only turns
    annotated with a task intent (change seat, boarding pass, lost card, dispute charge, claim status, proof of
    insurance, start/upgrade TV service, software problems), not greetings, names, numbers, yes/no or thanks."""
    for data in files.values():
        text = data.decode("utf-8", errors="replace")
        for line in text.splitlines()[1:]:
            cols = line.split("\t")
            if len(cols) < 6:
                continue
            utterance, intents = cols[3], set(cols[-1].split("<div>"))
            if intents - MULTIDOGO_NOT_TASK and len(utterance.split()) >= 4:
                yield Record(utterance)


# --- RasaHQ/STAR ---------------------------------------------------------------------------------------------

STAR_IDS = tuple("""
    7 35 39 44 66 68 70 160 166 205 216 246 247 262 266 288 289 317 321 434 443 487 495 510 512 517 521 535 537 539
    544 579 591 599 601 607 609 614 618 642 646 648 649 664 677 680 681 688 704 713 718 719 725 732 736 741 747 749
    752 756 757 759 765 771 776 784 801 802 806 808 813 815 821 825 828 851 864 885 890 901 913 923 938 943 948 981
    982 986 991 999 1000 1004 1011 1019 1023 1034 1035 1036 1041 1044 1045 1060 1064 1069 1076 1086 1087 1107 1110
    1111 1129 1133 1156 1161 1172 1176 1179 1185 1187 1190 1199 1214 1215 1216 1220 1224 1235 1246 1259 1261 1262
    1266 1268 1275 1276 1285 1291 1293 1298 1309 1311 1312 1320 1331 1333 1336 1341 1342 1347 1356 1363 1384 1388
    1390 1394 1397 1410 1420 1429 1430 1435 1447 1452 1470 1482 1487 1488 1492 1494 1497 1500 1503 1511 1522 1523
    1529 1537 1766 1772 1773 1777 1785 1787 1801 1804 1805 1814 1825 1828 1830 1832 1833 1834 1840 1852 1862 1876
    1897 1898 1900 1903 1912 1914 1918 1931 1932 1950 1971 1980 1984 2000 2004 2006 2014 2017 2021 2023 2028 2030
    2035 2041 2053 2055 2062 2076 2091 2097 2098 2100 2102 2112 2118 2126 2129 2130 2134 2135 2137 2142 2147 2155
    2170 2173 2175 2178 2183 2186 2187 2189 2196 2201 2202 2209 2211 2214 2227 2229 2234 2245 2247 2249 2256 2264
    2270 2276 2291 2294 2296 2306 2308 2313 2318 2321 2325 2333 2343 2360 2372 2385 2387 2420 2437 2439 2444 2445
    2449 2458 2460 2461 2467 2474 2480 2489 2491 2505 2509 2513 2530 2531 2532 2537 2548 2556 2572 2574 2577 2583
    2585 2594 2597 2600 2601 2603 2605 2610 2613 2614 2616 2617 2626 2631 2634 2635 2641 2645 2647 2655 2669 2680
    2683 2693 2702 2704 2709 2710 2713 2717 2730 2731 2734 2754 2759 2767 2772 2792 2807 2810 2823 2824 2831 2837
    2841 2843 2849 2868 2881 2884 2901 2907 2908 2920 2921 2946 2953 2954 2959 2974 2976 2986 2987 2989 2995 3008
    3026 3035 3037 3052 3054 3061 3069 3072 3079 3081 3083 3089 3093 3104 3105 3106 3117 3128 3131 3143 3150 3154
    3160 3168 3179 3186 3196 3204 3212 3213 3215 3230 3231 3232 3239 3240 3243 3245 3255 3259 3265 3273 3275 3277
    3278 3279 3289 3293 3295 3296 3307 3315 3325 3328 3335 3337 3346 3351 3352 3360 3367 3377 3380 3397 3400 3411
    3414 3416 3426 3428 3436 3439 3445 3450 3451 3452 3467 3470 3471 3472 3475 3486 3489 3492 3503 3524 3525 3531
    3538 3540 3548 3556 3557 3574 3575 3579 3586 3597 3601 3608 3611 3612 3625 3634 3644 3653 3656 3659 3667 3673
    3683 3684 3691 3693 3695 3708 3712 3717 3723 3727 3748 3749 3759 3763 3764 3765 3775 3790 3792 3796 3804 3810
    3811 3829 3834 3835 3843 3846 3852 3863 3871 3882 3883 3884 3905 3921 3923 3930 3938 3943 3946 3950 3961 3966
    3972 3980 3984 3996 3997 4007 4016 4018 4021 4035 4043 4049 4052 4059 4061 4068 4074 4077 4095 4097 4098 4105
    4108 4109 4110 4114 4125 4128 4149 4163 4164 4184 4186 4189 4199 4200 4201 4203 4216 4218 4219 4222 4232 4240
    4244 4248 4249 4257 4268 4273 4288 4295 4310 4313 4324 4331 4337 4344 4347 4355 4360 4368 4383 4393 4400 4401
    4402 4411 4412 4418 4419 4420 4433 4434 4444 4448 4450 4458 4464 4467 4479 4489 4500 4503 4510 4512 4520 4522
    4529 4535 4538 4545 4550 4554 4555 4560 4562 4563 4573 4574 4575 4585 4586 4588 4598 4600 4607 4609 4619 4634
    4640 4641 4657 4658 4665 4670 4679 4684 4690 4695 4698 4713 4714 4728 4733 4745 4750 4755 4761 4768 4772 4783
    4788 4801 4806 4818 4824 4831 4832 4844 4861 4873
""".split())  # noqa: SIM905 (669 ids; a list literal would take 669 lines)
"""Dialogues whose only task is a servicing one: bank_fraud_report, bank_balance, ride_change, ride_status,
hotel_service_request (selected from the Scenario.WizardCapabilities of every dialogue at this commit)."""
STAR_PATHS = tuple(f"dialogues/{i}.json" for i in STAR_IDS)
_GREETING = re.compile(r"^(hi|hello|hey|good (morning|afternoon|evening))\W*$", re.I)


def parse_star(files: Files) -> Iterator[Record]:
    """STAR (Wizard-of-Oz, crowd users): the user's first substantive message of each bank / ride-service /
    hotel-room-service dialogue (the request itself, not a bare greeting); the wizard's replies are scripted
    templates and are not used."""
    for data in files.values():
        dialogue = json.loads(data)
        for event in dialogue.get("Events", []):
            if event.get("Agent") == "User" and event.get("Action") == "utter":
                text = (event.get("Text") or "").strip()
                if _GREETING.match(text) or len(text.split()) < 4:
                    continue
                yield Record(text)
                break


# --- hellohaptik/HINT3 -----------------------------------------------------------------------------------------

HINT3_PATHS = tuple(
    f"dataset/v2/{split}/{bot}_{split}.csv"
    for bot in ("curekart", "powerplay11", "sofmattress") for split in ("train", "test")
)
HINT3_DROP = frozenset({
    # noise / chit-chat / not a request to the company
    "NO_NODES_DETECTED", "GREETINGS_DAY", "THANKS", "APPRECIATION", "CAPABILITIES", "PRESENCE", "START_OVER",
    "label",
    # curekart (health-supplement shop): health / product-advice intents are medical or general, not support
    "RECOMMEND_PRODUCT", "CONSULT_START", "USER_GOAL_FORM", "SIDE_EFFECT", "IMMUNITY", "IMMUNITYsentence",
    "WORK_FROM_HOME", "FRANCHISE", "ORIGINAL_PRODUCT",
    # sofmattress pre-sales product-feature questions (product knowledge, not an account/order request)
    "COMPARISON", "ORTHO_FEATURES", "ERGO_FEATURES", "PRODUCT_VARIANTS", "PILLOWS", "ABOUT_SOF_MATTRESS",
    # powerplay11 game-rule questions
    "HOW_TO_PLAY", "WHAT_IF_THERES_A_TIE", "NEW_TEAM_PATTERN", "TYPES_CONTESTS", "HOW_POINTS_CALCULATED",
})


def parse_hint3(files: Files) -> Iterator[Record]:
    """HINT3: real user messages to three Indian company chatbots (Curekart e-shop, Powerplay11 fantasy-sports
    app, SOF Mattress shop): orders, delivery, refunds, wallet, withdrawals, verification, EMI, returns. Terse,
    often non-native English. Unlabelled noise and health/product-advice intents dropped."""
    for data in files.values():
        for row in csv_rows(data):
            if (row.get("label") or "").strip() not in HINT3_DROP:
                yield Record(row.get("sentence") or "")


# --- amazon-science/dstc11-track2-intent-induction (NatCS subset) -- dev ------------------------------------

DSTC11_PATHS = (
    "dstc11/development/test-utterances.jsonl",  # insurance
    "dstc11/test-banking/test-utterances.jsonl",
    "dstc11/test-finance/test-utterances.jsonl",
)
DSTC11_DROP = frozenset({
    # knowledge / market / advice questions are finance, not account servicing
    "AskConsumerPriceIndex", "GetTreasuryBondYield", "GetDebtIncomeRatio", "AskLiquidityRatio", "NetIncome",
    "GetStockQuote", "GetExchangeRate", "GetLoanInfo", "GetCreditCardInfo", "PurchaseStocks", "GetInvestmentReport",
})


def parse_dstc11(files: Files) -> Iterator[Record]:
    """DSTC11 track 2 (NatCS): the customer's intent-bearing turn from spoken-style customer-service calls to an
    insurer and banks (file a claim, proof of insurance, dispute a charge, lost card, transfers, close account,
    statements, autopay); advice/market-knowledge intents dropped."""
    for data in files.values():
        for row in json_lines(data):
            if row.get("intent") not in DSTC11_DROP:
                yield Record(row.get("utterance") or "")


SOURCES: list[Source] = [
    Source(
        name="clinc-support", repo="clinc/oos-eval", commit="828f8093932c8fe6ca7936c3d2e52903b1c523de",
        license="CC-BY-3.0", domain="support", role="train", kind="queries",
        paths=("data/data_full.json",), parse=parse_clinc_support, limit=600,
        note="CLINC150 banking and credit-card servicing intents (no credit-score / interest-rate advice) plus "
             "order, order_status, lost_luggage, travel_notification; all splits; sampled.",
    ),
    Source(
        name="multidogo-support", repo="awslabs/multi-domain-goal-oriented-dialogues-dataset",
        commit="baa30639c4b271f394b81443c842193407cdf26d",
        license="CDLA-Permissive-1.0", domain="support", role="train", kind="queries",
        paths=MULTIDOGO_PATHS, parse=parse_multidogo, limit=700,
        note="MultiDoGO customer turns with a task intent (turn-level paper splits, all splits = the whole "
             "annotated set; airline, finance, insurance, media, software); greetings, slot answers, yes/no, "
             "thanks, flight booking and the fast-food vertical dropped.",
    ),
    Source(
        name="star-support", repo="RasaHQ/STAR", commit="3058975092cdd09798e4a3a9e4ae135755824545",
        license="MIT", domain="support", role="train", kind="queries",
        paths=STAR_PATHS, parse=parse_star,
        note="STAR: first substantive user message of the 669 single-task bank-fraud, bank-balance, ride-change, "
             "ride-status and hotel-service-request dialogues.",
    ),
    Source(
        name="hint3-support", repo="hellohaptik/HINT3", commit="99965c892ea9a6801a87083d3861b0b04c91a4e7",
        license="ODbL-1.0", domain="support", role="train", kind="queries",
        paths=HINT3_PATHS, parse=parse_hint3, limit=600,
        note="HINT3 v2 train+test: real user messages to 3 company bots (e-shop, fantasy-sports app, mattress "
             "shop); unlabelled noise, chit-chat, health/product-advice, product-feature and game-rule intents "
             "dropped; sampled.",
    ),
    Source(
        name="dstc11-support", repo="amazon-science/dstc11-track2-intent-induction",
        commit="969b95a0d7365fbc6cd0e05989f1be6b44e6680c",
        license="CDLA-Permissive-2.0", domain="support", role="dev", kind="queries",
        paths=DSTC11_PATHS, parse=parse_dstc11, limit=600,
        note="DSTC11 track 2 (NatCS) labelled customer turns, insurance + banking + finance call centres; "
             "market/advice intents dropped; sampled. Dev only.",
    ),
]
