"""Synthetic feedback events for a dealer network: all five DOMAIN.md event types.

Pure and deterministic: the same arguments (and seed) give byte-identical
output, and nothing here touches Kafka. The events are the exact JSON-ready
dicts the producer sends, ordered by ``occurred_at``.

Every service visit has a customer *mood* (drawn for every visit, surveyed
or not); the survey, the follow-up calls and any complaint of that visit all
follow the same mood, so they agree with each other.

The rating model, on a latent 1-10 scale before rounding to the survey's own
scale, is built so that the downstream indices have something real to find:

* a network mean, plus a dealer quality effect (most dealers near the mean,
  some strong, a few weak) and a dealer-by-factor effect;
* a customer temperament (generous or harsh raters, stable across visits,
  derived from the customer hash) and the visit's mood, so one response's
  ratings move together;
* a response-by-factor effect, so e.g. the ``service_quality`` attributes of
  one response move together, plus per-attribute noise;
* visit facts feeding the ratings: late delivery lowers ``on_time`` and
  ``promises_kept``, a comeback lowers ``service_quality``, an invoice well
  above the estimate lowers ``value_for_money``;
* ``overall`` follows the weighted factors (so key-driver analysis recovers
  the factor weights roughly), ``recommend`` and ``return_intent`` follow
  ``overall``.

The other event types:

* ``call``: about ``call_share`` of visits get a follow-up call 1-4 days after
  delivery (most within 3); a missed call may be retried. Reached customers
  report an issue more often the worse their visit went, and about 30% of
  reached calls carry a short rating set (``overall`` plus 2-4 attributes, 1-10).
* ``complaint``: one event per state change (opened, responded, resolved,
  closed, sometimes reopened and resolved/closed again). About a quarter of
  unhappy visits (low mood, a comeback, a late car, an overrun invoice) turn
  into a complaint, plus a small base rate and a few sales complaints. Weak
  dealers get more complaints and answer and resolve them more slowly.
* ``mystery_shop``: one audit per dealer and calendar month, on a weekday, on
  a fixed weighted checklist per scenario; the pass rate follows the dealer's
  quality.

A :class:`Drop` subtracts ``size / 100`` from the latent 1-10 score of every
attribute, ``overall``, ``perception``, ``return_intent`` and (on its 0-10
scale) ``recommend`` of the dealer's surveys and call ratings dated on or after
``start``, before rounding and clipping. Only clipping at the top and bottom of
the scale makes the realised fall a little smaller than ``size``. The same
shift makes the dealer's customers report issues and complain more (visits
delivered on or after ``start``) and its audits fail more items.

Every random draw comes from per-dealer streams seeded by (seed, dealer_id):
one for visits and surveys, one each for calls, complaints and audits, so
switching an event type off leaves the others unchanged. No draw of the visit,
survey, call or audit streams is conditional on a latent score. Hence a
dealer's events do not depend on how many other dealers are simulated, and a
run with a drop differs from the same run without it only in that dealer's
survey, call and audit scores, comments and flags, and in its complaints.

The simulated network runs on the UTC wall clock (opening hours are UTC), so
day buckets line up with the pipeline's UTC days.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import math
import os
import random
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from statistics import NormalDist
from typing import IO, Any, TypeVar, cast

import orjson

from pipeline.catalogue import load_catalogue
from pipeline.registry import Dealer

SCHEMA_VERSION = 1

_T = TypeVar("_T")

# The questionnaire the pipeline scores (pipeline.catalogue, one place):
# factor -> its attribute codes, and the factor weights.
_CATALOGUE = load_catalogue()
SERVICE_FACTORS: dict[str, tuple[str, ...]] = {
    factor: tuple(c for c, f in _CATALOGUE.attribute_factor.items() if f == factor)
    for factor in _CATALOGUE.factors
}
FACTOR_WEIGHTS: dict[str, float] = dict(_CATALOGUE.factor_weights)
# Sales surveys rate the sales experience; these codes are outside the
# after-sales catalogue on purpose (DOMAIN.md: stored, counted toward no
# factor), while their overall/recommend feed NPS and the loyalty matrix.
SALES_ATTRIBUTES: tuple[str, ...] = (
    "salesperson_courtesy",
    "salesperson_knowledge",
    "test_drive",
    "price_negotiation",
    "paperwork_ease",
    "delivery_explained",
    "vehicle_condition",
)

# Where the network sits on the latent 1-10 scale: about CSI 840 and NPS 40-50,
# typical of after-sales service, while leaving most scores below the ceiling
# so that a drop shows almost in full.
_NETWORK_MEAN = 8.4
# Some attributes are harder to satisfy than others (price, amenities).
_ATTRIBUTE_OFFSET: dict[str, float] = {
    "booking_ease": 0.2,
    "appointment_time": 0.0,
    "greeted_promptly": 0.1,
    "advisor_courtesy": 0.35,
    "advisor_honesty": 0.1,
    "advisor_knowledge": 0.1,
    "promises_kept": -0.1,
    "listened": 0.15,
    "work_explained": -0.15,
    "waiting_clean": 0.1,
    "waiting_comfort": -0.2,
    "amenities": -0.4,
    "location_hours": -0.1,
    "on_time": -0.05,
    "charges_explained": -0.1,
    "vehicle_clean": -0.25,
    "easy_payment": 0.35,
    "diagnosis_correct": 0.05,
    "fixed_first_time": 0.0,
    "work_quality": 0.05,
    "value_for_money": -0.7,
    "salesperson_courtesy": 0.3,
    "salesperson_knowledge": 0.1,
    "test_drive": 0.2,
    "price_negotiation": -0.6,
    "paperwork_ease": -0.2,
    "delivery_explained": 0.0,
    "vehicle_condition": 0.25,
}
_ATTRIBUTE_FACTOR: dict[str, str] = {
    code: factor for factor, codes in SERVICE_FACTORS.items() for code in codes
}
_WEIGHT_TOTAL = sum(FACTOR_WEIGHTS.values())

# Relative visit volume by weekday (Mon..Sun), normalised to a weekly mean of 1
# so that visits_per_dealer_day stays the long-run average.
_WEEKDAY_RAW = (1.1, 1.05, 1.05, 1.05, 1.1, 0.85, 0.4)
_WEEKDAY_FACTOR = tuple(w * 7 / sum(_WEEKDAY_RAW) for w in _WEEKDAY_RAW)

# Survey channels: (channel, cumulative probability, scale max, source).
# SMS questionnaires are short, hence their 1-5 scale (about 20% of surveys).
_CHANNELS: tuple[tuple[str, float, int, str], ...] = (
    ("web", 0.30, 10, "survey_vendor"),
    ("sms", 0.50, 5, "survey_vendor"),
    ("email", 0.65, 10, "survey_vendor"),
    ("app", 0.80, 10, "web"),
    ("phone", 1.00, 10, "call_centre"),
)

_POSITIVE_COMMENTS: tuple[str, ...] = (
    "Quick and friendly service, car was ready on time.",
    "Advisor explained everything clearly.",
    "Very happy with the repair, thank you.",
    "Clean waiting area and good coffee.",
    "Great experience as always.",
    "服务很周到,车辆按时交付。",
    "服务顾问很专业,解释得很清楚。",
    "维修质量很好,非常满意。",
    "接待热情,休息区干净舒适。",
)
_NEUTRAL_COMMENTS: tuple[str, ...] = (
    "OK overall, but the wait was a bit long.",
    "Fine, though the price was higher than I expected.",
    "Service was alright, booking could be easier.",
    "总体还可以,等待时间有点长。",
    "价格偏高,其他还行。",
    "还行,希望预约更方便一些。",
)
_NEGATIVE_COMMENTS: tuple[str, ...] = (
    "Car was not ready when promised.",
    "Same problem came back after the repair.",
    "Charged more than the estimate without asking.",
    "Nobody greeted me for a long time.",
    "Car was returned dirty.",
    "交车时间一再拖延,很不满意。",
    "问题没有修好,又要回厂。",
    "收费比报价高,没有事先说明。",
    "等了很久都没人接待。",
)

_TEMPERAMENT = NormalDist(0.0, 0.45)
_OPEN = time(7, 30)
_DAY = timedelta(days=1)
_COMEBACK_WINDOW = timedelta(days=30)
_HOUR = timedelta(hours=1)

# --- follow-up calls -------------------------------------------------------------

# (outcome, cumulative probability) of one call attempt.
_CALL_OUTCOMES: tuple[tuple[str, float], ...] = (
    ("reached", 0.65),
    ("no_answer", 0.85),
    ("callback_requested", 0.92),
    ("refused", 0.97),
    ("wrong_number", 1.00),
)
# Days from delivery to the first attempt: 1-4, most within 3.
_CALL_LAG_DAYS: tuple[tuple[int, float], ...] = ((1, 0.45), (2, 0.75), (3, 0.90), (4, 1.00))
_CALL_ATTEMPTS = 3
_CALL_RATED_SHARE = 0.3
# What the call centre's short CSS interview asks about (catalogue codes, so
# the answers count toward their factors like a survey's).
_CALL_ATTRIBUTES: tuple[str, ...] = (
    "advisor_courtesy",
    "work_explained",
    "promises_kept",
    "on_time",
    "charges_explained",
    "vehicle_clean",
    "work_quality",
    "fixed_first_time",
)
_CALL_ISSUE_NOTES: tuple[str, ...] = (
    "Customer says the noise is still there after the repair.",
    "Customer unhappy about the waiting time; wants a call from the manager.",
    "Customer was charged more than the estimate.",
    "Warning light came back on the next day.",
    "客户反映故障没有排除。",
    "客户对收费有异议,要求解释。",
    "客户抱怨交车延误。",
)
_CALL_POSITIVE_NOTES: tuple[str, ...] = (
    "Customer satisfied, no issues.",
    "Customer thanked the advisor.",
    "客户表示满意。",
    "客户对维修质量满意。",
)
_CALLBACK_NOTES: tuple[str, ...] = (
    "Customer asked to be called back in the evening.",
    "Customer driving, asked for a call later.",
    "客户要求稍后回电。",
)

# --- complaints ------------------------------------------------------------------

_SERVICE_CATEGORY_WEIGHTS: dict[str, float] = {
    "waiting_time": 0.15,
    "price": 0.15,
    "repair_quality": 0.2,
    "attitude": 0.12,
    "promise_broken": 0.1,
    "parts": 0.1,
    "communication": 0.12,
    "other": 0.06,
}
_SALES_CATEGORY_WEIGHTS: dict[str, float] = {
    "price": 0.3,
    "attitude": 0.25,
    "promise_broken": 0.2,
    "communication": 0.15,
    "other": 0.1,
}
# Cumulative severity 1-4 shares before any boost.
_SEVERITY_CUMULATIVE = (0.35, 0.7, 0.9, 1.0)
# Days from delivery to the complaint: 0-3.
_COMPLAINT_LAG_DAYS: tuple[tuple[int, float], ...] = ((0, 0.4), (1, 0.7), (2, 0.88), (3, 1.0))
# Median hours to first response and days to resolution, by severity 1-4: urgent
# complaints are answered faster but take longer to resolve.
_RESPONSE_SEVERITY = (1.3, 1.0, 0.7, 0.45)
_RESOLVE_SEVERITY = (0.5, 1.0, 1.8, 3.0)
_UNHAPPY_BELOW = 6.5  # grievance (latent 1-10) under which a visit counts as unhappy
_UNHAPPY_COMPLAINT_SHARE = 0.25
_COMPLAINT_BASE_RATE = 0.004
_SALES_COMPLAINTS_PER_DEALER_DAY = 0.015
_COMPLAINT_NOTES: dict[str, tuple[str, ...]] = {
    "waiting_time": (
        "Waited over two hours past the promised time.",
        "等待时间太长,没人解释原因。",
    ),
    "price": ("Invoice much higher than the estimate.", "收费比报价高很多。"),
    "repair_quality": ("Same fault again a few days after the repair.", "修过的问题又出现了。"),
    "attitude": ("Advisor was rude and dismissive.", "服务顾问态度很差。"),
    "promise_broken": ("Car not ready on the day promised.", "承诺的交车时间没有兑现。"),
    "parts": ("Parts on back-order for weeks.", "配件迟迟不到货。"),
    "communication": ("Nobody called me back as promised.", "说好回电话,一直没人联系。"),
    "other": ("Scratch on the door after the visit.", "车辆交回时有划痕。"),
}
_RESOLUTION_NOTES: tuple[str, ...] = (
    "Repair redone free of charge.",
    "Partial refund agreed with the customer.",
    "Manager apologised; voucher for next service.",
    "已免费返修。",
    "已与客户协商退还部分费用。",
)
_REOPEN_NOTES: tuple[str, ...] = (
    "Customer says the problem is back.",
    "Customer not satisfied with the solution.",
    "客户表示问题仍未解决。",
)

# --- mystery shopping ------------------------------------------------------------

MYSTERY_SHOP_PASS_MARK = 80.0
# (scenario, department, cumulative probability)
_SCENARIOS: tuple[tuple[str, str, float], ...] = (
    ("service_visit", "service", 0.55),
    ("phone_inquiry", "service", 0.70),
    ("sales_visit", "sales", 0.85),
    ("online_inquiry", "sales", 0.93),
    ("vehicle_delivery", "sales", 1.00),
)
# scenario -> section -> item codes: a fixed checklist per scenario, as audit
# programmes keep their questionnaire stable so that scores compare.
_CHECKLISTS: dict[str, dict[str, tuple[str, ...]]] = {
    "service_visit": {
        "reception": (
            "greeted_within_2min",
            "advisor_introduced",
            "appointment_confirmed",
            "seat_covers_fitted",
            "walkaround_done",
        ),
        "needs_analysis": (
            "concern_recorded",
            "concern_repeated_back",
            "history_checked",
            "additional_needs_asked",
            "repair_order_signed",
        ),
        "explanation": (
            "work_explained",
            "estimate_given",
            "completion_time_promised",
            "price_breakdown_shown",
            "contact_method_agreed",
        ),
        "facility": (
            "waiting_area_clean",
            "refreshments_offered",
            "wifi_available",
            "restroom_clean",
            "signage_clear",
        ),
        "handover": (
            "vehicle_ready_on_time",
            "invoice_explained",
            "replaced_parts_shown",
            "vehicle_clean_on_return",
            "next_service_advised",
            "escorted_to_vehicle",
        ),
        "follow_up": ("followup_call_within_3d", "satisfaction_asked", "issue_resolution_offered"),
    },
    "phone_inquiry": {
        "phone_answer": (
            "answered_within_3_rings",
            "dealer_name_stated",
            "agent_name_stated",
            "friendly_tone",
            "no_long_hold",
        ),
        "needs_analysis": (
            "vehicle_model_asked",
            "mileage_asked",
            "concern_understood",
            "caller_name_asked",
            "callback_agreed",
        ),
        "explanation": (
            "price_indication_given",
            "duration_indicated",
            "service_package_offered",
            "warranty_checked",
        ),
        "appointment": (
            "appointment_offered",
            "slot_within_3d",
            "alternative_slot_offered",
            "confirmation_sent",
            "reminder_offered",
        ),
        "closing": ("summary_given", "thanks_given", "further_questions_asked"),
    },
    "sales_visit": {
        "reception": (
            "greeted_within_2min",
            "consultant_introduced",
            "drink_offered",
            "showroom_clean",
            "business_card_given",
        ),
        "needs_analysis": (
            "usage_asked",
            "budget_asked",
            "current_vehicle_asked",
            "family_needs_asked",
            "preferences_summarised",
        ),
        "product_presentation": (
            "six_point_walkaround",
            "features_linked_to_needs",
            "competitor_comparison_fair",
            "brochure_given",
            "questions_answered",
        ),
        "test_drive": (
            "test_drive_offered",
            "licence_checked",
            "route_explained",
            "features_demonstrated_on_drive",
        ),
        "offer": (
            "written_offer_given",
            "financing_explained",
            "trade_in_valued",
            "no_pressure_tactics",
            "delivery_time_stated",
        ),
        "follow_up": ("followup_within_48h", "contact_preference_respected", "event_invitation"),
    },
    "online_inquiry": {
        "response": (
            "replied_within_2h",
            "personalised_reply",
            "consultant_named",
            "correct_model_addressed",
        ),
        "needs_analysis": (
            "needs_questions_asked",
            "budget_asked",
            "timeline_asked",
            "contact_preference_asked",
        ),
        "explanation": (
            "question_answered",
            "specs_accurate",
            "availability_stated",
            "price_transparent",
        ),
        "offer": ("offer_attached", "financing_options", "test_drive_invited", "visit_invited"),
        "follow_up": ("followup_within_48h", "second_followup", "no_spam", "unsubscribe_option"),
    },
    "vehicle_delivery": {
        "preparation": (
            "delivery_date_kept",
            "vehicle_clean",
            "fuel_filled",
            "delivery_bay_prepared",
            "accessories_fitted",
        ),
        "reception": (
            "greeted_by_name",
            "consultant_present",
            "service_advisor_introduced",
            "refreshments_offered",
        ),
        "handover": (
            "walkaround_with_customer",
            "damage_check_done",
            "keys_handed_over",
            "personal_settings_done",
            "handover_photo",
        ),
        "paperwork": (
            "documents_complete",
            "invoice_matches_offer",
            "warranty_explained",
            "registration_done",
        ),
        "explanation": (
            "controls_explained",
            "phone_paired",
            "service_schedule_explained",
            "roadside_assistance_explained",
            "app_setup_helped",
        ),
        "follow_up": (
            "followup_call_within_3d",
            "first_service_reminder",
            "survey_announced",
        ),
    },
}
# Must-pass basics (legal, safety, money): weight 3 and passed more often.
_MANDATORY_ITEMS: frozenset[str] = frozenset(
    {
        "seat_covers_fitted",
        "repair_order_signed",
        "estimate_given",
        "invoice_explained",
        "answered_within_3_rings",
        "dealer_name_stated",
        "licence_checked",
        "written_offer_given",
        "no_pressure_tactics",
        "replied_within_2h",
        "price_transparent",
        "documents_complete",
        "damage_check_done",
        "warranty_explained",
    }
)
_AUDIT_NA_SHARE = 0.05
_AUDITORS = 12  # network-wide pool of mystery shoppers
_AUDIT_LOGIT = 1.9  # pass probability about 87% for an average dealer and item


@dataclass(frozen=True)
class _AuditItem:
    code: str
    section: str
    weight: float
    mandatory: bool
    difficulty: float  # added to the pass logit


def _stable_unit(text: str) -> float:
    """A fixed number in [0, 1) derived from ``text`` (not from any seed)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) / 16**12


def _checklist(scenario: str) -> tuple[_AuditItem, ...]:
    items: list[_AuditItem] = []
    for section, codes in _CHECKLISTS[scenario].items():
        for code in codes:
            mandatory = code in _MANDATORY_ITEMS
            u = _stable_unit(f"{scenario}:{code}")
            weight = 3.0 if mandatory else (2.0 if u < 0.35 else 1.0)
            difficulty = 0.8 if mandatory else (_stable_unit(f"difficulty:{code}") - 0.5) * 1.6
            items.append(_AuditItem(code, section, weight, mandatory, difficulty))
    if len({i.code for i in items}) != len(items) or not 20 <= len(items) <= 40:
        raise AssertionError(f"checklist {scenario}: codes must be unique, 20-40 items")
    return tuple(items)


_AUDIT_ITEMS: dict[str, tuple[_AuditItem, ...]] = {s: _checklist(s) for s, *_ in _SCENARIOS}

# --- the simulated registry --------------------------------------------------------

_REGIONS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    (
        "North",
        (("Beijing", "北京"), ("Tianjin", "天津"), ("Shenyang", "沈阳"), ("Jinan", "济南")),
    ),
    ("East", (("Shanghai", "上海"), ("Hangzhou", "杭州"), ("Nanjing", "南京"), ("Suzhou", "苏州"))),
    (
        "South",
        (("Guangzhou", "广州"), ("Shenzhen", "深圳"), ("Xiamen", "厦门"), ("Nanning", "南宁")),
    ),
    ("West", (("Chengdu", "成都"), ("Chongqing", "重庆"), ("Xi'an", "西安"), ("Kunming", "昆明"))),
    (
        "Central",
        (("Wuhan", "武汉"), ("Changsha", "长沙"), ("Zhengzhou", "郑州"), ("Hefei", "合肥")),
    ),
)
_BRANDS: tuple[tuple[str, str], ...] = (
    ("Aurora", "极光"),
    ("Meridian", "子午"),
    ("Kestrel", "红隼"),
    ("Solano", "索拉诺"),
    ("Vireo", "维瑞"),
)
_GROUPS: tuple[tuple[str, str], ...] = (
    ("Huaxin Auto Group", "华信"),
    ("Golden Road Motors", "金路"),
    ("Everbright Auto", "永辉"),
    ("Grand Union Motors", "大联"),
    ("Sunrise Auto Group", "旭日"),
    ("Orient Star Motors", "东星"),
    ("Harmony Motors", "和谐"),
    ("Blue Sky Auto", "蓝天"),
)
_INDEPENDENT = "Independent"
_NAME_SUFFIXES: tuple[str, ...] = ("Motors", "Auto Centre", "Service", "Cars")


@dataclass(frozen=True)
class Drop:
    """Lower ``dealer_id``'s survey scores from ``start`` on by ``size`` CSI points.

    ``size`` is on the 1000-point CSI scale: 50 lowers the dealer's mean latent
    rating on the 1-10 scale by 0.5 (before clipping to the scale). A negative
    size simulates an improvement. Several drops on one dealer add up.
    """

    dealer_id: str
    start: date
    size: float


def parse_drop(text: str) -> Drop:
    """Parse ``DEALER:YYYY-MM-DD:SIZE`` (e.g. ``D003:2024-05-01:80``) into a :class:`Drop`."""
    parts = text.strip().split(":")
    if len(parts) != 3:
        raise ValueError(f"drop {text!r}: expected DEALER:YYYY-MM-DD:SIZE, e.g. D003:2024-05-01:80")
    dealer_id, start_text, size_text = (p.strip() for p in parts)
    if not dealer_id or any(c.isspace() for c in dealer_id):
        raise ValueError(f"drop {text!r}: dealer id must be non-empty without spaces")
    try:
        start = date.fromisoformat(start_text)
    except ValueError:
        raise ValueError(f"drop {text!r}: start {start_text!r} is not a YYYY-MM-DD date") from None
    try:
        size = float(size_text)
    except ValueError:
        raise ValueError(f"drop {text!r}: size {size_text!r} is not a number") from None
    if not math.isfinite(size):
        raise ValueError(f"drop {text!r}: size must be finite")
    return Drop(dealer_id, start, size)


def dealer_ids(n: int) -> list[str]:
    """Dealer codes ``D001``, ``D002``, ...; zero-padded to at least 3 digits."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    width = max(3, len(str(n)))
    return [f"D{i:0{width}d}" for i in range(1, n + 1)]


def simulated_registry(n_dealers: int, seed: int = 0) -> list[Dealer]:
    """A plausible registry for the dealers :func:`simulate` emits (the same codes, in order).

    About 8 dealers per region (at least one region: North, East, South, West,
    Central, then North 2, ...), 2-3 brands with uneven shares, dealer groups of
    about 6 dealers that mostly stay in their home region plus about 10%
    independents, and Chinese or English names. Deterministic for
    (n_dealers, seed); it does not change the simulated events.
    """
    ids = dealer_ids(n_dealers)
    rng = random.Random(f"dealer-csi-registry:{seed}:{n_dealers}")
    n_regions = max(1, round(n_dealers / 8))
    regions = [
        _REGIONS[k % len(_REGIONS)][0] + ("" if k < len(_REGIONS) else f" {k // len(_REGIONS) + 1}")
        for k in range(n_regions)
    ]
    n_brands = 3 if rng.random() < 0.5 else 2
    first_brand = int(rng.random() * len(_BRANDS))
    brands = [_BRANDS[(first_brand + k) % len(_BRANDS)] for k in range(n_brands)]
    brand_cumulative = (0.5, 0.8, 1.0) if n_brands == 3 else (0.6, 1.0)
    n_groups = max(n_regions, round(n_dealers / 6))
    first_group = int(rng.random() * len(_GROUPS))
    groups: list[tuple[str, str, int]] = []  # (name, Chinese short name, home region)
    for k in range(n_groups):
        english, chinese = _GROUPS[(first_group + k) % len(_GROUPS)]
        generation = k // len(_GROUPS)
        suffix = "" if generation == 0 else f" {generation + 1}"
        groups.append((english + suffix, chinese, k % n_regions))
    slots = [k % n_regions for k in range(n_dealers)]  # balanced region sizes
    rng.shuffle(slots)

    dealers: list[Dealer] = []
    used: set[str] = set()
    for dealer_id, region in zip(ids, slots, strict=True):
        u_brand, u_group, u_home, u_city, u_style, u_suffix = (rng.random() for _ in range(6))
        brand_en, brand_zh = brands[next(i for i, c in enumerate(brand_cumulative) if u_brand < c)]
        home = [g for g in groups if g[2] == region]
        if u_group < 0.1:
            group, group_zh = _INDEPENDENT, ""
        else:
            group, group_zh, _ = _choose(u_home, home if u_group < 0.85 else groups)
        city_en, city_zh = _choose(u_city, _REGIONS[region % len(_REGIONS)][1])
        if u_style < 0.6:
            name = f"{city_zh}{group_zh}{brand_zh}" + ("4S店" if group_zh else "汽车服务中心")
        else:
            name = f"{brand_en} {city_en} {_choose(u_suffix, _NAME_SUFFIXES)}"
        unique, k = name, 2
        while unique in used:
            unique, k = f"{name} {k}", k + 1
        used.add(unique)
        dealers.append(Dealer(dealer_id, unique, regions[region], brand_en, group))
    return dealers


def simulate(
    n_dealers: int,
    days: int,
    *,
    end: date | None = None,
    seed: int = 0,
    drops: Sequence[Drop] = (),
    visits_per_dealer_day: float = 6.0,
    survey_share: float = 0.25,
    sales_surveys_per_dealer_day: float = 0.1,
    call_share: float = 0.7,
    complaints: bool = True,
    mystery_shops: bool = True,
) -> Iterator[dict[str, Any]]:
    """Events of every type for the ``days`` days ending on ``end`` (inclusive).

    ``end`` defaults to today (UTC); then events later than the current time
    are left out too, since a live feed cannot hold them yet. Events whose time
    would fall after the simulated range (surveys 1-3 days after delivery,
    repairs delivered the next day) are dropped. The stream is sorted by
    ``occurred_at`` and generated day by day, so memory stays flat however
    long the run. ``sales_surveys_per_dealer_day`` adds a few sales-department
    surveys (0 for none; complaints and audits have sales parts of their own).

    ``call_share`` is the share of visits that get a follow-up call (0: no
    calls), ``complaints`` and ``mystery_shops`` switch those event types off.
    Switching a type off leaves the other types' events unchanged. A complaint
    still open at the end of the range simply has no later state changes.
    """
    if n_dealers < 1:
        raise ValueError(f"n_dealers must be >= 1, got {n_dealers}")
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    for name, rate in (
        ("visits_per_dealer_day", visits_per_dealer_day),
        ("sales_surveys_per_dealer_day", sales_surveys_per_dealer_day),
    ):
        if not (math.isfinite(rate) and rate >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {rate}")
    for name, share in (("survey_share", survey_share), ("call_share", call_share)):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"{name} must be within [0, 1], got {share}")
    ids = dealer_ids(n_dealers)
    known = set(ids)
    unknown = sorted({d.dealer_id for d in drops} - known)
    if unknown:
        raise ValueError(
            f"drops name dealers outside the simulation ({ids[0]}..{ids[-1]}): {unknown}"
        )
    if end is None:
        now = datetime.now(UTC)
        end_day, cutoff = now.date(), now
    else:
        end_day, cutoff = end, None
    sim = _Simulation(
        ids,
        end_day - timedelta(days=days - 1),
        days,
        seed=seed,
        drops=drops,
        cutoff=cutoff,
        visits_per_dealer_day=visits_per_dealer_day,
        survey_share=survey_share,
        sales_per_dealer_day=sales_surveys_per_dealer_day,
        call_share=call_share,
        complaints=complaints,
        mystery_shops=mystery_shops,
    )
    return sim.run()


def write_jsonl(
    events: Iterable[dict[str, Any]], path_or_stream: str | os.PathLike[str] | IO[bytes] | IO[str]
) -> int:
    """Write one JSON object per line (the bytes the producer would send); return the count."""
    if isinstance(path_or_stream, str | os.PathLike):
        with open(path_or_stream, "wb") as fh:
            return _write_lines(events, fh)
    return _write_lines(events, path_or_stream)


def _write_lines(events: Iterable[dict[str, Any]], stream: IO[bytes] | IO[str]) -> int:
    count = 0
    if isinstance(stream, io.TextIOBase):
        text_stream = cast(IO[str], stream)
        for event in events:
            text_stream.write(orjson.dumps(event).decode() + "\n")
            count += 1
    else:
        byte_stream = cast(IO[bytes], stream)
        for event in events:
            byte_stream.write(orjson.dumps(event) + b"\n")
            count += 1
    return count


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _poisson(rng: random.Random, lam: float) -> int:
    # Knuth's method, in chunks of at most 25 so exp(-lam) never underflows;
    # a sum of Poisson variables is Poisson with the summed mean.
    total = 0
    while lam > 0:
        chunk = min(lam, 25.0)
        lam -= chunk
        limit, k, p = math.exp(-chunk), 0, rng.random()
        while p > limit:
            k += 1
            p *= rng.random()
        total += k
    return total


def _choose(u: float, options: Sequence[_T]) -> _T:
    """The option a uniform draw ``u`` in [0, 1) falls on.

    Draws are taken before it is known which list they pick from (unlike
    rng.choice, whose rejection sampling uses a length-dependent number of
    draws), so the stream stays aligned when the list depends on a score.
    """
    return options[min(int(u * len(options)), len(options) - 1)]


def _to_scale(latent10: float, high: int) -> int:
    """Latent 1-10 value -> integer point on a 1..high scale (round half up, clip)."""
    y = 1 + (high - 1) * (latent10 - 1) / 9
    return max(1, min(high, math.floor(y + 0.5)))


def _temperament(customer_ref: str) -> float:
    # Derived from the hash itself, so a returning customer keeps the same
    # rating style without the simulator remembering every customer.
    u = (int(customer_ref[:12], 16) + 0.5) / 16**12
    return _TEMPERAMENT.inv_cdf(u)


def _pick(u: float, table: Sequence[tuple[_T, float]]) -> _T:
    """The value of the first ``(value, cumulative probability)`` row that ``u`` lies below."""
    for value, cumulative in table:
        if u < cumulative:
            return value
    return table[-1][0]


def _weighted(u: float, weights: dict[str, float]) -> str:
    """The key a uniform draw ``u`` falls on when keys are chosen by their weights."""
    total = sum(weights.values())
    acc, key = 0.0, ""
    for key, weight in weights.items():
        acc += weight / total
        if u < acc:
            return key
    return key


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, x))))


def _office_hours(moment: datetime, u: float) -> datetime:
    """``moment`` moved forward into 08:00-20:00 (to within the first hour of the next opening)."""
    moment = moment.replace(microsecond=0)
    jitter = timedelta(seconds=int(u * 3600))
    if moment.time() < time(8):
        return datetime.combine(moment.date(), time(8), UTC) + jitter
    if moment.time() >= time(20):
        return datetime.combine(moment.date() + _DAY, time(8), UTC) + jitter
    return moment


def _month_end(day: date) -> date:
    first_of_next = (day.replace(day=28) + timedelta(days=4)).replace(day=1)
    return first_of_next - _DAY


@dataclass
class _Dealer:
    dealer_id: str
    rng: random.Random  # visits and surveys
    quality: float
    size: float
    factor_effect: dict[str, float]
    attribute_effect: dict[str, float]
    late_p: float
    comeback_p: float
    response_p: float
    appointment_p: float
    greet_mean_min: float
    drops: tuple[Drop, ...]
    call_rng: random.Random
    complaint_rng: random.Random
    audit_rng: random.Random
    call_p: float = 0.0
    complaint_base: float = 0.0  # complaint probability of a visit, however it went
    complaint_share: float = 0.0  # extra complaint probability of an unhappy visit
    response_median_h: float = 0.0  # median hours to a first response (severity 2)
    resolve_factor: float = 1.0  # multiplies the days to a resolution
    recovery_p: float = 0.7  # probability that a closed complaint leaves the customer satisfied
    audit_skill: float = 0.0  # added to the audit items' pass logit
    customers: int = 0
    # (delivered_at, visit_id, customer number) of visits that comebacks may repeat
    recent: deque[tuple[datetime, str, int]] = field(default_factory=deque)
    audit_day: date | None = None  # this month's mystery shop


@dataclass
class _VisitFacts:
    late: bool
    slow_greeting: bool
    comeback: bool
    overrun: bool

    def grievance(self) -> float:
        """How much these facts sour the visit, on the latent 1-10 scale."""
        return 1.5 * self.comeback + 0.6 * self.late + 0.8 * self.overrun + 0.4 * self.slow_greeting


@dataclass(frozen=True)
class _Visit:
    """What a visit's follow-ups (calls, a complaint) need to know about it."""

    visit_id: str
    delivered: datetime
    customer_ref: str
    facts: _VisitFacts
    mood: float


class _Simulation:
    def __init__(
        self,
        ids: list[str],
        start: date,
        days: int,
        *,
        seed: int,
        drops: Sequence[Drop],
        cutoff: datetime | None,
        visits_per_dealer_day: float,
        survey_share: float,
        sales_per_dealer_day: float,
        call_share: float,
        complaints: bool,
        mystery_shops: bool,
    ) -> None:
        self.seed = seed
        self.start = start
        self.days = days
        self.last_day = start + timedelta(days=days - 1)
        range_end = datetime.combine(start + timedelta(days=days), time(), UTC)
        self.limit = range_end if cutoff is None else min(range_end, cutoff)
        self.visits_per_day = visits_per_dealer_day
        self.survey_share = survey_share
        self.sales_per_day = sales_per_dealer_day
        self.call_share = call_share
        self.complaints = complaints
        self.mystery_shops = mystery_shops
        self.dealers = [self._dealer(d, tuple(x for x in drops if x.dealer_id == d)) for d in ids]
        self.heap: list[tuple[datetime, int, dict[str, Any]]] = []
        self.seq = 0

    def _dealer(self, dealer_id: str, drops: tuple[Drop, ...]) -> _Dealer:
        prefix = f"dealer-csi:{self.seed}:{dealer_id}"
        rng = random.Random(prefix)
        kind = rng.random()
        quality = rng.gauss(0.0, 0.3)
        if kind < 0.08:
            quality -= rng.uniform(0.8, 1.6)  # a few weak dealers
        elif kind < 0.28:
            quality += rng.uniform(0.3, 0.6)  # some strong ones
        # Operations follow quality: weak dealers are late, slow and redo more work.
        dealer = _Dealer(
            dealer_id=dealer_id,
            rng=rng,
            quality=quality,
            size=math.exp(rng.gauss(-0.125, 0.5)),  # lognormal with mean 1
            factor_effect={f: rng.gauss(0.0, 0.25) for f in SERVICE_FACTORS},
            attribute_effect={a: rng.gauss(0.0, 0.12) for a in _ATTRIBUTE_OFFSET},
            late_p=min(0.4, max(0.03, 0.12 - 0.08 * quality + rng.gauss(0.0, 0.02))),
            comeback_p=min(0.08, max(0.01, 0.03 - 0.015 * quality)),
            response_p=min(1.0, self.survey_share * rng.uniform(0.7, 1.3)),
            appointment_p=min(0.9, max(0.3, 0.65 + 0.1 * quality + rng.gauss(0.0, 0.08))),
            greet_mean_min=max(1.5, 4.0 - 2.0 * quality + rng.gauss(0.0, 0.5)),
            drops=drops,
            call_rng=random.Random(f"{prefix}:call"),
            complaint_rng=random.Random(f"{prefix}:complaint"),
            audit_rng=random.Random(f"{prefix}:audit"),
        )
        # The other event types draw their dealer traits from their own streams.
        dealer.call_p = min(
            1.0, max(0.0, self.call_share * (1 + 0.12 * quality + dealer.call_rng.gauss(0.0, 0.1)))
        )
        crng = dealer.complaint_rng
        dealer.complaint_base = _COMPLAINT_BASE_RATE * math.exp(-0.5 * quality)
        dealer.complaint_share = _UNHAPPY_COMPLAINT_SHARE * math.exp(crng.gauss(0.0, 0.2))
        dealer.response_median_h = 5.0 * math.exp(-0.5 * quality + crng.gauss(0.0, 0.25))
        dealer.resolve_factor = math.exp(-0.4 * quality + crng.gauss(0.0, 0.2))
        dealer.recovery_p = min(0.92, max(0.35, 0.74 + 0.1 * quality + crng.gauss(0.0, 0.05)))
        dealer.audit_skill = dealer.audit_rng.gauss(0.0, 0.3)
        return dealer

    def run(self) -> Iterator[dict[str, Any]]:
        for offset in range(self.days):
            day = self.start + timedelta(days=offset)
            for dealer in self.dealers:
                self._dealer_day(dealer, day)
            # Everything generated later occurs on a later day, so all events
            # before the next midnight are final and can go out in order.
            horizon = datetime.combine(day + _DAY, time(), UTC)
            while self.heap and self.heap[0][0] < horizon:
                yield heapq.heappop(self.heap)[2]
        while self.heap:
            yield heapq.heappop(self.heap)[2]

    def _push(self, moment: datetime, event: dict[str, Any]) -> bool:
        if moment >= self.limit:
            return False
        heapq.heappush(self.heap, (moment, self.seq, event))
        self.seq += 1
        return True

    def _envelope(
        self,
        rng: random.Random,
        dealer: _Dealer,
        event_type: str,
        department: str,
        moment: datetime,
        customer_ref: str,
        source: str,
    ) -> dict[str, Any]:
        return {
            "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "event_type": event_type,
            "schema_version": SCHEMA_VERSION,
            "dealer_id": dealer.dealer_id,
            "department": department,
            "occurred_at": _iso(moment),
            "customer_ref": customer_ref,
            "source": source,
        }

    def _customer_ref(self, dealer: _Dealer, customer: int) -> str:
        raw = f"{self.seed}:{dealer.dealer_id}:{customer}".encode()
        return hashlib.sha256(raw).hexdigest()[:24]

    def _ref(self, text: str) -> str:
        """A pseudonymous key for a non-customer party (a mystery shopper, an auditor)."""
        return hashlib.sha256(f"{self.seed}:{text}".encode()).hexdigest()[:24]

    def _customer(self, dealer: _Dealer) -> int:
        # About a third of customers have been here before (regular servicing).
        rng = dealer.rng
        returning, which = rng.random(), rng.random()
        if returning < 0.35 and dealer.customers > 0:
            return int(which * dealer.customers)
        dealer.customers += 1
        return dealer.customers - 1

    @staticmethod
    def _shift(dealer: _Dealer, day: date) -> float:
        """The dealer's drops in force on ``day``, on the latent 1-10 scale."""
        return sum(d.size for d in dealer.drops if day >= d.start) / 100.0

    def _base_latent(self, dealer: _Dealer, customer_ref: str, mood: float, day: date) -> float:
        """A response's latent 1-10 level before factor and attribute effects."""
        return (
            _NETWORK_MEAN
            + dealer.quality
            + _temperament(customer_ref)
            + mood
            - self._shift(dealer, day)
        )

    def _dealer_day(self, dealer: _Dealer, day: date) -> None:
        rng = dealer.rng
        weekday = _WEEKDAY_FACTOR[day.weekday()]
        n_visits = _poisson(rng, self.visits_per_day * dealer.size * weekday)
        opening = datetime.combine(day, _OPEN, UTC)
        arrivals = sorted(
            opening + timedelta(seconds=self._arrival_offset(rng)) for _ in range(n_visits)
        )
        for number, arrived in enumerate(arrivals, start=1):
            self._visit(dealer, day, number, arrived)
        n_sales = _poisson(rng, self.sales_per_day * dealer.size * weekday)
        for _ in range(n_sales):
            seconds = int(rng.uniform(0, 12 * 3600))
            moment = datetime.combine(day, time(9), UTC) + timedelta(seconds=seconds)
            customer_ref = self._customer_ref(dealer, self._customer(dealer))
            survey = self._survey(dealer, moment, customer_ref, None, "sales", None, None)
            self._push(moment, survey)
        if self.complaints:
            # Sales complaints (no visit): rarer, and more of them after a drop.
            lam = _SALES_COMPLAINTS_PER_DEALER_DAY * dealer.size * weekday
            lam *= 1.0 + max(0.0, self._shift(dealer, day))
            for k in range(1, _poisson(dealer.complaint_rng, lam) + 1):
                self._sales_complaint(dealer, day, k)
        if self.mystery_shops:
            if day == self.start or day.day == 1:
                dealer.audit_day = self._audit_day(dealer, day)
            if day == dealer.audit_day:
                self._audit(dealer, day)

    @staticmethod
    def _arrival_offset(rng: random.Random) -> int:
        # Seconds after 07:30: a morning drop-off peak, then walk-ins until 17:00.
        if rng.random() < 0.6:
            return int(rng.uniform(0, 2.5 * 3600))
        return int(rng.uniform(2.5 * 3600, 9.5 * 3600))

    def _visit(self, dealer: _Dealer, day: date, number: int, arrived: datetime) -> None:
        rng = dealer.rng
        appointment = rng.random() < dealer.appointment_p
        wait_min = rng.expovariate(1.0 / (dealer.greet_mean_min * (1.0 if appointment else 2.2)))
        greeted = arrived + timedelta(seconds=int(20 + wait_min * 60))

        job, hours = rng.random(), rng.uniform(0.0, 1.0)
        if job < 0.35:  # quick job, customer waits
            promised = greeted + timedelta(hours=1 + 1.5 * hours)
        elif job < 0.9:
            promised = greeted + timedelta(hours=2.5 + 4.5 * hours)
        else:  # parts or long job: promised the next day
            promised = datetime.combine(day + _DAY, time(10), UTC) + timedelta(hours=7 * hours)
        if promised.time() > time(18, 30):
            promised = datetime.combine(day + _DAY, time(9), UTC) + timedelta(hours=8 * hours)
        promised = promised.replace(minute=promised.minute - promised.minute % 15, second=0)
        promised = max(promised, greeted + timedelta(minutes=30))
        late = rng.random() < dealer.late_p
        early_min, late_min = rng.uniform(0, 50), 10 + rng.expovariate(1 / 50)
        if late:
            delivered = promised + timedelta(minutes=late_min)
        else:
            delivered = max(
                promised - timedelta(minutes=early_min), greeted + timedelta(minutes=20)
            )
        delivered = delivered.replace(microsecond=0)

        comeback_draw, comeback_pick = rng.random(), rng.random()
        comeback_of: str | None = None
        customer = -1
        if comeback_draw < dealer.comeback_p:
            while dealer.recent and dealer.recent[0][0] < arrived - _COMEBACK_WINDOW:
                dealer.recent.popleft()
            eligible = [r for r in dealer.recent if r[0] <= arrived]
            if eligible:
                _, comeback_of, customer = _choose(comeback_pick, eligible)
        if customer < 0:
            customer = self._customer(dealer)

        estimate = round(math.exp(rng.gauss(math.log(900.0), 0.75)), 2)
        overrun_draw = rng.random()
        overrun_size, drift = rng.uniform(1.15, 1.45), rng.gauss(1.0, 0.04)
        overrun = overrun_draw < 0.12
        invoice = round(estimate * (overrun_size if overrun else min(1.12, max(0.85, drift))), 2)
        if comeback_of is not None and overrun_draw < 0.7:
            # Rework of a failed repair is mostly done free of charge.
            estimate = invoice = 0.0
            overrun = False
        # How this visit felt to the customer, surveyed or not: the survey, the
        # calls and any complaint of this visit share it.
        mood = rng.gauss(0.0, 0.8)

        visit_id = f"{dealer.dealer_id}-{day:%Y%m%d}-{number:04d}"
        customer_ref = self._customer_ref(dealer, customer)
        visit = self._envelope(rng, dealer, "visit", "service", delivered, customer_ref, "dms")
        visit.update(
            visit_id=visit_id,
            appointment=appointment,
            arrived_at=_iso(arrived),
            greeted_at=_iso(greeted),
            promised_at=_iso(promised),
            delivered_at=_iso(delivered),
            estimate_amount=estimate,
            invoice_amount=invoice,
            comeback_of=comeback_of,
        )
        if not self._push(delivered, visit):
            return
        dealer.recent.append((delivered, visit_id, customer))

        facts = _VisitFacts(
            late=late,
            slow_greeting=wait_min > 12,
            comeback=comeback_of is not None,
            overrun=overrun,
        )
        follow = _Visit(visit_id, delivered, customer_ref, facts, mood)
        if self.call_share > 0:
            self._calls(dealer, follow)
        if self.complaints:
            self._visit_complaint(dealer, follow)

        if rng.random() >= dealer.response_p:
            return
        lag_days = 1 + min(int(rng.random() * 3), 2)
        answered = datetime.combine(delivered.date() + timedelta(days=lag_days), time(8), UTC)
        answered += timedelta(seconds=int(rng.uniform(0, 13.5 * 3600)))
        survey = self._survey(dealer, answered, customer_ref, visit_id, "service", facts, mood)
        self._push(answered, survey)

    def _service_latents(
        self, rng: random.Random, dealer: _Dealer, base: float, facts: _VisitFacts | None
    ) -> tuple[dict[str, float], float]:
        """Latent 1-10 scores of every catalogue attribute and of ``overall``."""
        factor_latent = {
            f: base + dealer.factor_effect[f] + rng.gauss(0.0, 0.45) for f in SERVICE_FACTORS
        }
        if facts is not None:
            _apply_visit_facts(factor_latent, facts)
        attribute_latent: dict[str, float] = {}
        for code, factor in _ATTRIBUTE_FACTOR.items():
            attribute_latent[code] = (
                factor_latent[factor]
                + _ATTRIBUTE_OFFSET.get(code, 0.0)
                + dealer.attribute_effect[code]
                + rng.gauss(0.0, 0.5)
            )
        if facts is not None:
            _apply_attribute_facts(attribute_latent, facts)
        overall_latent = sum(
            FACTOR_WEIGHTS[f] * v for f, v in factor_latent.items()
        ) / _WEIGHT_TOTAL + rng.gauss(0.0, 0.35)
        return attribute_latent, overall_latent

    def _survey(
        self,
        dealer: _Dealer,
        moment: datetime,
        customer_ref: str,
        visit_id: str | None,
        department: str,
        facts: _VisitFacts | None,
        mood: float | None,
    ) -> dict[str, Any]:
        rng = dealer.rng
        channel_draw = rng.random()
        channel, _, high, source = next(c for c in _CHANNELS if channel_draw < c[1])
        event = self._envelope(rng, dealer, "survey", department, moment, customer_ref, source)
        if mood is None:
            mood = rng.gauss(0.0, 0.8)  # no visit: this response's own mood
        base = self._base_latent(dealer, customer_ref, mood, moment.date())
        attribute_latent: dict[str, float] = {}
        if department == "service":
            attribute_latent, overall_latent = self._service_latents(rng, dealer, base, facts)
        else:
            for code in SALES_ATTRIBUTES:
                attribute_latent[code] = (
                    base
                    + _ATTRIBUTE_OFFSET.get(code, 0.0)
                    + dealer.attribute_effect[code]
                    + rng.gauss(0, 0.6)
                )
            overall_latent = base + rng.gauss(0.0, 0.4)

        ratings: dict[str, int] = {}
        for code, latent in attribute_latent.items():
            if rng.random() >= 0.15:  # not every attribute gets an answer
                ratings[code] = _to_scale(latent, high)
        if not ratings:
            # A questionnaire with no rated item is not a response; keep one.
            code = _choose(rng.random(), tuple(attribute_latent))
            ratings[code] = _to_scale(attribute_latent[code], high)

        recommend_latent = overall_latent + 0.25 + rng.gauss(0.0, 0.7)
        return_latent = overall_latent + rng.gauss(0.0, 0.8)
        long_form = rng.random() < 0.5
        expectation: int | None = None
        perception: int | None = None
        expectations: dict[str, int] = {}  # the schema's "not asked", not null
        disconfirmation: int | None = None
        ideal: int | None = None
        if long_form:
            # Expectations are formed before the visit: a drop does not move them.
            expectation = _to_scale(8.6 + rng.gauss(0.0, 0.9), high)
            perception = _to_scale(overall_latent + rng.gauss(0.0, 0.5), high)
            expectations = {
                code: _to_scale(
                    8.7 - 0.5 * _ATTRIBUTE_OFFSET.get(code, 0.0) + rng.gauss(0.0, 0.7), high
                )
                for code in ratings
            }
            # The ACSI items follow from what was drawn (no extra draws, so a
            # seed's other output is unchanged): met expectations sit mid-scale.
            gap10 = 9 * (perception - expectation) / (high - 1)
            disconfirmation = _to_scale(5.5 + 2.0 * gap10, high)
            ideal = _to_scale(overall_latent - 0.7, high)

        overall = _to_scale(overall_latent, high)
        has_comment, comment_draw = rng.random() < 0.3, rng.random()
        comment: str | None = None
        if has_comment:
            x10 = 1 + 9 * (overall - 1) / (high - 1)
            if x10 >= 8.5:
                pool = _POSITIVE_COMMENTS
            elif x10 >= 6:
                pool = _NEUTRAL_COMMENTS
            else:
                pool = _NEGATIVE_COMMENTS
            comment = _choose(comment_draw, pool)

        event.update(
            visit_id=visit_id,
            channel=channel,
            scale={"min": 1, "max": high},
            ratings=ratings,
            overall=overall,
            expectation=expectation,
            perception=perception,
            disconfirmation=disconfirmation,
            ideal=ideal,
            expectations=expectations,
            recommend=max(0, min(10, math.floor(recommend_latent + 0.5))),
            return_intent=_to_scale(return_latent, high),
            comment=comment,
        )
        return event

    # --- follow-up calls -------------------------------------------------------

    def _calls(self, dealer: _Dealer, visit: _Visit) -> None:
        rng = dealer.call_rng
        u_call, u_lag, u_time = rng.random(), rng.random(), rng.random()
        if u_call >= dealer.call_p:
            return
        day = visit.delivered.date() + timedelta(days=_pick(u_lag, _CALL_LAG_DAYS))
        moment = datetime.combine(day, time(9), UTC) + timedelta(seconds=int(u_time * 10 * 3600))
        for _ in range(_CALL_ATTEMPTS):
            outcome = self._call(dealer, visit, moment)
            if outcome is None:
                return  # past the end of the range
            u_retry, u_later = rng.random(), rng.random()
            if outcome == "no_answer" and u_retry < 0.5:
                # Tried again the next day.
                moment = datetime.combine(moment.date() + _DAY, time(9), UTC) + timedelta(
                    seconds=int(u_later * 10 * 3600)
                )
            elif outcome == "callback_requested" and u_retry < 0.85:
                later = moment + timedelta(seconds=int((2 + 4 * u_later) * 3600))
                if later.date() != moment.date() or later.time() >= time(20):
                    later = datetime.combine(moment.date() + _DAY, time(9), UTC) + timedelta(
                        seconds=int(u_later * 3 * 3600)
                    )
                moment = later
            else:
                return

    def _call(self, dealer: _Dealer, visit: _Visit, moment: datetime) -> str | None:
        """One call attempt; its outcome, or None if it lies past the end of the range."""
        rng = dealer.call_rng
        event = self._envelope(
            rng, dealer, "call", "service", moment, visit.customer_ref, "call_centre"
        )
        u_outcome, u_issue, u_confirm, u_rated, u_comment, u_note, u_length = (
            rng.random() for _ in range(7)
        )
        z_length = rng.gauss(0.0, 1.0)
        outcome = _pick(u_outcome, _CALL_OUTCOMES)
        scale: dict[str, int] | None = None
        ratings: dict[str, int] = {}
        overall: int | None = None
        issue = confirmed = False
        comment: str | None = None
        if outcome == "reached":
            base = self._base_latent(dealer, visit.customer_ref, visit.mood, moment.date())
            grievance = base - visit.facts.grievance()
            issue = u_issue < 0.02 + 0.7 * _sigmoid((6.5 - grievance) / 0.5)
            confirmed = not issue and u_confirm < _sigmoid((grievance - 7.0) / 0.6)
            rated = u_rated < _CALL_RATED_SHARE
            if rated:
                # A short CSS interview: overall and 2-4 attributes, on 1-10.
                n_codes = 2 + min(int(rng.random() * 3), 2)
                # Which ones: the n_codes smallest of one draw per attribute.
                ranked = sorted((rng.random(), code) for code in _CALL_ATTRIBUTES)
                asked = {code for _, code in ranked[:n_codes]}
                attribute_latent, overall_latent = self._service_latents(
                    rng, dealer, base, visit.facts
                )
                scale = {"min": 1, "max": 10}
                ratings = {
                    c: _to_scale(attribute_latent[c], 10) for c in _CALL_ATTRIBUTES if c in asked
                }
                overall = _to_scale(overall_latent, 10)
            seconds = 150 * math.exp(0.45 * z_length) + 90 * rated + 60 * issue
            if issue:
                comment = _choose(u_note, _CALL_ISSUE_NOTES)
            elif confirmed and u_comment < 0.25:
                comment = _choose(u_note, _CALL_POSITIVE_NOTES)
        elif outcome == "no_answer":
            seconds = 0.0
        elif outcome == "callback_requested":
            seconds = 10 + 50 * u_length
            if u_comment < 0.6:
                comment = _choose(u_note, _CALLBACK_NOTES)
        else:  # refused, wrong_number
            seconds = 5 + 25 * u_length
        event.update(
            visit_id=visit.visit_id,
            outcome=outcome,
            duration_s=int(seconds),
            satisfaction_confirmed=confirmed,
            issue_reported=issue,
        )
        if scale is not None:  # only on a call with ratings; absent (not null) otherwise
            event["scale"] = scale
        event.update(ratings=ratings, overall=overall, comment=comment)
        return outcome if self._push(moment, event) else None

    # --- complaints --------------------------------------------------------------

    def _visit_complaint(self, dealer: _Dealer, visit: _Visit) -> None:
        rng = dealer.complaint_rng
        base = self._base_latent(dealer, visit.customer_ref, visit.mood, visit.delivered.date())
        grievance = base - visit.facts.grievance()
        unhappy = _sigmoid((_UNHAPPY_BELOW - grievance) / 0.3)
        if rng.random() >= dealer.complaint_base + dealer.complaint_share * unhappy:
            return
        u_lag, u_time, u_category, u_severity = (rng.random() for _ in range(4))
        lag = _pick(u_lag, _COMPLAINT_LAG_DAYS)
        if lag == 0:  # the same day, soon after collecting the car
            opened = visit.delivered + timedelta(seconds=int((0.5 + 4 * u_time) * 3600))
        else:
            day = visit.delivered.date() + timedelta(days=lag)
            opened = datetime.combine(day, time(8), UTC) + timedelta(
                seconds=int(u_time * 13 * 3600)
            )
        facts = visit.facts
        weights = dict(_SERVICE_CATEGORY_WEIGHTS)
        if facts.comeback:
            weights["repair_quality"] += 1.5
        if facts.late:
            weights["promise_broken"] += 0.6
            weights["waiting_time"] += 0.4
        if facts.overrun:
            weights["price"] += 1.0
        if facts.slow_greeting:
            weights["attitude"] += 0.3
            weights["waiting_time"] += 0.3
        boost = 0.15 * facts.comeback + 0.1 * (grievance < 5.5)
        self._complaint(
            dealer,
            f"C-{visit.visit_id}",
            opened,
            visit.customer_ref,
            visit.visit_id,
            "service",
            _weighted(u_category, weights),
            self._severity(u_severity, boost),
        )

    def _sales_complaint(self, dealer: _Dealer, day: date, number: int) -> None:
        rng = dealer.complaint_rng
        u_customer, u_time, u_category, u_severity = (rng.random() for _ in range(4))
        customer = int(u_customer * max(1, dealer.customers))
        opened = datetime.combine(day, time(9), UTC) + timedelta(seconds=int(u_time * 11 * 3600))
        self._complaint(
            dealer,
            f"C-{dealer.dealer_id}-{day:%Y%m%d}-S{number}",
            opened,
            self._customer_ref(dealer, customer),
            None,
            "sales",
            _weighted(u_category, _SALES_CATEGORY_WEIGHTS),
            self._severity(u_severity, 0.0),
        )

    @staticmethod
    def _severity(u: float, boost: float) -> int:
        shifted = min(u + boost, 0.999)
        return 1 + next(i for i, c in enumerate(_SEVERITY_CUMULATIVE) if shifted < c)

    def _complaint(
        self,
        dealer: _Dealer,
        complaint_id: str,
        opened: datetime,
        customer_ref: str,
        visit_id: str | None,
        department: str,
        category: str,
        severity: int,
    ) -> None:
        """Every state change of one complaint, each pushed at its own time."""
        rng = dealer.complaint_rng
        u = [rng.random() for _ in range(17)]
        z = [rng.gauss(0.0, 1.0) for _ in range(4)]
        source = "web" if u[0] < 0.35 else "dms"
        # First response: hours, faster for severe complaints, slower at weak dealers.
        hours = dealer.response_median_h * _RESPONSE_SEVERITY[severity - 1] * math.exp(z[0])
        responded = _office_hours(opened + timedelta(seconds=int(max(600, hours * 3600))), u[1])
        days = 1.5 * _RESOLVE_SEVERITY[severity - 1] * dealer.resolve_factor * math.exp(0.8 * z[1])
        resolved = _office_hours(responded + timedelta(seconds=int(max(3600, days * 86400))), u[2])
        closed = _office_hours(resolved + timedelta(days=0.2 + 2.8 * u[3]), u[4])
        compensation = 0.0
        if u[5] < 0.1 + 0.12 * (severity - 1):
            compensation = float(round(100 * severity * math.exp(0.6 * z[2]), -1)) or 10.0
        satisfied_p = dealer.recovery_p - 0.05 * (severity - 2) + 0.1 * (compensation > 0)
        satisfied = u[6] < satisfied_p
        note = _choose(u[7], _COMPLAINT_NOTES[category])
        resolution = _choose(u[8], _RESOLUTION_NOTES) if u[9] < 0.5 else None
        # (moment, status, compensation so far, satisfied_after, comment, source)
        states: list[tuple[datetime, str, float, bool | None, str | None, str]] = [
            (opened.replace(microsecond=0), "opened", 0.0, None, note, source),
            (responded, "responded", 0.0, None, None, "dms"),
            (resolved, "resolved", compensation, None, resolution, "dms"),
            (closed, "closed", compensation, satisfied, None, "dms"),
        ]
        if not satisfied and u[10] < 0.3:
            # The customer comes back: reopened, resolved and closed again.
            reopened = _office_hours(closed + timedelta(days=1 + 9 * u[11]), u[12])
            again = 0.8 * dealer.resolve_factor * math.exp(0.6 * z[3])
            resolved2 = _office_hours(reopened + timedelta(days=max(0.1, again)), u[13])
            closed2 = _office_hours(resolved2 + timedelta(days=0.2 + 1.8 * u[14]), u[15])
            total = compensation + (100.0 * severity if u[5] < 0.5 else 0.0)
            states += [
                (reopened, "reopened", compensation, None, _choose(u[11], _REOPEN_NOTES), source),
                (resolved2, "resolved", total, None, None, "dms"),
                (closed2, "closed", total, u[16] < 0.6, None, "dms"),
            ]
        for moment, status, amount, satisfied_after, comment, emitter in states:
            event = self._envelope(
                rng, dealer, "complaint", department, moment, customer_ref, emitter
            )
            event.update(
                complaint_id=complaint_id,
                status=status,
                category=category,
                severity=severity,
                visit_id=visit_id,
                compensation_amount=amount,
                satisfied_after=satisfied_after,
                comment=comment,
            )
            if not self._push(moment, event):
                return  # still in this state at the end of the range

    # --- mystery shopping ----------------------------------------------------------

    def _audit_day(self, dealer: _Dealer, day: date) -> date | None:
        """A random weekday of ``day``'s month, from ``day`` to the end of the range."""
        last = min(_month_end(day), self.last_day)
        candidates = [
            d
            for d in (day + timedelta(days=k) for k in range((last - day).days + 1))
            if d.weekday() < 5
        ]
        u = dealer.audit_rng.random()
        return _choose(u, candidates) if candidates else None

    def _audit(self, dealer: _Dealer, day: date) -> None:
        rng = dealer.audit_rng
        u_scenario, u_time, u_auditor = rng.random(), rng.random(), rng.random()
        audit_effect = rng.gauss(0.0, 0.35)  # this shopper on this day
        scenario, department, _ = next(s for s in _SCENARIOS if u_scenario < s[2])
        moment = datetime.combine(day, time(9), UTC) + timedelta(seconds=int(u_time * 8 * 3600))
        shopper = self._ref(f"{dealer.dealer_id}:shopper:{day:%Y%m}")
        event = self._envelope(rng, dealer, "mystery_shop", department, moment, shopper, "auditor")
        logit = (
            _AUDIT_LOGIT
            + 1.2 * dealer.quality
            + dealer.audit_skill
            + audit_effect
            - 0.8 * self._shift(dealer, day)
        )
        items: list[dict[str, Any]] = []
        for item in _AUDIT_ITEMS[scenario]:
            u_na, u_pass = rng.random(), rng.random()
            if not item.mandatory and u_na < _AUDIT_NA_SHARE:
                result = "na"
            else:
                result = "pass" if u_pass < _sigmoid(logit + item.difficulty) else "fail"
            items.append(
                {
                    "code": item.code,
                    "section": item.section,
                    "weight": item.weight,
                    "result": result,
                    "mandatory": item.mandatory,
                }
            )
        event.update(
            audit_id=f"{dealer.dealer_id}-MS-{day:%Y%m}",
            scenario=scenario,
            items=items,
            pass_mark=MYSTERY_SHOP_PASS_MARK,
            auditor_ref=self._ref(f"auditor:{int(u_auditor * _AUDITORS)}"),
        )
        self._push(moment, event)


def _apply_visit_facts(factor_latent: dict[str, float], facts: _VisitFacts) -> None:
    if facts.comeback:
        factor_latent["service_quality"] -= 1.5
        factor_latent["service_advisor"] -= 0.4
    if facts.late:
        factor_latent["vehicle_pickup"] -= 0.6
    if facts.slow_greeting:
        factor_latent["service_initiation"] -= 0.5


def _apply_attribute_facts(attribute_latent: dict[str, float], facts: _VisitFacts) -> None:
    if facts.late:
        attribute_latent["on_time"] -= 2.0
        attribute_latent["promises_kept"] -= 1.0
    if facts.slow_greeting:
        attribute_latent["greeted_promptly"] -= 1.5
    if facts.comeback:
        attribute_latent["fixed_first_time"] -= 1.5
    if facts.overrun:
        attribute_latent["value_for_money"] -= 1.5
        attribute_latent["charges_explained"] -= 1.0
