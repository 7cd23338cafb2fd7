"""Strict event models and the one entry point that turns raw bytes into an event.

Every event read from Kafka goes through `parse_event`: it either returns a
validated event (`VisitEvent`, `SurveyEvent`, `CallEvent`, `MysteryShopEvent` or
`ComplaintEvent`) or raises `InvalidEvent` whose `reason` is one readable line for
the dead-letter topic (DOMAIN.md: bad input is never dropped silently). Field
names follow DOMAIN.md "Events".

Validation is strict (no "5" for a number, no 1 for a bool, unknown fields
rejected) because these events feed published indices: a silently coerced
value would be a silently wrong CSI.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, Literal, Self, TypeAlias, get_args
from uuid import UUID

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

EventType = Literal["visit", "survey", "call", "mystery_shop", "complaint"]
EVENT_TYPES: Final[tuple[str, ...]] = get_args(EventType)
"""Every event type DOMAIN.md defines."""

SUPPORTED_EVENT_TYPES: Final[tuple[str, ...]] = EVENT_TYPES
"""The event types `parse_event` accepts: all of them."""

SUPPORTED_SCHEMA_VERSIONS: Final[tuple[int, ...]] = (1,)

MAX_EVENT_BYTES: Final[int] = 1024 * 1024
"""Payloads above this are rejected before JSON parsing (no event is anywhere near it)."""

MAX_COMMENT_CHARS: Final[int] = 5000

FUTURE_TOLERANCE: Final[timedelta] = timedelta(days=1)
"""How far `occurred_at` may lie ahead of the clock: emitters' clocks drift."""

# Bounds on numbers that the metrics divide by, multiply or sum. Each is far beyond any
# real value, and together they keep every statistic finite: a float that overflows to
# inf is written as JSON null to the roll-up topic and the state changelog, and the
# worker cannot read it back (a poison record). Python ints are unbounded, so a scale
# bound of 10**400 would even raise OverflowError when rescaled to 1-10.
MAX_SCALE_BOUND: Final[int] = 10_000
"""Largest |min| and |max| of an answer scale (real scales: 0-10, 1-5, 1-7, -90..90, 0-100)."""
MAX_AMOUNT: Final[float] = 1e12
"""Largest money amount (estimate, invoice, compensation), in any currency's main unit."""
MIN_NONZERO_AMOUNT: Final[float] = 0.001
"""Smallest money amount above 0 (a thousandth of a main unit): the invoice is divided
by the estimate."""
MAX_AUDIT_WEIGHT: Final[float] = 1e6
MIN_NONZERO_EXPECTATION: Final[float] = 0.001
"""Smallest |expectation| other than 0: the CSS ratio is perception ÷ expectation."""

Department = Literal["service", "sales"]
Source = Literal["dms", "survey_vendor", "call_centre", "auditor", "web"]
SurveyChannel = Literal["web", "sms", "email", "phone", "app"]
CallOutcome = Literal["reached", "no_answer", "refused", "wrong_number", "callback_requested"]
AuditScenario = Literal[
    "service_visit", "phone_inquiry", "sales_visit", "online_inquiry", "vehicle_delivery"
]
AuditResult = Literal["pass", "fail", "na"]
ComplaintStatus = Literal["opened", "responded", "resolved", "closed", "reopened"]
ComplaintCategory = Literal[
    "waiting_time",
    "price",
    "repair_quality",
    "attitude",
    "promise_broken",
    "parts",
    "communication",
    "other",
]

# Fields whose values may be personal data: never echoed into a rejection reason,
# which ends up in logs and dead-letter metadata.
_PII_FIELDS: Final[frozenset[str]] = frozenset({"customer_ref", "auditor_ref", "comment"})


# --- personal-data detection and scrubbing ------------------------------------

# The lookbehind makes a match start only at the beginning of a run of address
# characters, which keeps the scan linear on long texts without any "@".
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]+[@＠][A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)+"
)
# A phone candidate: digits (\d also matches full-width digits) separated by at most
# two of space, hyphen, dot or parentheses, optionally led by "+" or "(".  Whether it
# really is a phone number is decided by `_phone_or_original` (digit count, not a date).
# Lookarounds rather than \b: CJK characters are word characters, so "拨打13812345678"
# has no word boundary before the number.
_PHONE_CANDIDATE = re.compile(r"(?<![\d+])\+?\(?\d(?:[ \-.()]{0,2}\d)*(?!\d)")
_DATE_LIKE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{4}")
_DECIMAL_LIKE = re.compile(r"\d+\.\d{1,2}")
_WHITESPACE = re.compile(r"(\s+)")
# E.164 numbers have at most 15 digits; the shortest local numbers in use have 7.
_PHONE_MIN_DIGITS: Final[int] = 7
_PHONE_MAX_DIGITS: Final[int] = 15


def _count_digits(text: str) -> int:
    return sum(1 for char in text if char.isdecimal())


def _phone_or_original(candidate: str) -> str:
    digits = _count_digits(candidate)
    if digits > _PHONE_MAX_DIGITS and " " in candidate:
        # Probably several numbers joined by spaces ("2024-05-01 13812345678"): judge each.
        return "".join(
            part if part.isspace() else _PHONE_CANDIDATE.sub(_phone_match, part)
            for part in _WHITESPACE.split(candidate)
        )
    if not _PHONE_MIN_DIGITS <= digits <= _PHONE_MAX_DIGITS:
        return candidate
    if _DATE_LIKE.fullmatch(candidate) or _DECIMAL_LIKE.fullmatch(candidate):
        return candidate
    return "[phone]"


def _phone_match(match: re.Match[str]) -> str:
    return _phone_or_original(match.group(0))


# A VIN: 17 of A–Z (without I, O, Q) and digits, letters and digits both present.
_VIN = re.compile(r"(?<![A-Za-z0-9])[A-HJ-NPR-Za-hj-npr-z0-9]{17}(?![A-Za-z0-9])")
# Chinese plates: province character, a letter, then 5 (6 for new-energy cars)
# letters or digits, often written with a dot or space after the letter.
_CN_PLATE = re.compile(
    r"[京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼][A-Za-z]"
    r"[·•.\s-]?[A-Za-z0-9]{4}[A-Za-z0-9挂学警港澳]{1,2}"
)
# The current British format ("AB12 CDE").
_UK_PLATE = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}\s?[A-Z]{3}(?![A-Za-z0-9])")
# Any registration announced as one: "plate ABC-1234", "reg: KA 05 1234", "车牌号 A12345".
# One way only to split the spaces after the word (`\s*(?:…)?\s*` had n of them, so
# "plate" and thousands of spaces took seconds to scan).
_ANNOUNCED_PLATE = re.compile(
    r"(?i)((?<![A-Za-z])(?:licen[cs]e\s+)?plate|(?<![A-Za-z])reg(?:istration)?(?:\s+(?:no\.?|number))?"
    r"|车牌号?|牌照)(\s*(?:(?:[:#：]|is|号码)\s*)?)"
    r"([A-Za-z0-9]{1,8}(?:[\s\-·][A-Za-z0-9]{1,5}){0,2})(?![A-Za-z0-9])"
)


def _vin_or_original(match: re.Match[str]) -> str:
    text = match.group(0)
    has_digit = any(c.isdigit() for c in text)
    return "[vin]" if has_digit and any(c.isalpha() for c in text) else text


def _announced_plate(match: re.Match[str]) -> str:
    parts = re.split(r"([\s\-·])", match.group(3))
    rest = ""
    # the words after the registration ("ABC-1234 was swapped") stay
    while len(parts) > 1 and not any(c.isdigit() for c in parts[-1]) and not parts[-1].isupper():
        rest = parts[-2] + parts[-1] + rest
        parts = parts[:-2]
    token = "".join(parts)
    if not any(c.isdigit() for c in token):
        return match.group(0)  # "plate was dirty": no registration follows
    return f"{match.group(1)}{match.group(2)}[plate]{rest}"


def scrub_personal_data(text: str) -> str:
    """`text` with e-mail addresses replaced by "[email]", VINs by "[vin]",
    number plates by "[plate]" and phone numbers by "[phone]".

    E-mails go first: "13812345678@163.com" is one address, not a phone number;
    VINs and plates before phones, whose digits they contain. Idempotent, so a
    stored (already scrubbed) comment validates to itself.
    """
    scrubbed = _EMAIL.sub("[email]", text)
    scrubbed = _VIN.sub(_vin_or_original, scrubbed)
    scrubbed = _CN_PLATE.sub("[plate]", scrubbed)
    scrubbed = _UK_PLATE.sub("[plate]", scrubbed)
    scrubbed = _ANNOUNCED_PLATE.sub(_announced_plate, scrubbed)
    return _PHONE_CANDIDATE.sub(_phone_match, scrubbed)


_PSEUDONYMOUS_REF = re.compile(r"[A-Za-z0-9_-]{8,128}")
_PHONE_LIKE_REF = re.compile(r"[\d\s()+.\-]+")


def _check_pseudonymous_ref(value: str) -> str:
    """A person's key (customer_ref, auditor_ref): a hash, never an e-mail or phone number."""
    if "@" in value or "＠" in value:
        raise PydanticCustomError(
            "pseudonymous_ref_pii",
            "must be a pseudonymous hash, not PII (it looks like an e-mail address)",
        )
    if (
        _PHONE_LIKE_REF.fullmatch(value)
        and _PHONE_MIN_DIGITS <= _count_digits(value) <= _PHONE_MAX_DIGITS
    ):
        raise PydanticCustomError(
            "pseudonymous_ref_pii",
            "must be a pseudonymous hash, not PII (it looks like a phone number)",
        )
    if not _PSEUDONYMOUS_REF.fullmatch(value):
        raise PydanticCustomError(
            "pseudonymous_ref_format",
            "must be a pseudonymous hash: 8–128 characters from A-Z a-z 0-9 _ -"
            " (got {length} characters)",
            {"length": len(value)},
        )
    return value


def _comment_too_long(length: int) -> PydanticCustomError:
    return PydanticCustomError(
        "comment_too_long",
        "must be at most {limit} characters (got {length})",
        {"limit": MAX_COMMENT_CHARS, "length": length},
    )


def _scrub_comment(value: str) -> str:
    # Cheap guard first: a comment far too long is rejected without scanning it.
    if len(value) > 2 * MAX_COMMENT_CHARS:
        raise _comment_too_long(len(value))
    scrubbed = scrub_personal_data(value)
    # The limit is on what is stored, so that a stored comment always validates again
    # (a placeholder can be longer than what it replaced).
    if len(scrubbed) > MAX_COMMENT_CHARS:
        raise _comment_too_long(len(scrubbed))
    return scrubbed


def _check_schema_version(version: int) -> int:
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise PydanticCustomError(
            "schema_version_unsupported",
            "version {version} is not supported (supported: {supported})",
            {
                "version": version,
                "supported": ", ".join(str(v) for v in SUPPORTED_SCHEMA_VERSIONS),
            },
        )
    return version


# Plausible event times. Outside this range a timestamp is a placeholder
# ("0001-01-01", "1900-01-01") or garbage, and the extremes cannot even be
# converted to UTC, which every window computation does.
EARLIEST_TIMESTAMP: Final[datetime] = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_TIMESTAMP: Final[datetime] = datetime(2100, 1, 1, tzinfo=UTC)


def _check_timestamp_range(moment: datetime) -> datetime:
    if not EARLIEST_TIMESTAMP <= moment < LATEST_TIMESTAMP:
        raise PydanticCustomError(
            "timestamp_range",
            "must be between {earliest} and {latest} (got {moment})",
            {
                "earliest": EARLIEST_TIMESTAMP.date().isoformat(),
                "latest": LATEST_TIMESTAMP.date().isoformat(),
                "moment": moment.isoformat(),
            },
        )
    return moment


_PLACEHOLDER_UUIDS: Final[frozenset[UUID]] = frozenset({UUID(int=0), UUID(int=(1 << 128) - 1)})


def _check_event_id(event_id: UUID) -> UUID:
    # The nil and max UUIDs (RFC 9562) are placeholders, not ids: an emitter that sends
    # one for every event would see all but the first dropped as replays of it.
    if event_id in _PLACEHOLDER_UUIDS:
        raise PydanticCustomError(
            "event_id_placeholder",
            "must be a unique id, not the placeholder UUID {value}",
            {"value": str(event_id)},
        )
    return event_id


# --- field types ---------------------------------------------------------------

Timestamp = Annotated[AwareDatetime, AfterValidator(_check_timestamp_range)]
EventId = Annotated[UUID, AfterValidator(_check_event_id)]

DealerId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")]
PseudonymousRef = Annotated[str, AfterValidator(_check_pseudonymous_ref)]
SchemaVersion = Annotated[int, Field(ge=1), AfterValidator(_check_schema_version)]
# Ids assigned by the emitting systems (DMS repair order, audit, complaint ticket).
ExternalId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
VisitId = ExternalId


def _check_amount(amount: float) -> float:
    if 0 < amount < MIN_NONZERO_AMOUNT:
        raise PydanticCustomError(
            "amount_too_small",
            "must be 0 or at least {smallest}",
            {"smallest": MIN_NONZERO_AMOUNT},
        )
    return amount


Amount = Annotated[
    float, Field(ge=0, le=MAX_AMOUNT, allow_inf_nan=False), AfterValidator(_check_amount)
]
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
# Codes are keys of the (replaceable) questionnaire catalogue; no dots, so that an
# error path like "ratings.booking_ease" is unambiguous.
AttributeCode = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")]
# Finite numbers only; bools are refused by strict mode. The scale bounds are checked
# by the event (SurveyEvent, CallEvent), which knows its scale.
Rating = Annotated[float, Field(allow_inf_nan=False)]
Comment = Annotated[str, AfterValidator(_scrub_comment)]
MAX_RATED_ATTRIBUTES: Final[int] = 200
MAX_AUDIT_ITEMS: Final[int] = 300
AuditWeight = Annotated[float, Field(gt=0, le=MAX_AUDIT_WEIGHT, allow_inf_nan=False)]
Percentage = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
Severity = Annotated[int, Field(ge=1, le=4)]
ScaleBound = Annotated[int, Field(ge=-MAX_SCALE_BOUND, le=MAX_SCALE_BOUND)]


class _StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class Scale(_StrictModel):
    """The answer scale of a questionnaire, e.g. 1–10 or 1–5 (both ends inclusive)."""

    min: ScaleBound = 1
    max: ScaleBound = 10

    @model_validator(mode="after")
    def _min_below_max(self) -> Self:
        if self.min >= self.max:
            raise PydanticCustomError(
                "scale_order",
                "min must be less than max (got min {min}, max {max})",
                {"min": self.min, "max": self.max},
            )
        return self


def _off_scale_errors(
    answers: list[tuple[tuple[str, ...], float]], scale: Scale, owner: str
) -> list[InitErrorDetails]:
    """One error per answer outside `scale`, located at the answer's own path."""
    errors: list[InitErrorDetails] = []
    for loc, value in answers:
        if not scale.min <= value <= scale.max:
            errors.append(
                InitErrorDetails(
                    type=PydanticCustomError(
                        "out_of_scale",
                        "must be within the {owner} scale {min}–{max} (got {value})",
                        {"owner": owner, "min": scale.min, "max": scale.max, "value": f"{value:g}"},
                    ),
                    loc=loc,
                    input=value,
                )
            )
    return errors


class Envelope(_StrictModel):
    """Fields every event carries (DOMAIN.md "Events"); the base of every event model."""

    event_id: EventId
    event_type: EventType
    schema_version: SchemaVersion
    dealer_id: DealerId
    department: Department = "service"
    occurred_at: Timestamp
    customer_ref: PseudonymousRef
    source: Source

    @field_validator("occurred_at")
    @classmethod
    def _not_far_in_future(cls, occurred_at: datetime, info: ValidationInfo) -> datetime:
        # `now` comes from the validation context so that tests (and replays) can fix the clock.
        context = info.context
        now = context.get("now") if isinstance(context, dict) else None
        if not isinstance(now, datetime):
            now = datetime.now(UTC)
        # Subtracting from occurred_at (range-checked already) cannot overflow; adding to now can.
        if occurred_at - FUTURE_TOLERANCE > now:
            raise PydanticCustomError(
                "occurred_at_future",
                "must be at most 1 day in the future (got {occurred_at}, now {now})",
                {"occurred_at": occurred_at.isoformat(), "now": now.isoformat()},
            )
        return occurred_at


class VisitEvent(Envelope):
    """A service visit / repair order: the denominator of response rate and visit KPIs."""

    event_type: Literal["visit"] = "visit"
    visit_id: VisitId
    appointment: bool
    arrived_at: Timestamp
    greeted_at: Timestamp | None = None
    promised_at: Timestamp | None = None
    delivered_at: Timestamp | None = None
    estimate_amount: Amount | None = None
    invoice_amount: Amount | None = None
    comeback_of: VisitId | None = None
    """visit_id of the visit this one repeats (not fixed right the first time)."""


class SurveyEvent(Envelope):
    """A questionnaire answer; every rating lies on the survey's own `scale`."""

    event_type: Literal["survey"] = "survey"
    visit_id: VisitId | None = None
    channel: SurveyChannel
    scale: Scale = Field(default_factory=Scale)
    ratings: dict[AttributeCode, Rating] = Field(
        default_factory=dict, max_length=MAX_RATED_ATTRIBUTES
    )
    overall: Rating | None = None
    expectation: Rating | None = None
    perception: Rating | None = None
    return_intent: Rating | None = None
    disconfirmation: Rating | None = None
    """ACSI item: how far the service fell short of (low) or exceeded (high) expectations."""
    ideal: Rating | None = None
    """ACSI item: how close the service came to the ideal one."""
    expectations: dict[AttributeCode, Rating] = Field(
        default_factory=dict, max_length=MAX_RATED_ATTRIBUTES
    )
    recommend: Annotated[int, Field(ge=0, le=10)] | None = None
    comment: Comment | None = None

    @model_validator(mode="after")
    def _answers_on_scale(self) -> Self:
        # Raised as a ValidationError so that each off-scale value keeps its own
        # path (e.g. ratings.booking_ease) and all of them are reported at once.
        errors: list[InitErrorDetails] = []
        if not self.ratings and self.overall is None and self.recommend is None:
            errors.append(
                InitErrorDetails(
                    type=PydanticCustomError(
                        "survey_empty",
                        "a survey needs at least one of ratings, overall or recommend",
                    ),
                    loc=("ratings",),
                    input=self.ratings,
                )
            )
        answers: list[tuple[tuple[str, ...], float]] = [
            (("ratings", code), value) for code, value in self.ratings.items()
        ]
        single_answers = {
            "overall": self.overall,
            "expectation": self.expectation,
            "perception": self.perception,
            "return_intent": self.return_intent,
            "disconfirmation": self.disconfirmation,
            "ideal": self.ideal,
        }
        answers += [((name,), value) for name, value in single_answers.items() if value is not None]
        answers += [(("expectations", code), value) for code, value in self.expectations.items()]
        errors += _off_scale_errors(answers, self.scale, "survey")
        if self.expectation is not None and 0 < abs(self.expectation) < MIN_NONZERO_EXPECTATION:
            errors.append(
                InitErrorDetails(
                    type=PydanticCustomError(
                        "expectation_near_zero",
                        "must be 0 or at least {smallest} away from 0, as the CSS ratio"
                        " divides by it",
                        {"smallest": MIN_NONZERO_EXPECTATION},
                    ),
                    loc=("expectation",),
                    input=self.expectation,
                )
            )
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self


class CallEvent(Envelope):
    """A follow-up call after a visit; with ratings it also counts as a survey response."""

    event_type: Literal["call"] = "call"
    visit_id: VisitId
    outcome: CallOutcome
    duration_s: Seconds | None = None
    satisfaction_confirmed: bool | None = None
    issue_reported: bool | None = None
    scale: Scale = Field(default_factory=Scale)
    ratings: dict[AttributeCode, Rating] = Field(
        default_factory=dict, max_length=MAX_RATED_ATTRIBUTES
    )
    overall: Rating | None = None
    comment: Comment | None = None

    @property
    def carries_ratings(self) -> bool:
        """Whether the customer answered the questionnaire on the call (ratings or overall)."""
        return bool(self.ratings) or self.overall is not None

    @model_validator(mode="after")
    def _ratings_only_when_reached(self) -> Self:
        errors: list[InitErrorDetails] = []
        if self.outcome != "reached":
            carried: list[tuple[str, object]] = []
            if self.ratings:
                carried.append(("ratings", self.ratings))
            if self.overall is not None:
                carried.append(("overall", self.overall))
            for name, value in carried:
                errors.append(
                    InitErrorDetails(
                        type=PydanticCustomError(
                            "call_not_reached",
                            "a call that did not reach the customer cannot carry ratings"
                            " (outcome {outcome})",
                            {"outcome": repr(self.outcome)},
                        ),
                        loc=(name,),
                        input=value,
                    )
                )
        answers: list[tuple[tuple[str, ...], float]] = [
            (("ratings", code), value) for code, value in self.ratings.items()
        ]
        if self.overall is not None:
            answers.append((("overall",), self.overall))
        errors += _off_scale_errors(answers, self.scale, "call")
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self


class AuditItem(_StrictModel):
    """One checklist point of a mystery-shop audit."""

    code: AttributeCode
    section: AttributeCode
    weight: AuditWeight
    result: AuditResult
    mandatory: bool = False


class MysteryShopEvent(Envelope):
    """An audit by a mystery shopper: a weighted pass / fail / not-applicable checklist."""

    event_type: Literal["mystery_shop"] = "mystery_shop"
    audit_id: ExternalId
    scenario: AuditScenario
    items: list[AuditItem] = Field(min_length=1, max_length=MAX_AUDIT_ITEMS)
    pass_mark: Percentage | None = None
    """The score (0–100) the audit must reach to pass; None when the audit does not say."""
    auditor_ref: PseudonymousRef | None = None

    @model_validator(mode="after")
    def _codes_unique(self) -> Self:
        first_index: dict[str, int] = {}
        errors: list[InitErrorDetails] = []
        for index, item in enumerate(self.items):
            first = first_index.setdefault(item.code, index)
            if first != index:
                errors.append(
                    InitErrorDetails(
                        type=PydanticCustomError(
                            "audit_code_duplicate",
                            "duplicate code {code}: codes must be unique within an audit"
                            " (first at items.{first})",
                            {"code": repr(item.code), "first": first},
                        ),
                        loc=("items", index, "code"),
                        input=item.code,
                    )
                )
        if errors:
            raise ValidationError.from_exception_data(type(self).__name__, errors)
        return self


class ComplaintEvent(Envelope):
    """One state change of a complaint; a complaint's history is its sequence of events."""

    event_type: Literal["complaint"] = "complaint"
    complaint_id: ExternalId
    status: ComplaintStatus
    category: ComplaintCategory
    severity: Severity
    visit_id: VisitId | None = None
    compensation_amount: Amount | None = None
    satisfied_after: bool | None = None
    """Whether the customer ended up satisfied with the handling; only on close."""
    comment: Comment | None = None

    @model_validator(mode="after")
    def _satisfied_after_only_on_close(self) -> Self:
        if self.satisfied_after is not None and self.status != "closed":
            error = InitErrorDetails(
                type=PydanticCustomError(
                    "satisfied_after_not_closed",
                    "only allowed when status is 'closed' (got status {status})",
                    {"status": repr(self.status)},
                ),
                loc=("satisfied_after",),
                input=self.satisfied_after,
            )
            raise ValidationError.from_exception_data(type(self).__name__, [error])
        return self


AnyEvent: TypeAlias = VisitEvent | SurveyEvent | CallEvent | MysteryShopEvent | ComplaintEvent
"""Any validated event, as a plain union (for annotations)."""

Event = Annotated[AnyEvent, Field(discriminator="event_type")]
"""Any supported event; `event_type` picks the model."""

_EVENT_ADAPTER: Final[TypeAdapter[AnyEvent]] = TypeAdapter(Event)


# --- parsing -------------------------------------------------------------------


class InvalidEvent(ValueError):
    """An event that cannot be used; `reason` is one line, "<field path>: <rule>; ..."."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_MAX_REPORTED_ERRORS: Final[int] = 10
_MAX_SHOWN_CHARS: Final[int] = 60
_SIMPLE_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Our own error types: their messages already say what was received (or must not, PII).
_SELF_DESCRIBING_ERRORS: Final[frozenset[str]] = frozenset(
    {
        "pseudonymous_ref_pii",
        "pseudonymous_ref_format",
        "comment_too_long",
        "schema_version_unsupported",
        "scale_order",
        "occurred_at_future",
        "timestamp_range",
        "out_of_scale",
        "survey_empty",
        "call_not_reached",
        "audit_code_duplicate",
        "satisfied_after_not_closed",
        "event_id_placeholder",
        "missing",
        "extra_forbidden",
    }
)


def _json_type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _shown(value: object) -> str:
    """A short, single-line rendering of a received value."""
    if isinstance(value, dict | list):
        return _json_type_name(value)
    if value is None or isinstance(value, bool):  # as JSON spells them, not Python
        return "null" if value is None else str(value).lower()
    text = repr(value)
    if len(text) > _MAX_SHOWN_CHARS:
        text = text[: _MAX_SHOWN_CHARS - 1] + "…"
    return text


def _path(loc: tuple[int | str, ...]) -> str:
    parts = []
    for part in loc:
        text = str(part)
        parts.append(text if _SIMPLE_KEY.fullmatch(text) else _shown(text))
    return ".".join(parts)


def _rule(message: str) -> str:
    """Pydantic's "Input should be ..." phrased as a rule: "must be ..."."""
    message = message.removeprefix("Value error, ")
    return re.sub(r"^(?:Input|String|Dictionary|Value|Decimal|List) should ", "must ", message)


def _describe_error(error: Any) -> str:
    kind: str = error["type"]
    loc: tuple[int | str, ...] = tuple(error["loc"])
    ctx: dict[str, Any] = error.get("ctx") or {}
    received: object = error.get("input")
    if kind == "json_invalid":
        return f"not valid JSON: {ctx.get('error', error['msg'])}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tag = received.get("event_type") if isinstance(received, dict) else None
        if tag is None:
            return f"event_type: is required (supported: {', '.join(SUPPORTED_EVENT_TYPES)})"
        return f"unknown event_type {_shown(tag)}"
    # Errors inside a tagged union are located under the tag ("survey", "ratings", ...);
    # the tag is not a field of the payload.
    if loc and loc[0] in EVENT_TYPES:
        loc = loc[1:]
    if len(loc) >= 2 and loc[-1] == "[key]":
        where, key = _path(loc[:-2]), loc[-2]
        return f"{where}: key {_shown(key)} {_rule(error['msg'])}"
    where = _path(loc) or "event"
    if kind == "missing":
        return f"{where}: is required"
    if kind == "extra_forbidden":
        return f"{where}: unknown field, not allowed"
    if kind == "timezone_aware":
        example = "2024-05-01T10:00:00+08:00"
        return f"{where}: must be timezone-aware, e.g. {example} (got {_shown(received)})"
    if kind == "uuid_type":
        example = "3f2b9c1e-8a4d-4e6f-9b2a-1c3d5e7f9a0b"
        return f"{where}: must be a UUID string, e.g. {example} (got {_shown(received)})"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"{where}: must be a JSON object (got {_json_type_name(received)})"
    rule = _rule(error["msg"])
    if kind in _SELF_DESCRIBING_ERRORS or (loc and loc[0] in _PII_FIELDS):
        return f"{where}: {rule}"
    return f"{where}: {rule} (got {_shown(received)})"


def _reason(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    described = [_describe_error(error) for error in errors[:_MAX_REPORTED_ERRORS]]
    if len(errors) > _MAX_REPORTED_ERRORS:
        described.append(f"… and {len(errors) - _MAX_REPORTED_ERRORS} more errors")
    # Dict keys and JSON error texts come from the input: keep the reason on one line.
    return "; ".join(described).replace("\n", " ").replace("\r", " ") or "invalid event"


def encoding_problem(raw: bytes) -> str | None:
    """Why bytes are not UTF-8 JSON text at the byte level (a byte order mark, invalid
    UTF-8), or None. For input the JSON parser refused: its own message ("invalid
    unicode code point", "expected value at line 1 column 1") does not say so."""
    if raw.startswith(b"\xef\xbb\xbf"):
        return "starts with a byte order mark (EF BB BF); send JSON without one"
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "starts with a UTF-16 byte order mark; JSON must be UTF-8"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text ({exc.reason} 0x{raw[exc.start]:02x} at byte offset {exc.start})"
    return None


def parse_event(raw: bytes | str, *, now: datetime | None = None) -> AnyEvent:
    """Validate one raw event (a Kafka message value) into its model.

    `now` (timezone-aware, default: the current UTC time) is the clock `occurred_at`
    is checked against. Raises InvalidEvent, and nothing else, for any bad input.
    """
    if now is not None and now.tzinfo is None:
        # A caller bug, not bad input: failing loudly beats dead-lettering every event.
        raise ValueError("parse_event: `now` must be timezone-aware")
    if isinstance(raw, bytearray | memoryview):
        raw = bytes(raw)
    if isinstance(raw, str):
        if len(raw) > MAX_EVENT_BYTES:  # every character is at least one UTF-8 byte
            raise InvalidEvent(f"event is larger than {MAX_EVENT_BYTES} bytes")
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidEvent(f"not valid UTF-8 text: {exc.reason}") from None
    if not isinstance(raw, bytes):
        raise InvalidEvent(f"event must be bytes or str, got {type(raw).__name__}")
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent(f"event is larger than {MAX_EVENT_BYTES} bytes (got {len(raw)} bytes)")
    try:
        return _EVENT_ADAPTER.validate_json(raw, context={"now": now or datetime.now(UTC)})
    except ValidationError as exc:
        problem = encoding_problem(raw) if exc.errors()[0]["type"] == "json_invalid" else None
        raise InvalidEvent(f"not valid JSON: {problem}" if problem else _reason(exc)) from None
    except Exception as exc:
        # The stream must keep running whatever arrives: an unexpected failure becomes a
        # dead letter whose reason makes the bug visible instead of crashing the worker.
        raise InvalidEvent(f"internal error while validating: {type(exc).__name__}: {exc}") from exc


def event_to_json(event: AnyEvent) -> bytes:
    """Canonical JSON of a validated event; `parse_event` reads it back to an equal model."""
    return _EVENT_ADAPTER.dump_json(event)
