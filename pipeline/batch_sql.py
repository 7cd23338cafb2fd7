"""`csi metrics` at scale: the batch recompute in embedded ClickHouse (chdb).

The Python engine (`pipeline.batch.run_batch`) folds every line through the
stream's processors, some thousands of events per second. This engine builds
the same daily buckets — the same `Bucket.stats` keys and values — with a few
vectorised chdb queries over the file, and the figures come from the very same
Python code: `pipeline.batch.metrics_report` → `window_figures` →
`window_bucket` (window sums of daily buckets, carried complaint backlog) →
`metrics.figures`. SQL only produces sums and counts per dealer, department
and day; every figure formula stays in `pipeline/metrics.py`.

How the stream's decisions are reproduced, in file order:

1. **Scan** (`scan_sql`): `file(path, LineAsString)`; the line number is
   `_row_number + 1` (blank lines count, as in `enumerate`). A line is
   *plain* when SQL checks prove that `parse_event` accepts it and that SQL
   reads the values pydantic reads: JSON types (a regex on the raw line), no
   unknown or duplicate keys, required fields, string patterns and literals,
   scale bounds, RFC 3339 timestamps, everyday magnitudes. The checks are
   sufficient, not necessary: a line that is not plain — invalid, or merely
   unusual (a surrogate escape, a long comment, a timestamp without seconds) —
   goes to `DealerProcessor.validate`, the stream's own validation. Invalid
   lines become dead letters with the stream's reason; valid ones come back as
   the canonical JSON of the parsed event (`event_to_json`) and are scanned
   again under their line numbers. So every validation decision is the
   stream's. One plain line in SAMPLE_EVERY goes through pydantic too: a rule
   added to schemas/events.py that the checks lack stops the run
   (`SqlChecksOutdated`) instead of counting invalid events.
2. **Per-event statistics** come from the scan too, with SQL translations of
   the per-response rules of `Bucket.add_event` (rescale to 1–10, top-2 box,
   satisfied, NPS category, CSS verdict, on-time, greet wait, ...), each named
   after the function it mirrors; `tests/test_batch_sql.py` holds them equal
   to the Python rules on a grid of values, and the engines equal on messy data.
3. **Dedup and lateness**: a line counts when it is the first valid line with
   its (dealer, department, day, event_id) — the stream keeps event ids per
   daily bucket — and its day is at most `lateness_days` before the newest day
   of the same dealer and event type on earlier valid lines (a window function
   over line numbers). A duplicate or too-late line never raises that newest
   day, so this is the stream's running state.
4. **Joins** (`stream.join_event`): a reached call or a comeback belongs to
   the latest earlier visit with its visit id; one that came before any such
   visit is the stream's "pending" note, which every later visit with that id
   checks (the notes are never cleared). With one visit per id (the rule) that
   is: some partner within the days, a hash join; ids of several visits take
   an ASOF JOIN on line numbers. The loyalty matrix takes the customer's latest
   earlier sales survey (ASOF JOIN); a complaint's events in line order run
   the stream's state machine (arrays).
5. **Roll-ups**: a region, brand or network day bucket is the sum of its
   dealers' day buckets. A statistic is kept there when some dealer's value is
   not 0: the stream adds `new − old` per batch and `Bucket.minus` drops zeros.

Not identical to the Python engine: float sums are added in another order
(differences near 1e-15 relative). In a roll-up bucket, a statistic whose
dealer values were non-zero after one stream batch and 0 at the end (a
complaint opened and closed on the same day, its two events in different
batches of `pipeline.batch.CHUNK` lines) is absent here but present with 0
there; it shows only as a complaint backlog of None instead of 0 for a unit
whose first backlog change lies inside the window. Dead letters of too-late
lines carry their line number and the stream's reason but not their bytes.

With `since`, only the buckets of days from `since` on are built: the days
before are summed in SQL into one bucket on the day before `since`, holding
the complaint backlog they carry into any window that starts on or after
`since` (`carried_backlog` reads it like any other day), which also keeps
units with older data in the report. Dedup, lateness and complaints still
look at the whole file.
"""

from __future__ import annotations

import re
import tempfile
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from pipeline.alerts import AlertSettings
from pipeline.batch import BatchState, record_for_line
from pipeline.catalogue import RATER_DIMENSIONS, Catalogue
from pipeline.metrics import COMEBACK_DAYS, CSS_EPSILON, FOLLOW_UP_DAYS
from pipeline.registry import UNKNOWN, DealerRegistry
from pipeline.stream import (
    DEFAULT_LATENESS_DAYS,
    DeadLetter,
    DealerProcessor,
    DictStore,
    backlog_index_key,
    scope_bucket_key,
)
from pipeline.topics import CASE_ACTIONS, EVENT_TOPICS
from schemas import (
    EVENT_TYPES,
    CallEvent,
    ComplaintEvent,
    InvalidEvent,
    MysteryShopEvent,
    SurveyEvent,
    VisitEvent,
    event_to_json,
)
from schemas.events import FUTURE_TOLERANCE, LATEST_TIMESTAMP, MAX_EVENT_BYTES

TYPE_CODES: Final[dict[str, int]] = {name: i for i, name in enumerate(EVENT_TYPES, start=1)}
"""Event type → the small integer the SQL tables carry."""
VISIT, SURVEY, CALL, AUDIT, COMPLAINT = (
    TYPE_CODES[n] for n in ("visit", "survey", "call", "mystery_shop", "complaint")
)
DEPARTMENTS: Final[tuple[str, ...]] = ("service", "sales")
COMPLAINT_STATUSES: Final[tuple[str, ...]] = (
    "opened", "responded", "resolved", "closed", "reopened",
)  # fmt: skip
CSS_VERDICTS: Final[tuple[str, ...]] = ("exceeded", "met", "disappointed")
ACSI_ITEMS: Final[tuple[str, ...]] = ("overall", "disconfirmation", "ideal")

US_PER_DAY: Final[int] = 86_400_000_000
EPOCH: Final[datetime] = datetime(1970, 1, 1, tzinfo=UTC)
TABLE_ENGINE: Final[str] = "Memory SETTINGS compress = 1"
"""The run's own tables: in memory, LZ4-compressed (the facts of 10 million lines take
a few hundred MB), no parts to merge in the background."""
SAMPLE_EVERY: Final[int] = 997
"""One plain line in about this many is validated by pydantic as well."""

# Plain lines hold everyday values. These bounds lie well inside the schema's
# (MAX_AMOUNT, MIN_NONZERO_AMOUNT, MAX_SCALE_BOUND, MAX_AUDIT_WEIGHT, ...): a line near
# a limit, or a limit moved in schemas/events.py, is pydantic's to judge.
PLAIN_MAX_AMOUNT: Final[float] = 1e9
PLAIN_MIN_NONZERO: Final[float] = 0.01
"""Amounts, durations and the CSS expectation: 0, or at least this far from 0."""
PLAIN_MAX_SCALE_BOUND: Final[int] = 1000
PLAIN_AUDIT_WEIGHTS: Final[tuple[float, float]] = (0.001, 1000.0)
PLAIN_MAX_COMMENT_CHARS: Final[int] = 700
"""Scrubbing may lengthen a comment (a placeholder such as "[plate]" can replace one
character) past MAX_COMMENT_CHARS: longer ones are pydantic's."""

# --- the event schema as the SQL checks see it ---------------------------------------

EVENT_MODELS: Final[dict[str, Any]] = {
    "visit": VisitEvent,
    "survey": SurveyEvent,
    "call": CallEvent,
    "mystery_shop": MysteryShopEvent,
    "complaint": ComplaintEvent,
}
JSON_KINDS: Final[dict[str, str]] = {
    # envelope
    "event_id": "string", "event_type": "string", "schema_version": "int",
    "dealer_id": "string", "department": "string", "occurred_at": "string",
    "customer_ref": "string", "source": "string",
    # visit
    "visit_id": "string", "appointment": "bool", "arrived_at": "string",
    "greeted_at": "string", "promised_at": "string", "delivered_at": "string",
    "estimate_amount": "number", "invoice_amount": "number", "comeback_of": "string",
    # survey and call
    "channel": "string", "scale": "object", "ratings": "object", "overall": "number",
    "expectation": "number", "perception": "number", "return_intent": "number",
    "disconfirmation": "number", "ideal": "number", "expectations": "object",
    "recommend": "int", "comment": "string", "outcome": "string", "duration_s": "number",
    "satisfaction_confirmed": "bool", "issue_reported": "bool",
    # mystery shop
    "audit_id": "string", "scenario": "string", "items": "array", "pass_mark": "number",
    "auditor_ref": "string",
    # complaint
    "complaint_id": "string", "status": "string", "category": "string", "severity": "int",
    "compensation_amount": "number", "satisfied_after": "bool",
}  # fmt: skip
"""The JSON type of every field of every event model (the test checks it against them)."""
NESTED_JSON_KINDS: Final[dict[str, str]] = {
    "min": "int", "max": "int",  # scale
    "code": "string", "section": "string", "weight": "number", "result": "string",
    "mandatory": "bool",  # audit items
}  # fmt: skip
LITERALS: Final[dict[str, tuple[str, ...]]] = {
    "department": DEPARTMENTS,
    "source": ("dms", "survey_vendor", "call_centre", "auditor", "web"),
    "channel": ("web", "sms", "email", "phone", "app"),
    "outcome": ("reached", "no_answer", "refused", "wrong_number", "callback_requested"),
    "scenario": (
        "service_visit", "phone_inquiry", "sales_visit", "online_inquiry", "vehicle_delivery",
    ),
    "status": COMPLAINT_STATUSES,
    "category": (
        "waiting_time", "price", "repair_quality", "attitude", "promise_broken", "parts",
        "communication", "other",
    ),
}  # fmt: skip
"""The Literal types of schemas/events.py (the test checks them against the models)."""
_EXTRACT_TYPE = {
    "string": "Nullable(String)",
    "int": "Nullable(Int64)",
    "number": "Nullable(Float64)",
    "bool": "Nullable(Bool)",
}
_TIMESTAMPS = ("occurred_at", "arrived_at", "greeted_at", "promised_at", "delivered_at")
_EXTERNAL_IDS = ("visit_id", "comeback_of", "audit_id", "complaint_id")
_AMOUNTS = ("estimate_amount", "invoice_amount", "duration_s", "compensation_amount")
_UUID_RE = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
_PLACEHOLDER_UUIDS = (
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
)
_DEALER_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$"
_REF_RE = r"^[A-Za-z0-9_-]{8,128}$"
_CODE_RE = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
_INT_RE = r"^-?[0-9]{1,15}$"
_NUMBER_RE = r"^-?[0-9]"
_SURROGATE_ESCAPE_RE = r"\\u[dD][89a-fA-F]"
_TS_RE = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?"
    r"(Z|[+-][0-9]{2}:[0-9]{2})$"
)


def _fields(event_type: str) -> dict[str, Any]:
    fields: dict[str, Any] = EVENT_MODELS[event_type].model_fields
    return fields


def _required(event_type: str, name: str) -> bool:
    """Must be present, and not null (the discriminator too)."""
    return name == "event_type" or bool(_fields(event_type)[name].is_required())


def _nullable(event_type: str, name: str) -> bool:
    info = _fields(event_type)[name]
    return not info.is_required() and info.default is None and info.default_factory is None


# --- SQL text ----------------------------------------------------------------------------


def sql_string(text: str) -> str:
    """A ClickHouse string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def sql_array(values: Sequence[str | int | float]) -> str:
    return "[" + ", ".join(sql_string(v) if isinstance(v, str) else repr(v) for v in values) + "]"


def _f(name: str) -> str:
    """A top-level field as the typed extraction read it (NULL: null or absent)."""
    return f"f_{name}"


def _and(conditions: Sequence[str]) -> str:
    return " AND ".join(f"({c})" for c in conditions)


def _micros(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)


def type_violation_regex() -> str:
    """A JSON value of the wrong type for its key anywhere in the line, or a number that
    would not read back (it would read as null). A false alarm (a rating code named
    like a field) only sends the line to pydantic."""
    by_kind: dict[str, list[str]] = {}
    for name, kind in (*JSON_KINDS.items(), *NESTED_JSON_KINDS.items()):
        by_kind.setdefault(kind, []).append(re.escape(name))

    def key(kind: str) -> str:
        return '"(?:' + "|".join(sorted(by_kind[kind])) + r')"\s*:\s*'

    return "|".join(
        [
            key("string") + r'[^"n\s]',
            key("number") + r"[^-0-9n\s]",
            key("int") + r"[^-0-9n\s]",
            key("int") + r"-?[0-9]*[.eE]",  # strict: 9.0 is not an int
            key("int") + r"-?[0-9]{16}",
            key("bool") + r"[^tfn\s]",
            key("object") + r"[^{\s]",  # null too: scale, ratings, expectations have defaults
            key("array") + r"[^\[\s]",
            r"[:,\[]\s*-?[0-9.]+[eE]\+?[0-9]{3}",  # 1e400: infinite
            r"[:,\[]\s*-?[0-9]{40}",
        ]
    )


# --- SQL translations of the per-event rules of pipeline/metrics.py and stream.py -----


def rescale_to_10_sql(x: str, lo: str, hi: str) -> str:
    """`metrics.rescale_to_10`, in the same operation order (hence the same float)."""
    return f"(1.0 + ((9.0 * ({x} - {lo})) / ({hi} - {lo})))"


def is_top2_sql(x: str, hi: str) -> str:
    """`metrics.is_top2`."""
    return f"({x} >= ({hi} - 1))"


def is_satisfied_sql(x: str, lo: str, hi: str) -> str:
    """`metrics.is_satisfied`."""
    return f"((({x} - {lo}) / ({hi} - {lo})) >= 0.5)"


def nps_category_sql(recommend: str) -> str:
    """`metrics.nps_category`: 1 promoter, 2 passive, 3 detractor."""
    return f"multiIf({recommend} >= 9, 1, {recommend} <= 6, 3, 2)"


def css_verdict_sql(ratio: str) -> str:
    """`metrics.css_verdict`: the 1-based index into CSS_VERDICTS."""
    return f"multiIf({ratio} > {1.0 + CSS_EPSILON!r}, 1, {ratio} < {1.0 - CSS_EPSILON!r}, 3, 2)"


def within_sql(later_us: str, earlier_us: str, days: int) -> str:
    """`stream._within`: 0 ≤ later − earlier ≤ days (microseconds)."""
    return f"(({later_us}) - ({earlier_us}) BETWEEN 0 AND {days * US_PER_DAY})"


def minutes_sql(later_us: str, earlier_us: str) -> str:
    """`max(int((later − earlier).total_seconds() // 60), 0)` of `stream._note_complaint`."""
    return f"greatest(intDiv(({later_us}) - ({earlier_us}), 60000000), 0)"


# --- the scan: one row of facts per line --------------------------------------------------


def _timestamp_layers(name: str) -> list[list[str]]:
    """Columns `<p>_ok` (well formed) and `<p>_us` (UTC microseconds; NULL for NULL) of
    an RFC 3339 timestamp field, p its name without "_at", in integer arithmetic (no
    time zone database): what pydantic reads, to the microsecond. Three layers."""
    s, p = _f(name), name.removesuffix("_at")
    digits = (("y", 1, 4), ("mo", 6, 2), ("d", 9, 2), ("hh", 12, 2), ("mi", 15, 2), ("ss", 18, 2))
    parts = [f"toInt64OrZero(substring({s}, {at}, {n})) AS {p}_{part}" for part, at, n in digits]
    parts.append(
        f"if(endsWith(coalesce({s}, ''), 'Z'), 'Z', right(coalesce({s}, ''), 6)) AS {p}_zone"
    )
    fraction_chars = f"length({s}) - 20 - length({p}_zone)"
    derived = [
        f"makeDate32({p}_y, {p}_mo, {p}_d) AS {p}_date",
        f"if(substring({s}, 20, 1) = '.', substring({s}, 21, {fraction_chars}), '')"
        f" AS {p}_fraction",
        f"toInt64OrZero(substring({p}_zone, 2, 2)) AS {p}_zone_h",
        f"toInt64OrZero(substring({p}_zone, 5, 2)) AS {p}_zone_m",
        f"if({p}_zone = 'Z', 0, if(startsWith({p}_zone, '-'), -1, 1)) AS {p}_zone_sign",
    ]
    well_formed = _and(
        [
            f"match(coalesce({s}, ''), {sql_string(_TS_RE)})",
            f"toYear({p}_date) = {p}_y AND toMonth({p}_date) = {p}_mo",
            f"toDayOfMonth({p}_date) = {p}_d",  # makeDate32 wraps 30 February round
            f"{p}_hh < 24 AND {p}_mi < 60 AND {p}_ss < 60 AND {p}_zone_h < 24 AND {p}_zone_m < 60",
        ]
    )
    seconds = (
        f"toInt64(toInt32({p}_date)) * 86400 + {p}_hh * 3600 + {p}_mi * 60 + {p}_ss "
        f"- {p}_zone_sign * ({p}_zone_h * 3600 + {p}_zone_m * 60)"
    )
    micros = f"if({p}_fraction = '', 0, toInt64OrZero(rightPad({p}_fraction, 6, '0')))"
    result = [
        f"{well_formed} AS {p}_ok",
        f"if({s} IS NULL, NULL, ({seconds}) * 1000000 + {micros}) AS {p}_us",
    ]
    return [parts, derived, result]


def _scan_layers(catalogue: Catalogue) -> list[list[str]]:
    """What the scan reads from a line, as nested SELECTs (`expr AS name`): each layer
    uses the columns of the ones before, so every expression is written once."""
    codes = list(catalogue.attribute_factor)
    factor_of = [catalogue.factors.index(catalogue.attribute_factor[c]) + 1 for c in codes]
    dimension_of = [RATER_DIMENSIONS.index(catalogue.attribute_dimension[c]) + 1 for c in codes]
    scalars = [n for n, k in JSON_KINDS.items() if k in _EXTRACT_TYPE]
    # objects and arrays come back as their (minified) JSON text, which is parsed again
    # below: small texts instead of the whole line
    nested = [n for n, k in JSON_KINDS.items() if k in ("object", "array")]
    typed = [f"{n} {_EXTRACT_TYPE[JSON_KINDS[n]]}" for n in scalars] + [
        f"{n} String" for n in nested
    ]
    item = (
        "Tuple(code Nullable(String), section Nullable(String), weight Nullable(Float64), "
        "result Nullable(String), mandatory Nullable(Bool))"
    )
    parse = [
        "JSONExtractKeys(line) AS keys",
        f"JSONExtract(line, {sql_string('Tuple(' + ', '.join(typed) + ')')}) AS j",
    ]
    fields = [f"tupleElement(j, {sql_string(n)}) AS {_f(n)}" for n in scalars + nested]
    coded = [
        f"transform(coalesce({_f('event_type')}, ''), {sql_array(list(TYPE_CODES))}, "
        f"{sql_array(list(TYPE_CODES.values()))}, 0) AS type_code",
        f"if({_f('department')} IS NULL, 1, transform(assumeNotNull({_f('department')}), "
        f"{sql_array(list(DEPARTMENTS))}, [1, 2], 0)) AS dept_code",
        f"transform(coalesce({_f('status')}, ''), {sql_array(list(COMPLAINT_STATUSES))}, "
        "[1, 2, 3, 4, 5], 0) AS status_code",
    ]
    # numbers are read by the JSON parser (exactly); raw texts only tell their JSON type
    nested_raw = [
        f"JSONExtractKeysAndValuesRaw({_f('scale')}) AS scale_kv",
        f"JSONExtractKeysAndValuesRaw({_f('ratings')}) AS rating_kv",
        f"JSONExtractKeysAndValues({_f('ratings')}, 'Float64').2 AS rating_numbers",
        f"JSONExtractKeysAndValuesRaw({_f('expectations')}) AS expect_kv",
        f"JSONExtractKeysAndValues({_f('expectations')}, 'Float64').2 AS expect_numbers",
        f"JSONExtractArrayRaw({_f('items')}) AS item_raws",
    ]
    values = [
        # scale: {"min": int, "max": int}, both optional (1 and 10)
        f"arrayAll(kv -> kv.1 IN ('min', 'max') AND match(kv.2, {sql_string(_INT_RE)}), scale_kv)"
        " AND length(arrayDistinct(scale_kv.1)) = length(scale_kv) AS scale_ok",
        "if(has(scale_kv.1, 'min'), toInt64OrZero(scale_kv.2[indexOf(scale_kv.1, 'min')]), 1)"
        " AS lo",
        "if(has(scale_kv.1, 'max'), toInt64OrZero(scale_kv.2[indexOf(scale_kv.1, 'max')]), 10)"
        " AS hi",
        # ratings and expectations: {code: number}; a value the parser could not read as a
        # number is left out of its array, so the lengths differ (never plain then)
        "rating_kv.1 AS rating_codes",
        "rating_kv.2 AS rating_raws",
        "length(rating_numbers) = length(rating_kv) "
        "AND length(expect_numbers) = length(expect_kv) AS numbers_ok",
        "if(length(rating_numbers) = length(rating_kv), rating_numbers, "
        "arrayMap(kv -> 0., rating_kv)) AS rating_values",
        "expect_kv.1 AS expect_codes",
        "expect_kv.2 AS expect_raws",
        "if(length(expect_numbers) = length(expect_kv), expect_numbers, "
        "arrayMap(kv -> 0., expect_kv)) AS expect_values",
        f"{_f('overall')} AS overall",
        # Bucket.add_event: a survey, or a call that carries ratings, is a response
        f"type_code = {SURVEY} OR (type_code = {CALL} "
        f"AND (length(rating_kv) > 0 OR {_f('overall')} IS NOT NULL)) AS is_response",
        f"arrayMap(c -> transform(c, {sql_array(codes)}, {sql_array(factor_of)}, 0), "
        "rating_kv.1) AS rating_factor",
        # SERVQUAL: an expectation counts with a catalogue dimension and a rating of its code
        f"arrayMap(c -> transform(c, {sql_array(codes)}, {sql_array(dimension_of)}, 0), "
        "expect_kv.1) AS expect_dim",
        "arrayMap(c -> has(rating_kv.1, c), expect_kv.1) AS expect_rated",
        "arrayMap(i -> JSONExtractKeys(i), item_raws) AS item_keys",
        f"arrayMap(i -> JSONExtract(i, {sql_string(item)}), item_raws) AS items",
    ]
    rating_of = "rating_values[indexOf(rating_codes, c)]"
    derived = [
        f"arrayMap(v -> {rescale_to_10_sql('v', 'lo', 'hi')}, rating_values) AS x10",
        f"arrayMap((c, e) -> {rescale_to_10_sql(rating_of, 'lo', 'hi')} "
        f"- {rescale_to_10_sql('e', 'lo', 'hi')}, expect_codes, expect_values) AS gaps",
        "arrayMap(i -> coalesce(i.1, ''), items) AS item_code",
        "arrayMap(i -> coalesce(i.2, ''), items) AS item_section",
        "arrayMap(i -> coalesce(i.3, 0), items) AS item_weight",
        "arrayMap(i -> coalesce(i.4, ''), items) AS item_result",
        "arrayMap(i -> isNull(i.5), items) AS item_mandatory_null",
        "arrayMap(i -> coalesce(i.5, false), items) AS item_mandatory",
    ]
    ts = [_timestamp_layers(n) for n in _TIMESTAMPS]
    ts_parts, ts_derived, ts_result = ([c for t in ts for c in t[k]] for k in range(3))
    return [parse, fields, coded + ts_parts, nested_raw + ts_derived, values + ts_result, derived]


def _reading_checks() -> list[str]:
    """What any line needs to be read here, trusted (canonical JSON) or not."""
    numbers = f"match(r, {sql_string(_NUMBER_RE)}) AND isFinite(v)"
    return [
        "type_code > 0",
        f"{_f('occurred_at')} IS NOT NULL",
        *(f"({_f(n)} IS NULL OR {n.removesuffix('_at')}_ok)" for n in _TIMESTAMPS),
        f"type_code NOT IN ({SURVEY}, {CALL}) OR (numbers_ok "
        f"AND arrayAll((r, v) -> {numbers}, rating_raws, rating_values) "
        f"AND arrayAll((r, v) -> {numbers}, expect_raws, expect_values) AND scale_ok AND lo < hi)",
    ]


def _literal(name: str) -> str:
    return f"{_f(name)} IN ({', '.join(sql_string(v) for v in LITERALS[name])})"


def _null_or(name: str, condition: str) -> str:
    return f"{_f(name)} IS NULL OR ({condition})"


def _ref_ok(name: str) -> str:
    """A pseudonymous ref with a letter or "_" in it, so it cannot look like a phone."""
    value = f"coalesce({_f(name)}, '')"
    return f"match({value}, {sql_string(_REF_RE)}) AND match({value}, '[A-Za-z_]')"


def _chars(name: str) -> str:
    return f"lengthUTF8(assumeNotNull({_f(name)}))"


def _zero_or_between(value: str, low: float, high: float) -> str:
    return f"{value} = 0 OR {value} BETWEEN {low!r} AND {high!r}"


def _codes_ok(codes: str) -> str:
    return (
        f"arrayAll(k -> match(k, {sql_string(_CODE_RE)}), {codes}) "
        f"AND length(arrayDistinct({codes})) = length({codes}) AND length({codes}) <= 200"
    )


def _on_scale(name: str) -> str:
    return _null_or(name, f"isFinite(assumeNotNull({_f(name)})) AND {_f(name)} BETWEEN lo AND hi")


def _envelope_checks(registry: DealerRegistry | None, now: datetime) -> list[str]:
    """Every type: the line, its keys, the JSON types and the envelope's fields."""
    names = list(JSON_KINDS)

    def mask(test: Callable[[str, str], bool]) -> str:
        return sql_array([sum(1 << c for e, c in TYPE_CODES.items() if test(e, n)) for n in names])

    allowed = mask(lambda e, n: n in _fields(e))
    required = mask(lambda e, n: n in _fields(e) and _required(e, n))
    required_count = sql_array([sum(_required(e, n) for n in _fields(e)) for e in TYPE_CODES])
    latest_us = _micros(LATEST_TIMESTAMP) - 1
    checks = [
        "isValidUTF8(line)",
        "NOT startsWith(line, '\\xEF\\xBB\\xBF')",  # a byte order mark
        f"length(line) <= {MAX_EVENT_BYTES}",
        # a surrogate escape (a pair, or a lone one pydantic refuses) is pydantic's to read
        f"NOT match(line, {sql_string(_SURROGATE_ESCAPE_RE)})",
        "isValidJSON(line)",
        "length(arrayDistinct(keys)) = length(keys)",
        f"arrayAll(k -> bitTest(transform(k, {sql_array(names)}, {allowed}, 0), type_code), keys)",
        f"arrayCount(k -> bitTest(transform(k, {sql_array(names)}, {required}, 0), type_code), "
        f"keys) = {required_count}[type_code]",
        f"NOT match(line, {sql_string(type_violation_regex())})",
        f"match(coalesce({_f('event_id')}, ''), {sql_string(_UUID_RE)})",
        f"{_f('event_id')} NOT IN ({', '.join(sql_string(u) for u in _PLACEHOLDER_UUIDS)})",
        f"{_f('schema_version')} = 1",
        f"match(coalesce({_f('dealer_id')}, ''), {sql_string(_DEALER_RE)})",
        _null_or("department", _literal("department")),
        _ref_ok("customer_ref"),
        _literal("source"),
        f"occurred_us BETWEEN 0 AND {min(_micros(now + FUTURE_TOLERANCE), latest_us)}",
        *(
            _null_or(n, f"{n.removesuffix('_at')}_us BETWEEN 0 AND {latest_us}")
            for n in _TIMESTAMPS
        ),
        *(_null_or(n, f"{_chars(n)} BETWEEN 1 AND 128") for n in _EXTERNAL_IDS),
        _null_or("comment", f"{_chars('comment')} <= {PLAIN_MAX_COMMENT_CHARS}"),
        *(
            _null_or(n, _zero_or_between(_f(n), PLAIN_MIN_NONZERO, PLAIN_MAX_AMOUNT))
            for n in _AMOUNTS
        ),
    ]
    if registry is not None:
        dealers = ", ".join(sql_string(d) for d in registry) or "''"
        checks.append(f"{_f('dealer_id')} IN ({dealers})")
    return checks


def _type_checks() -> str:
    """The fields of each event type."""
    scaled = [
        _codes_ok("rating_codes"),
        "arrayAll(v -> v BETWEEN lo AND hi, rating_values)",
        f"greatest(abs(lo), abs(hi)) <= {PLAIN_MAX_SCALE_BOUND}",
        _on_scale("overall"),
    ]
    low, high = PLAIN_AUDIT_WEIGHTS
    by_type = {
        SURVEY: [
            *scaled,
            _literal("channel"),
            *map(_on_scale, ("expectation", "perception", "return_intent", *ACSI_ITEMS[1:])),
            _null_or("recommend", f"{_f('recommend')} BETWEEN 0 AND 10"),
            _null_or("expectation", _zero_or_between(f"abs({_f('expectation')})", PLAIN_MIN_NONZERO,
                                                     PLAIN_MAX_AMOUNT)),
            f"NOT (empty(rating_codes) AND {_f('overall')} IS NULL AND {_f('recommend')} IS NULL)",
            _codes_ok("expect_codes"),
            "arrayAll(v -> v BETWEEN lo AND hi, expect_values)",
        ],
        CALL: [
            *scaled,
            _literal("outcome"),
            f"{_f('outcome')} = 'reached' OR (empty(rating_codes) AND {_f('overall')} IS NULL)",
        ],
        AUDIT: [
            _literal("scenario"),
            "length(item_raws) BETWEEN 1 AND 300",
            "arrayAll(k -> length(k) = length(arrayDistinct(k)) "
            "AND hasAll(['code', 'section', 'weight', 'result', 'mandatory'], k), item_keys)",
            f"arrayAll(c -> match(c, {sql_string(_CODE_RE)}), item_code)",
            f"arrayAll(s -> match(s, {sql_string(_CODE_RE)}), item_section)",
            "length(arrayDistinct(item_code)) = length(item_code)",
            f"arrayAll(w -> w BETWEEN {low!r} AND {high!r}, item_weight)",
            "arrayAll(r -> r IN ('pass', 'fail', 'na'), item_result)",
            "arrayAll((k, n) -> NOT (has(k, 'mandatory') AND n), item_keys, item_mandatory_null)",
            _null_or("pass_mark", f"{_f('pass_mark')} BETWEEN 0 AND 100"),
            _null_or("auditor_ref", _ref_ok("auditor_ref")),
        ],
        COMPLAINT: [
            _literal("status"),
            _literal("category"),
            f"{_f('severity')} BETWEEN 1 AND 4",
            _null_or("satisfied_after", f"{_f('status')} = 'closed'"),
        ],
    }  # fmt: skip
    branches = []
    for event_type, code in TYPE_CODES.items():
        present = [
            f"{_f(n)} IS NOT NULL"
            if _required(event_type, n)
            else f"NOT (has(keys, {sql_string(n)}) AND {_f(n)} IS NULL)"  # null, not absent
            for n in _fields(event_type)
            if JSON_KINDS[n] in _EXTRACT_TYPE and not _nullable(event_type, n)
        ]
        branches.append(f"type_code = {code}, {_and(present + by_type.get(code, []))}")
    return f"multiIf({', '.join(branches)}, 0)"


def plain_sql(registry: DealerRegistry | None, now: datetime, *, trusted: bool) -> str:
    """The plain flag. Trusted lines (canonical JSON of events pydantic accepted) need
    only what reading needs."""
    if trusted:
        return _and(_reading_checks())
    return _and([*_reading_checks(), *_envelope_checks(registry, now), _type_checks()])


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    expr: str


def _identity_columns() -> list[Column]:
    """What dedup, lateness and the joins need."""

    def only(types: Sequence[int], name: str) -> str:
        return f"if(type_code IN ({', '.join(map(str, types))}), coalesce({_f(name)}, ''), '')"

    return [
        Column("row", "UInt64", "row"),
        Column("plain", "UInt8", "plain"),
        # the line, for pydantic: every line that is not plain, and a sample of the others
        Column("raw", "String", f"if(plain AND cityHash64(row) % {SAMPLE_EVERY} != 0, '', line)"),
        Column("type", "UInt8", "type_code"),
        Column("dealer", "LowCardinality(String)", f"coalesce({_f('dealer_id')}, '')"),
        Column("dept", "UInt8", "dept_code"),
        Column("occ_us", "Int64", "coalesce(occurred_us, 0)"),
        Column("day", "Date", f"toDate('1970-01-01') + toInt32(intDiv(occ_us, {US_PER_DAY}))"),
        Column("event_id", "UUID", f"toUUIDOrZero(coalesce({_f('event_id')}, ''))"),
        Column("customer_ref", "String", only([SURVEY], "customer_ref")),
        Column("visit_id", "String", only([VISIT, CALL], "visit_id")),
        Column("comeback_of", "String", only([VISIT], "comeback_of")),
        Column("arrived", "Int64", "coalesce(arrived_us, 0)"),
        Column("delivered", "Nullable(Int64)", "delivered_us"),
        Column("complaint_id", "String", only([COMPLAINT], "complaint_id")),
        Column("status", "UInt8", "status_code"),
        Column("severity", "UInt8", f"toUInt8(coalesce({_f('severity')}, 0) % 256)"),
        # the loyalty matrix (stream._note_loyalty)
        Column("has_overall", "UInt8", "overall IS NOT NULL"),
        Column("satisfied", "UInt8", f"coalesce({is_satisfied_sql('overall', 'lo', 'hi')}, 0)"),
        Column("has_return_intent", "UInt8", f"{_f('return_intent')} IS NOT NULL"),
        Column("return_high", "UInt8", f"coalesce({is_top2_sql(_f('return_intent'), 'hi')}, 0)"),
    ]


def _response_columns(catalogue: Catalogue) -> list[Column]:
    """`Bucket._add_response` and `_add_survey_extras` of one line."""
    columns = [
        Column("surveys", "UInt8", f"type_code = {SURVEY}"),
        Column("responses", "UInt8", "is_response"),
    ]
    weights = [catalogue.factor_weights[f] for f in catalogue.factors]
    for i in range(1, len(weights) + 1):
        of_factor = f"arrayFilter((x, f) -> f = {i}, x10, rating_factor)"
        columns += [
            Column(f"fn_{i}", "UInt16", f"if(is_response, arrayCount(f -> f = {i}, rating_factor),"
                   " 0)"),
            Column(f"fs_{i}", "Float64", f"if(is_response, arraySum({of_factor}), 0)"),
            Column(f"fq_{i}", "Float64", f"if(is_response, arraySum(x -> x * x, {of_factor}), 0)"),
        ]  # fmt: skip
    # metrics.response_csi: 100·mean(x10) per factor rated, weighted by the factor weights
    indices = [
        f"if(fn_{i} > 0, {w!r} * ((100.0 * fs_{i}) / fn_{i}), 0)" for i, w in enumerate(weights, 1)
    ]
    weight = [f"if(fn_{i} > 0, {w!r}, 0)" for i, w in enumerate(weights, 1)]
    rated = " OR ".join(f"fn_{i} > 0" for i in range(1, len(weights) + 1))
    columns += [
        Column("csi_n", "UInt8", f"is_response AND ({rated})"),
        Column("csi_s", "Float64", f"if(csi_n, ({' + '.join(indices)}) / ({' + '.join(weight)}),"
               " 0)"),
        Column("overall_n", "UInt8", "is_response AND overall IS NOT NULL"),
        Column("overall_top2", "UInt8", f"overall_n AND coalesce({is_top2_sql('overall', 'hi')},"
               " 0)"),
        Column("overall_satisfied", "UInt8", "overall_n AND satisfied"),
    ]  # fmt: skip
    for k, item in enumerate(ACSI_ITEMS, 1):
        x10 = rescale_to_10_sql(f"assumeNotNull({_f(item)})", "lo", "hi")
        columns += [
            Column(f"acsi_n_{k}", "UInt8", f"type_code = {SURVEY} AND {_f(item)} IS NOT NULL"),
            Column(f"acsi_s_{k}", "Float64", f"if(acsi_n_{k}, {x10}, 0)"),
        ]
    recommend = f"assumeNotNull({_f('recommend')})"
    ratio = f"(assumeNotNull({_f('perception')}) / assumeNotNull({_f('expectation')}))"
    columns += [
        Column("nps_n", "UInt8", f"type_code = {SURVEY} AND {_f('recommend')} IS NOT NULL"),
        Column("promoters", "UInt8", f"nps_n AND {nps_category_sql(recommend)} = 1"),
        Column("detractors", "UInt8", f"nps_n AND {nps_category_sql(recommend)} = 3"),
        # "a ratio needs a positive expectation": the expectation is truthy
        Column("css_n", "UInt8", f"type_code = {SURVEY} AND {_f('perception')} IS NOT NULL "
               f"AND coalesce({_f('expectation')}, 0) != 0"),
        Column("css_s", "Float64", f"if(css_n, {ratio}, 0)"),
        Column("css_verdict", "UInt8", f"if(css_n, {css_verdict_sql(ratio)}, 0)"),
    ]  # fmt: skip
    for d in range(1, len(RATER_DIMENSIONS) + 1):
        counts = f"arrayMap((i, ok) -> i = {d} AND ok, expect_dim, expect_rated)"
        gaps = f"arrayMap((g, i, ok) -> if(i = {d} AND ok, g, 0), gaps, expect_dim, expect_rated)"
        columns += [
            Column(f"sq_n_{d}", "UInt16", f"if(type_code = {SURVEY}, arraySum({counts}), 0)"),
            Column(f"sq_s_{d}", "Float64", f"if(type_code = {SURVEY}, arraySum({gaps}), 0)"),
        ]
    return columns


def _other_columns() -> list[Column]:
    """`Bucket._add_visit`, `_add_call`, `_add_complaint` and `_add_audit` of one line."""
    estimate, invoice = _f("estimate_amount"), _f("invoice_amount")
    closed = COMPLAINT_STATUSES.index("closed") + 1
    # timedelta.total_seconds() is microseconds / 10**6, correctly rounded; then / 60
    greet_min = (
        "(toFloat64(assumeNotNull(greeted_us) - assumeNotNull(arrived_us)) / 1000000.0) / 60.0"
    )
    not_na = "arrayFilter(r -> r != 'na', item_result)"
    return [
        Column("visits", "UInt8", f"type_code = {VISIT}"),
        Column("on_time_n", "UInt8", "visits AND promised_us IS NOT NULL "
               "AND delivered_us IS NOT NULL"),
        Column("on_time", "UInt8", "on_time_n AND delivered_us <= promised_us"),
        Column("greet_n", "UInt8", "visits AND greeted_us IS NOT NULL"),
        Column("greet_min", "Float64", f"if(greet_n, {greet_min}, 0)"),
        Column("inv_n", "UInt8", f"visits AND coalesce({estimate}, 0) != 0 "
               f"AND {invoice} IS NOT NULL"),
        Column("inv_s", "Float64", f"if(inv_n, assumeNotNull({invoice}) "
               f"/ assumeNotNull({estimate}), 0)"),
        Column("comebacks", "UInt8", f"visits AND {_f('comeback_of')} IS NOT NULL"),
        Column("calls", "UInt8", f"type_code = {CALL}"),
        Column("reached", "UInt8", f"calls AND {_f('outcome')} = 'reached'"),
        Column("calls_issue", "UInt8", f"calls AND coalesce({_f('issue_reported')}, false)"),
        Column("recovery_n", "UInt8", f"status_code = {closed} "
               f"AND {_f('satisfied_after')} IS NOT NULL"),
        Column("recovered", "UInt8", f"recovery_n AND coalesce({_f('satisfied_after')}, false)"),
        Column("audits", "UInt8", f"type_code = {AUDIT}"),
        # the audit items that are not N/A: section, weight, passed; mandatory and failed
        Column("item_sections", "Array(String)",
               "arrayFilter((s, r) -> r != 'na', item_section, item_result)"),
        Column("item_weights", "Array(Float64)",
               "arrayFilter((w, r) -> r != 'na', item_weight, item_result)"),
        Column("item_passed", "Array(UInt8)", f"arrayMap(r -> r = 'pass', {not_na})"),
        Column("item_mandatory_failed", "UInt16",
               "arrayCount((m, r) -> m AND r = 'fail', item_mandatory, item_result)"),
    ]  # fmt: skip


def fact_columns(catalogue: Catalogue) -> list[Column]:
    """The facts table: one row per line."""
    return [*_identity_columns(), *_response_columns(catalogue), *_other_columns()]


def scan_sql(
    source: str,
    catalogue: Catalogue,
    registry: DealerRegistry | None,
    now: datetime,
    *,
    trusted: bool,
) -> str:
    """SELECT the facts of every line of `source`, a subquery giving `row` and `line`."""
    plain = plain_sql(registry, now, trusted=trusted)
    exprs = {c.name: c.expr for c in fact_columns(catalogue) if c.name not in ("row", "plain")}
    if trusted:  # pydantic has seen these lines; one SQL cannot read is a bug, marked "\n"
        exprs["raw"] = "if(plain, '', '\\n')"
    query = f"SELECT row, line FROM ({source})"
    for layer in _scan_layers(catalogue):
        query = f"SELECT *, {', '.join(layer)} FROM ({query})"
    outer = ", ".join(f"{expr} AS {name}" for name, expr in exprs.items())
    # Without short-circuit evaluation every check runs on every line, which is cheap:
    # with it, each branch of multiIf copies every column it reads (the line too); every
    # function here is total. pread: the default mmap counts the file in this process.
    return (
        f"SELECT row, toUInt8({plain}) AS plain, {outer} FROM ({query}) SETTINGS "
        "short_circuit_function_evaluation = 'disable', storage_file_read_method = 'pread'"
    )


# --- statistics per dealer-day -------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """One Bucket statistic as SQL over a dealer-day's counted facts: its value, and a
    count that is > 0 when the stream would have added it (Bucket.add keeps a key
    even when it adds 0)."""

    name: str
    value: str
    present: str


def _counted(stat: str, column: str, present: str | None = None) -> Stat:
    value = f"sum({column})"
    return Stat(stat, value, present or value)


def direct_stats(catalogue: Catalogue) -> list[Stat]:
    """The statistics of `Bucket.add_event`."""
    stats = [_counted("surveys", "surveys"), _counted("responses", "responses")]
    for i, factor in enumerate(catalogue.factors, 1):
        n = f"sum(fn_{i})"
        stats += [
            _counted(f"factor_n:{factor}", f"fn_{i}"),
            _counted(f"factor_sum:{factor}", f"fs_{i}", n),
            _counted(f"factor_sumsq:{factor}", f"fq_{i}", n),
        ]
    stats += [
        _counted("csi_resp_n", "csi_n"),
        _counted("csi_resp_sum", "csi_s", "sum(csi_n)"),
        _counted("csi_resp_sumsq", "csi_s * csi_s", "sum(csi_n)"),
        _counted("overall_n", "overall_n"),
        _counted("overall_top2", "overall_top2", "sum(overall_n)"),
        _counted("overall_satisfied", "overall_satisfied", "sum(overall_n)"),
    ]
    for k, item in enumerate(ACSI_ITEMS, 1):
        stats += [
            _counted(f"acsi_n:{item}", f"acsi_n_{k}"),
            _counted(f"acsi_sum:{item}", f"acsi_s_{k}", f"sum(acsi_n_{k})"),
        ]
    stats += [
        _counted("nps_n", "nps_n"),
        _counted("promoters", "promoters", "sum(nps_n)"),
        _counted("detractors", "detractors", "sum(nps_n)"),
        _counted("css_n", "css_n"),
        _counted("css_sum", "css_s", "sum(css_n)"),
        *(_counted(f"css_{v}", f"css_verdict = {k}") for k, v in enumerate(CSS_VERDICTS, 1)),
    ]
    for d, dimension in enumerate(RATER_DIMENSIONS, 1):
        stats += [
            _counted(f"servqual_n:{dimension}", f"sq_n_{d}"),
            _counted(f"servqual_sum:{dimension}", f"sq_s_{d}", f"sum(sq_n_{d})"),
        ]
    stats += [
        _counted("visits", "visits"),
        _counted("on_time_n", "on_time_n"),
        _counted("on_time", "on_time", "sum(on_time_n)"),
        _counted("greet_wait_n", "greet_n"),
        _counted("greet_wait_min", "greet_min", "sum(greet_n)"),
        _counted("invoice_ratio_n", "inv_n"),
        _counted("invoice_ratio_sum", "inv_s", "sum(inv_n)"),
        _counted("comebacks", "comebacks"),
        _counted("calls", "calls"),
        _counted("calls_reached", "reached", "sum(calls)"),
        _counted("calls_issue_reported", "calls_issue", "sum(calls)"),
        *(
            _counted(f"complaints_{s}", f"type = {COMPLAINT} AND status = {k}")
            for k, s in enumerate(COMPLAINT_STATUSES, 1)
        ),
        _counted("recovery_n", "recovery_n"),
        _counted("recovered", "recovered", "sum(recovery_n)"),
        _counted("audits", "audits"),
        _counted("audit_mandatory_failed", "item_mandatory_failed", "sum(length(item_weights))"),
    ]
    return stats


def presences(stats: Sequence[Stat]) -> list[str]:
    """The distinct presence counts (a factor's n, sum and sum of squares share one)."""
    return list(dict.fromkeys(stat.present for stat in stats))


def _visits_with(db: str, partners: str, strictly_before: bool, days: int, wanted: str) -> str:
    """Rows (row, dealer, dept, day) of the wanted visits that a partner (a reached call,
    a comeback) reaches within `days` of delivery. The stream matches a partner to the
    latest earlier visit with its visit id, and checks one that came before any such
    visit (a pending note) against every visit with the id: with one visit per id that
    is simply some partner with the id within the days. Ids of several visits take the
    long way. `{db}.visits` holds every counted visit, `k` their hashed (dealer, id)."""
    visits = f"{db}.visits"
    keyed = f"(SELECT cityHash64(dealer, visit_id) AS k, * FROM {partners})"
    reused = f"(SELECT k FROM {visits} GROUP BY k HAVING count() > 1)"
    one_visit = (  # the wanted visits, fewer than their partners: the hashed side
        "SELECT DISTINCT v.row AS row, v.dealer AS dealer, v.dept AS dept, v.day AS day "
        f"FROM {keyed} AS p INNER JOIN (SELECT * FROM {visits} WHERE {wanted} "
        f"AND k NOT IN {reused}) AS v ON p.k = v.k "
        "WHERE v.dealer = p.dealer AND v.visit_id = p.visit_id AND v.delivered IS NOT NULL "
        f"AND {within_sql('p.at', 'assumeNotNull(v.delivered)', days)}"
    )
    several = f"(SELECT * FROM {visits} WHERE k IN {reused})"
    earlier = ">" if strictly_before else ">="  # a comeback may name its own visit
    matched = (
        "(SELECT p.dealer AS dealer, p.visit_id AS visit_id, p.at AS at, "
        f"v.row AS visit_row, v.delivered AS delivered FROM (SELECT * FROM {keyed} "
        f"WHERE k IN {reused}) AS p ASOF LEFT JOIN {several} AS v "
        f"ON p.dealer = v.dealer AND p.visit_id = v.visit_id AND p.row {earlier} v.row)"
    )
    reached = (
        f"SELECT visit_row FROM {matched} WHERE visit_row > 0 AND delivered IS NOT NULL "
        f"AND {within_sql('at', 'assumeNotNull(delivered)', days)}"
    )
    pending = (
        f"SELECT v.row FROM {several} AS v INNER JOIN (SELECT dealer, visit_id, at "
        f"FROM {matched} WHERE visit_row = 0) AS p "
        "ON v.dealer = p.dealer AND v.visit_id = p.visit_id "
        "WHERE v.delivered IS NOT NULL "
        f"AND {within_sql('p.at', 'assumeNotNull(v.delivered)', days)}"
    )
    return (
        f"{one_visit} UNION ALL SELECT row, dealer, dept, day FROM {several} "
        f"WHERE {wanted} AND (row IN ({reached}) OR row IN ({pending}))"
    )


def _complaint_stats(counted: str, settings: AlertSettings) -> str:
    """`stream._note_complaint` over each complaint's events in line order: nothing
    before its first "opened"; +1 backlog then; the first "responded" and the first
    "resolved"/"closed" after it give durations on the opening day; "closed" while open
    −1 and "reopened" while closed +1 on their own days, in the opening's department.
    An event is (row, status, dept, day, occ_us, severity)."""
    opened, responded, resolved, closed, reopened = range(1, 6)
    severities = sorted(settings.sla_first_response_hours)
    dues = {
        "first_response": sql_array(
            [settings.sla_first_response_hours[s] * 60 for s in severities]
        ),
        "resolution": sql_array([settings.sla_resolution_hours[s] * 60 for s in severities]),
    }

    def durations(kind: str, event: str) -> str:
        minutes = minutes_sql(f"{event}.5", "o.5")
        past_due = (
            f"toFloat64({minutes} > transform(o.6, {sql_array(severities)}, {dues[kind]}, 0.))"
        )
        return (
            f"if({event}.1 > 0, [(concat('{kind}_min:', toString({minutes})), o.3, o.4, 1.), "
            f"('{kind}_n', o.3, o.4, 1.), ('{kind}_past_due', o.3, o.4, {past_due})], [])"
        )

    # a close or reopen changes the backlog when it changes the state: open at first
    changes = (
        f"arrayFilter((x, i) -> x.2 != if(i = 1, {reopened}, toggles[i - 1].2), "
        "toggles, arrayEnumerate(toggles))"
    )
    backlog = f"arrayMap(x -> ('backlog_delta', o.3, x.4, if(x.2 = {closed}, -1., 1.)), {changes})"
    events = "arraySort(x -> x.1, groupArray((row, status, dept, day, occ_us, severity)))"
    return (
        "SELECT dealer, out.2 AS dept, out.3 AS day, out.1 AS name, out.4 AS value, "
        f"toUInt64(1) AS present FROM (SELECT dealer, {events} AS events, "
        f"arrayFirstIndex(x -> x.2 = {opened}, events) AS first_opened, "
        "events[first_opened] AS o, arraySlice(events, first_opened + 1) AS after, "
        f"arrayFirst(x -> x.2 = {responded}, after) AS response, "
        f"arrayFirst(x -> x.2 IN ({resolved}, {closed}), after) AS resolution, "
        f"arrayFilter(x -> x.2 IN ({closed}, {reopened}), after) AS toggles, "
        f"arrayConcat([('backlog_delta', o.3, o.4, 1.)], {backlog}, "
        f"{durations('first_response', 'response')}, {durations('resolution', 'resolution')}) "
        f"AS outs FROM {counted} WHERE type = {COMPLAINT} GROUP BY dealer, complaint_id "
        "HAVING first_opened > 0) ARRAY JOIN outs AS out"
    )


def joined_stats(db: str, counted: str, settings: AlertSettings, wanted: str) -> list[str]:
    """SELECTs of (dealer, dept, day, name, value, present) for the statistics that need
    two events (`stream.join_event`) or carry a name from the data (audit sections), on
    the wanted dealer-days (complaints on all: the backlog carries)."""
    calls = (
        f"(SELECT dealer, visit_id, row, occ_us AS at FROM {counted} "
        f"WHERE type = {CALL} AND reached)"
    )
    comebacks = (
        f"(SELECT dealer, comeback_of AS visit_id, row, arrived AS at FROM {counted} "
        f"WHERE type = {VISIT} AND comeback_of != '')"
    )
    service = (
        f"(SELECT dealer, customer_ref, row, dept, day, satisfied, return_high FROM {counted} "
        f"WHERE type = {SURVEY} AND dept = 1 AND has_overall AND has_return_intent AND {wanted})"
    )
    sales = (
        f"(SELECT dealer, customer_ref, row, satisfied FROM {counted} "
        f"WHERE type = {SURVEY} AND dept = 2 AND has_overall)"
    )
    sales_cell = "multiIf(p.row = 0, 'none', p.satisfied = 1, 'satisfied', 'dissatisfied')"
    cells = (
        "(SELECT s.dealer AS dealer, s.dept AS dept, s.day AS day, s.return_high AS high, "
        f"concat({sales_cell}, '|', if(s.satisfied = 1, 'satisfied', 'dissatisfied')) AS cell "
        f"FROM {service} AS s ASOF LEFT JOIN {sales} AS p "
        "ON s.dealer = p.dealer AND s.customer_ref = p.customer_ref AND s.row > p.row)"
    )
    items = (
        f"(SELECT dealer, dept, day, s, w, p FROM {counted} ARRAY JOIN item_sections AS s, "
        f"item_weights AS w, item_passed AS p WHERE type = {AUDIT} AND {wanted})"
    )
    followed = _visits_with(db, calls, True, FOLLOW_UP_DAYS, wanted)
    came_back = _visits_with(db, comebacks, False, COMEBACK_DAYS, wanted)
    named = [  # (name, value, rows)
        ("'followed_up'", "1.", f"({followed})"),
        ("'comebacks_against'", "1.", f"({came_back})"),
        ("concat('loyalty_n:', cell)", "1.", cells),
        ("concat('loyalty_high:', cell)", "toFloat64(high)", cells),
        ("concat('audit_total_w:', s)", "w", items),
        ("concat('audit_pass_w:', s)", "w * p", items),
    ]
    return [
        *(
            f"SELECT dealer, dept, day, {name} AS name, {value} AS value, "
            f"toUInt64(1) AS present FROM {rows}"
            for name, value, rows in named
        ),
        _complaint_stats(counted, settings),
    ]


# --- running it ------------------------------------------------------------------------------


@dataclass
class SqlRun:
    """What a run measured and found besides the buckets (for the benchmark and tests)."""

    lines_to_pydantic: int = 0
    """Lines that were not plain (blank ones included)."""
    duplicates: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall seconds per stage."""
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    """CPU seconds per stage, of this process (chdb runs in it)."""


class SqlChecksOutdated(RuntimeError):
    """pydantic refused a line the SQL checks called plain: schemas/events.py has a rule
    that `plain_sql` lacks."""


@contextmanager
def _session() -> Iterator[tuple[Any, str]]:
    """An in-memory chdb engine and a database of its own. chdb runs one engine per
    process: this fails while a chdb warehouse on a path is open in the process."""
    import chdb

    connect: Callable[[str], Any] = chdb.connect  # chdb leaves it untyped
    connection = connect(":memory:")
    database = f"csi_batch_{uuid.uuid4().hex}"
    try:
        connection.query(f"CREATE DATABASE {database}")
        yield connection, database
    finally:
        try:
            connection.query(f"DROP DATABASE IF EXISTS {database} SYNC")
        finally:
            connection.close()


def _rows(connection: Any, sql: str) -> list[dict[str, Any]]:
    """Rows as dicts, through Arrow: ClickHouse's text formats print some floats one
    digit short."""
    columns: dict[str, list[Any]] = connection.query(sql, "ArrowTable").to_pydict()
    return [
        dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)
    ]


def _stream(connection: Any, sql: str) -> Iterator[dict[str, Any]]:
    """Rows as dicts, a block at a time, strings as bytes (lines, which may be the whole
    file and need not be UTF-8)."""
    sql += " SETTINGS output_format_arrow_string_as_string = 0"
    result = connection.send_query(sql, "ArrowTable")
    try:
        for block in result:
            columns: dict[str, list[Any]] = block.to_pydict()
            for values in zip(*columns.values(), strict=True):
                yield dict(zip(columns, values, strict=True))
    finally:
        result.close()


class _Stages:
    """Wall and CPU seconds of consecutive stages into a SqlRun."""

    def __init__(self, run: SqlRun) -> None:
        self.run = run
        self.wall, self.cpu = time.monotonic(), time.process_time()

    def done(self, stage: str) -> None:
        wall, cpu = time.monotonic(), time.process_time()
        self.run.seconds[stage] = wall - self.wall
        self.run.cpu_seconds[stage] = cpu - self.cpu
        self.wall, self.cpu = wall, cpu


def run_sql_batch(
    path: str | Path,
    catalogue: Catalogue,
    *,
    registry: DealerRegistry | None = None,
    lateness_days: int = DEFAULT_LATENESS_DAYS,
    alert_settings: AlertSettings | None = None,
    now: datetime | None = None,
    since: date | None = None,
    departments: Collection[str] = DEPARTMENTS,
    run: SqlRun | None = None,
) -> BatchState:
    """The batch state `run_batch` leaves for the file at `path` — dealer and roll-up
    buckets with their backlog indexes, dead letters, the events used — for
    `pipeline.batch.metrics_report`. Only the buckets of `departments` from `since` on
    are built (see the module docstring). `now` is the validation clock."""
    path, now = Path(path).resolve(), now or datetime.now(UTC)
    run = run if run is not None else SqlRun()
    settings, state, stages = alert_settings or AlertSettings(), BatchState(), _Stages(run)
    with _session() as (connection, db), tempfile.TemporaryDirectory(prefix="csi-") as tmp:
        columns = ", ".join(f"{c.name} {c.type}" for c in fact_columns(catalogue))
        connection.query(f"CREATE TABLE {db}.facts ({columns}) ENGINE = {TABLE_ENGINE}")
        lines = (
            f"SELECT _row_number + 1 AS row, line FROM file({sql_string(str(path))}, LineAsString)"
        )
        scan = scan_sql(lines, catalogue, registry, now, trusted=False)
        connection.query(f"INSERT INTO {db}.facts {scan}")
        stages.done("scan")
        canonical = Path(tmp) / "canonical.tsv"
        validator = DealerProcessor(DictStore(), catalogue, registry=registry, clock=lambda: now)
        unterminated = _unterminated_last_line(connection, db, path)
        state.dead_letters += _validate_in_python(
            connection, db, validator, unterminated, canonical, run
        )
        if canonical.stat().st_size:
            lines = (
                f"SELECT * FROM file({sql_string(str(canonical))}, TSV, 'row UInt64, line String')"
            )
            scan = scan_sql(lines, catalogue, registry, now, trusted=True)
            connection.query(f"INSERT INTO {db}.facts {scan}")
            _check_canonical_read(connection, db)
        stages.done("pydantic")
        state.dead_letters += _dedup_and_lateness(connection, db, lateness_days, now, run)
        state.dead_letters.sort(key=lambda dead: dead.offset)
        stages.done("dedup")
        wanted = _wanted(since, departments)
        # the stream emits an event row for a counted event and for a replay of one
        state.events = _aggregate(connection, db, catalogue, settings, wanted) + run.duplicates
        stages.done("aggregate")
        _fill_stores(connection, db, direct_stats(catalogue), state, registry, wanted)
        if since is not None:
            _fill_earlier(connection, db, state, registry, since, departments)
        stages.done("buckets")
    return state


def _unterminated_last_line(connection: Any, db: str, path: Path) -> int:
    """The number of the file's last line if it has no newline, else 0: the stream
    reads every other line with its newline, and JSON error messages count it."""
    with path.open("rb") as events:
        if events.seek(0, 2) == 0:
            return 0
        events.seek(-1, 2)
        if events.read(1) == b"\n":
            return 0
    return int(_rows(connection, f"SELECT max(row) AS last FROM {db}.facts")[0]["last"])


def _validate_in_python(
    connection: Any,
    db: str,
    processor: DealerProcessor,
    unterminated: int,
    canonical: Path,
    run: SqlRun,
) -> list[DeadLetter]:
    """The stream's validation for every line that is not plain (and the sample of plain
    ones): dead letters, and the canonical JSON of the valid ones with their line
    numbers, as TSV, in `canonical`."""
    dead: list[DeadLetter] = []
    with canonical.open("wb") as out:
        query = f"SELECT row, raw, plain FROM {db}.facts WHERE raw != ''"
        for line in _stream(connection, query):
            row, raw = int(line["row"]), line["raw"]
            raw += b"" if row == unterminated else b"\n"  # the bytes `for line in file` gives
            if line["plain"]:
                _check_sample(row, raw, processor)
                continue
            run.lines_to_pydantic += 1
            if not raw.strip():  # a blank line is no record (`batch._records`)
                continue
            record = record_for_line(row, raw)
            try:
                if record.topic == CASE_ACTIONS.name:
                    processor.validate_case_action(record)  # no statistics; valid or dead
                    continue
                event = processor.validate(record)
            except InvalidEvent as exc:
                reason, now = exc.reason, processor.clock()
                dead.append(_dead_letter(record.topic, row, record.key, reason, raw, now=now))
                continue
            text = event_to_json(event).replace(b"\\", b"\\\\")  # TSV escapes backslashes
            out.write(b"%d\t%s\n" % (row, text))
    return dead


def _check_canonical_read(connection: Any, db: str) -> None:
    """Every canonical JSON line must pass the reading checks (a line holds no newline)."""
    unread = _rows(connection, f"SELECT row FROM {db}.facts WHERE raw = '\\n' LIMIT 5")
    if unread:
        lines = ", ".join(str(row["row"]) for row in unread)
        raise RuntimeError(f"pipeline/batch_sql.py cannot read the canonical JSON of lines {lines}")


def _check_sample(row: int, raw: bytes, processor: DealerProcessor) -> None:
    try:
        processor.validate(record_for_line(row, raw))
    except InvalidEvent as exc:
        raise SqlChecksOutdated(
            f"line {row} passed the SQL checks but the stream rejects it ({exc.reason}): "
            "pipeline/batch_sql.py lacks a rule of schemas/events.py"
        ) from exc


def _dead_letter(
    topic: str, offset: int, key: bytes | None, reason: str, raw: bytes, *, now: datetime
) -> DeadLetter:
    text = key.decode("utf-8", errors="replace") if key is not None else ""
    return DeadLetter(topic, 0, offset, text, reason, raw, now)


def _dedup_and_lateness(
    connection: Any, db: str, lateness_days: int, now: datetime, run: SqlRun
) -> list[DeadLetter]:
    """The `excluded` table (replays and too-late lines) and the too-late dead letters."""
    # late: more than lateness_days before the newest day of the dealer's events of the
    # type on earlier valid lines (a window over four narrow columns)
    newest_before = (
        "max(day) OVER (PARTITION BY dealer, type ORDER BY row "
        "ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)"
    )
    connection.query(
        f"CREATE TABLE {db}.late ENGINE = {TABLE_ENGINE} AS SELECT row, latest FROM ("
        f"SELECT row, day, {newest_before} AS latest FROM {db}.facts WHERE plain) "
        f"WHERE dateDiff('day', day, latest) > {int(lateness_days)}"
    )
    # the first line of an (dealer, department, day, event id) decides: looked for among
    # the late lines and the event ids seen more than once
    repeated = f"SELECT event_id FROM {db}.facts WHERE plain GROUP BY event_id HAVING count() > 1"
    candidates = (
        "SELECT f.row AS row, type, dealer, dept, day, event_id, l.row > 0 AS too_late, "
        f"l.latest AS latest FROM {db}.facts AS f LEFT JOIN {db}.late AS l ON f.row = l.row "
        f"WHERE plain AND (f.row IN (SELECT row FROM {db}.late) OR event_id IN ({repeated}))"
    )
    connection.query(
        f"CREATE TABLE {db}.excluded ENGINE = {TABLE_ENGINE} AS "
        "SELECT row, type, dealer, day, latest, "
        "(row = first_row AND too_late) OR (row != first_row AND first_too_late) AS dead "
        "FROM (SELECT *, min(row) OVER same_event AS first_row, "
        f"argMin(too_late, row) OVER same_event AS first_too_late FROM ({candidates}) "
        "WINDOW same_event AS (PARTITION BY dealer, dept, day, event_id)) "
        "WHERE row != first_row OR too_late"
    )
    names = {code: name for name, code in TYPE_CODES.items()}
    dead = []
    for late in _rows(connection, f"SELECT * FROM {db}.excluded ORDER BY row"):
        if not late["dead"]:
            run.duplicates += 1
            continue
        event_type, dealer = names[late["type"]], late["dealer"]
        reason = (  # the stream's words (DealerProcessor.process)
            f"occurred_at: too late: {late['day']} is more than {lateness_days} days "
            f"before dealer {dealer}'s newest {event_type} ({late['latest']})"
        )
        topic = EVENT_TOPICS[event_type].name
        dead.append(_dead_letter(topic, int(late["row"]), dealer.encode(), reason, b"", now=now))
    return dead


def _wanted(since: date | None, departments: Collection[str]) -> str:
    """The buckets to build, as a condition on `day` and `dept`."""
    codes = ", ".join(str(DEPARTMENTS.index(d) + 1) for d in departments) or "0"
    return f"dept IN ({codes})" + (f" AND day >= {sql_string(since.isoformat())}" if since else "")


def _aggregate(
    connection: Any, db: str, catalogue: Catalogue, settings: AlertSettings, wanted: str
) -> int:
    """Tables of the wanted dealer-days' statistics — `dealer_days` (a column per
    statistic of `direct_stats` and per presence count), `dealer_long` (named ones:
    joins, audit sections) — and `dealers` (events used per dealer). Returns the count
    of events used."""
    counted = (
        f"(SELECT * FROM {db}.facts WHERE plain AND row NOT IN (SELECT row FROM {db}.excluded))"
    )
    stats = direct_stats(catalogue)
    sums = [f"toFloat64({s.value}) AS v{i}" for i, s in enumerate(stats)]
    counts = [f"toUInt64({p}) AS p{j}" for j, p in enumerate(presences(stats))]
    connection.query(
        f"CREATE TABLE {db}.dealer_days ENGINE = {TABLE_ENGINE} AS SELECT dealer, dept, day, "
        f"{', '.join(sums + counts)} FROM {counted} WHERE {wanted} GROUP BY dealer, dept, day"
    )
    connection.query(
        f"CREATE TABLE {db}.visits ENGINE = {TABLE_ENGINE} AS SELECT cityHash64(dealer, visit_id) "
        f"AS k, dealer, visit_id, row, dept, day, delivered FROM {counted} WHERE type = {VISIT}"
    )
    joined = " UNION ALL ".join(joined_stats(db, counted, settings, wanted))
    connection.query(
        f"CREATE TABLE {db}.dealer_long ENGINE = {TABLE_ENGINE} AS SELECT dealer, dept, day, "
        f"name, sum(value) AS value, sum(present) AS present FROM ({joined}) "
        "GROUP BY dealer, dept, day, name"
    )
    connection.query(
        f"CREATE TABLE {db}.dealers ENGINE = {TABLE_ENGINE} AS "
        f"SELECT dealer, count() AS events FROM {counted} GROUP BY dealer"
    )
    return int(_rows(connection, f"SELECT sum(events) AS n FROM {db}.dealers")[0]["n"] or 0)


# --- into the stores the processors leave ---------------------------------------------------


def _units(registry: DealerRegistry | None) -> dict[str, str]:
    """Each scope's unit of `dealer`, as SQL (region and brand UNKNOWN without a registry)."""
    if registry is None:
        labels = {scope: sql_string(UNKNOWN) for scope in ("region", "brand")}
    else:
        ids = sql_array(list(registry))
        labels = {
            scope: f"transform(dealer, {ids}, "
            f"{sql_array([getattr(registry[d], scope) for d in registry])}, {sql_string(UNKNOWN)})"
            for scope in ("region", "brand")
        }
    return {"dealer": "dealer", **labels, "network": "'network'"}


def _bucket_queries(db: str, stats: Sequence[Stat], scope: str, unit: str) -> tuple[str, str]:
    """The SELECTs of a scope's day buckets: (statistic columns, named statistics),
    each value `total<i>`/`total` with `kept<i>`/`kept` > 0 when the key is there. A
    roll-up keeps what some dealer has non-zero (see the module docstring)."""
    if scope == "dealer":
        kept = [f"p{presences(stats).index(s.present)}" for s in stats]
        columns = ", ".join(f"v{i} AS total{i}, {k} AS kept{i}" for i, k in enumerate(kept))
        return (
            f"SELECT dealer AS key, dept, day, {columns} FROM {db}.dealer_days",
            f"SELECT dealer AS key, dept, day, name, value AS total, present AS kept "
            f"FROM {db}.dealer_long",
        )
    columns = ", ".join(
        f"sum(v{i}) AS total{i}, countIf(v{i} != 0) AS kept{i}" for i in range(len(stats))
    )
    return (
        f"SELECT {unit} AS key, dept, day, {columns} FROM {db}.dealer_days GROUP BY key, dept, day",
        f"SELECT {unit} AS key, dept, day, name, sum(value) AS total, countIf(value != 0) AS kept "
        f"FROM {db}.dealer_long GROUP BY key, dept, day, name",
    )  # fmt: skip


def _fill_stores(
    connection: Any,
    db: str,
    stats: Sequence[Stat],
    state: BatchState,
    registry: DealerRegistry | None,
    wanted: str,
) -> None:
    """The wanted day buckets of every scope into the state's stores, keyed as the
    processors key them, and the backlog indexes (the days a unit's backlog changed:
    some dealer's bucket has `backlog_delta`)."""
    for scope, unit in _units(registry).items():
        store = state.dealers if scope == "dealer" else state.rollups
        with_stats, named = _bucket_queries(db, stats, scope, unit)
        buckets: dict[tuple[str, int, date], dict[str, float]] = {}
        for row in _rows(connection, with_stats):
            bucket = buckets.setdefault((row["key"], row["dept"], row["day"]), {})
            for i, stat in enumerate(stats):
                if row[f"kept{i}"]:
                    bucket[stat.name] = float(row[f"total{i}"])
        for row in _rows(connection, f"SELECT * FROM ({named}) WHERE {wanted} AND kept > 0"):
            buckets.setdefault((row["key"], row["dept"], row["day"]), {})[row["name"]] = float(
                row["total"]
            )
        for (key, dept, day), bucket in buckets.items():
            store.put(
                scope_bucket_key(scope, key, DEPARTMENTS[dept - 1], day), {"stats": bucket}, 0
            )
        changed = (
            f"SELECT {unit} AS key, dept, groupArrayDistinct(toString(day)) AS days "
            f"FROM {db}.dealer_long WHERE name = 'backlog_delta' AND present > 0 AND {wanted} "
            "GROUP BY key, dept"
        )
        for row in _rows(connection, changed):
            index = backlog_index_key(scope, row["key"], DEPARTMENTS[row["dept"] - 1])
            store.put(index, {"days": sorted(row["days"])}, 0)


def _fill_earlier(
    connection: Any,
    db: str,
    state: BatchState,
    registry: DealerRegistry | None,
    since: date,
    departments: Collection[str],
) -> None:
    """The days before `since` as one bucket on `since − 1`: the backlog they carry
    (in the unit's backlog index, as the day it changed), and for a unit with no bucket
    built at all, an empty one, so it stays in the report (`batch.unit_keys`)."""
    before = since - timedelta(days=1)
    earlier = f"day < {sql_string(since.isoformat())} AND {_wanted(None, departments)}"
    for scope, unit in _units(registry).items():
        store = state.dealers if scope == "dealer" else state.rollups
        carried = (
            f"SELECT {unit} AS key, dept, sum(value) AS carried FROM {db}.dealer_long "
            f"WHERE name = 'backlog_delta' AND present > 0 AND {earlier} GROUP BY key, dept"
        )
        for row in _rows(connection, carried):
            department = DEPARTMENTS[row["dept"] - 1]
            bucket = {"stats": {"backlog_delta": float(row["carried"])}}
            store.put(scope_bucket_key(scope, row["key"], department, before), bucket, 0)
            index = backlog_index_key(scope, row["key"], department)
            days = (store.get(index) or {"days": []})["days"]
            store.put(index, {"days": sorted([before.isoformat(), *days])}, 0)
        shown = {key.split("|")[1] for key in store.data if key.startswith(scope + "|")}
        for row in _rows(connection, f"SELECT DISTINCT {unit} AS key FROM {db}.dealers"):
            if row["key"] not in shown:
                marker = scope_bucket_key(
                    scope, row["key"], next(iter(departments), "service"), before
                )
                store.put(marker, {"stats": {}}, 0)
