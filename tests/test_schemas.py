"""Event schemas: what parse_event accepts, what it rejects and why, and round trips."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import (
    EVENT_TYPES,
    SUPPORTED_EVENT_TYPES,
    InvalidEvent,
    Scale,
    SurveyEvent,
    VisitEvent,
    event_to_json,
    parse_event,
)
from schemas.events import MAX_EVENT_BYTES, scrub_personal_data

NOW = datetime(2024, 5, 2, 12, 0, tzinfo=UTC)
EVENT_ID = "3f2b9c1e-8a4d-4e6f-9b2a-1c3d5e7f9a0b"


def visit_payload() -> dict[str, Any]:
    return {
        "event_id": EVENT_ID,
        "event_type": "visit",
        "schema_version": 1,
        "dealer_id": "SH-0042",
        "occurred_at": "2024-05-01T10:00:00+08:00",
        "customer_ref": "c9f1a2b3d4e5f607",
        "source": "dms",
        "visit_id": "RO-2024-001",
        "appointment": True,
        "arrived_at": "2024-05-01T08:55:00+08:00",
        "greeted_at": "2024-05-01T08:58:00+08:00",
        "promised_at": "2024-05-01T16:00:00+08:00",
        "delivered_at": None,
        "estimate_amount": 400,
        "invoice_amount": 412.5,
        "comeback_of": None,
    }


def survey_payload() -> dict[str, Any]:
    return {
        "event_id": EVENT_ID,
        "event_type": "survey",
        "schema_version": 1,
        "dealer_id": "SH-0042",
        "department": "service",
        "occurred_at": "2024-05-01T20:00:00Z",
        "customer_ref": "c9f1a2b3d4e5f607",
        "source": "survey_vendor",
        "visit_id": "RO-2024-001",
        "channel": "sms",
        "ratings": {"booking_ease": 9, "on_time": 7.5},
        "overall": 8,
        "recommend": 9,
        "comment": "Friendly advisor.",
    }


def raw(payload: object) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


def reason_for(payload: object) -> str:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(raw(payload), now=NOW)
    return caught.value.reason


# --- valid events -----------------------------------------------------------------


def test_valid_visit() -> None:
    event = parse_event(raw(visit_payload()), now=NOW)

    assert isinstance(event, VisitEvent)
    assert event.event_id == UUID(EVENT_ID)
    assert event.department == "service"  # the default
    assert event.occurred_at == datetime(2024, 5, 1, 2, 0, tzinfo=UTC)
    assert event.arrived_at == datetime(2024, 5, 1, 0, 55, tzinfo=UTC)
    assert event.appointment is True
    assert event.delivered_at is None
    assert event.estimate_amount == 400.0
    assert event.invoice_amount == 412.5


def test_valid_survey_on_1_to_5_scale() -> None:
    payload = survey_payload() | {
        "department": "sales",
        "scale": {"min": 1, "max": 5},
        "ratings": {"booking_ease": 5, "on_time": 1, "work_quality": 3.5},
        "overall": 4,
        "expectation": 4,
        "perception": 5,
        "expectations": {"on_time": 5},
        "return_intent": 2,
        "recommend": 0,
    }
    event = parse_event(raw(payload), now=NOW)

    assert isinstance(event, SurveyEvent)
    assert event.department == "sales"
    assert event.scale == Scale(min=1, max=5)
    assert event.ratings == {"booking_ease": 5.0, "on_time": 1.0, "work_quality": 3.5}
    assert event.expectations == {"on_time": 5.0}
    assert (event.overall, event.expectation, event.perception) == (4.0, 4.0, 5.0)
    assert event.return_intent == 2.0
    assert event.recommend == 0


def test_survey_defaults_to_1_to_10_scale_and_may_have_only_overall() -> None:
    payload = survey_payload() | {"ratings": {}, "recommend": None, "overall": 10}
    del payload["visit_id"]
    event = parse_event(raw(payload), now=NOW)

    assert isinstance(event, SurveyEvent)
    assert event.scale == Scale(min=1, max=10)
    assert event.ratings == {}
    assert event.visit_id is None
    assert event.overall == 10.0


def test_str_input_and_occurred_at_up_to_one_day_ahead() -> None:
    payload = visit_payload() | {"occurred_at": "2024-05-03T12:00:00Z"}  # NOW + exactly 1 day
    assert parse_event(json.dumps(payload), now=NOW).occurred_at == NOW + timedelta(days=1)


def test_event_type_lists() -> None:
    assert set(EVENT_TYPES) == {"visit", "survey", "call", "mystery_shop", "complaint"}
    assert set(SUPPORTED_EVENT_TYPES) == {"visit", "survey"}


# --- invalid events: the reason names the field and the rule ----------------------


def with_changes(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return base | changes


INVALID_CASES: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        "rating off scale",
        with_changes(survey_payload(), ratings={"booking_ease": 11}),
        ["ratings.booking_ease: must be within the survey scale 1–10 (got 11)"],
    ),
    (
        "rating off a 1–5 scale",
        with_changes(survey_payload(), scale={"min": 1, "max": 5}, ratings={}, overall=5.5),
        ["overall: must be within the survey scale 1–5 (got 5.5)"],
    ),
    (
        "two errors joined",
        with_changes(survey_payload(), ratings={"on_time": 0}, expectations={"on_time": 12}),
        ["ratings.on_time: must be within", "; expectations.on_time: must be within"],
    ),
    (
        "rating as a string",
        with_changes(survey_payload(), ratings={"booking_ease": "5"}),
        ["ratings.booking_ease: must be a valid number", "'5'"],
    ),
    (
        "rating as a bool",
        with_changes(survey_payload(), ratings={"booking_ease": True}),
        ["ratings.booking_ease: must be a valid number"],
    ),
    (
        "bad rating code",
        with_changes(survey_payload(), ratings={"booking ease": 5}),
        ["ratings: key 'booking ease' must match pattern"],
    ),
    (
        "recommend above 10",
        with_changes(survey_payload(), recommend=11),
        ["recommend: must be less than or equal to 10 (got 11)"],
    ),
    (
        "recommend as a float",
        with_changes(survey_payload(), recommend=9.0),
        ["recommend: must be a valid integer"],
    ),
    (
        "no answers at all",
        with_changes(survey_payload(), ratings={}, overall=None, recommend=None),
        ["at least one of ratings, overall or recommend"],
    ),
    (
        "scale upside down",
        with_changes(survey_payload(), scale={"min": 10, "max": 1}),
        ["scale: min must be less than max (got min 10, max 1)"],
    ),
    (
        "unknown channel",
        with_changes(survey_payload(), channel="fax"),
        ["channel: must be 'web', 'sms', 'email', 'phone' or 'app' (got 'fax')"],
    ),
    (
        "unknown field",
        with_changes(survey_payload(), mood="grumpy"),
        ["mood: unknown field, not allowed"],
    ),
    (
        "schema version 2",
        with_changes(visit_payload(), schema_version=2),
        ["schema_version: version 2 is not supported (supported: 1)"],
    ),
    (
        "schema version 0",
        with_changes(visit_payload(), schema_version=0),
        ["schema_version: must be greater than or equal to 1 (got 0)"],
    ),
    (
        "schema version as a string",
        with_changes(visit_payload(), schema_version="1"),
        ["schema_version: must be a valid integer (got '1')"],
    ),
    (
        "empty dealer_id",
        with_changes(visit_payload(), dealer_id=""),
        ["dealer_id: must match pattern", "(got '')"],
    ),
    (
        "dealer_id with a space",
        with_changes(visit_payload(), dealer_id="SH 0042"),
        ["dealer_id: must match pattern"],
    ),
    (
        "unknown department",
        with_changes(visit_payload(), department="parts"),
        ["department: must be 'service' or 'sales' (got 'parts')"],
    ),
    (
        "unknown source",
        with_changes(visit_payload(), source="crm"),
        ["source: must be 'dms', 'survey_vendor', 'call_centre', 'auditor' or 'web'"],
    ),
    (
        "bad event_id",
        with_changes(visit_payload(), event_id="not-a-uuid"),
        ["event_id: must be a valid UUID"],
    ),
    (
        "naive occurred_at",
        with_changes(visit_payload(), occurred_at="2024-05-01T10:00:00"),
        ["occurred_at: must be timezone-aware"],
    ),
    (
        "occurred_at as epoch seconds",
        with_changes(visit_payload(), occurred_at=1714528800),
        ["occurred_at: must be a valid datetime (got 1714528800)"],
    ),
    (
        "occurred_at too far ahead",
        with_changes(visit_payload(), occurred_at="2024-05-03T12:00:01Z"),
        ["occurred_at: must be at most 1 day in the future", "2024-05-03T12:00:01"],
    ),
    (
        "placeholder date",
        with_changes(visit_payload(), delivered_at="0001-01-01T00:00:00+01:00"),
        ["delivered_at: must be between 1970-01-01 and 2100-01-01 (got 0001-01-01T00:00:00+01:00)"],
    ),
    (
        "customer_ref is an e-mail",
        with_changes(visit_payload(), customer_ref="wang.li@example.com"),
        ["customer_ref: must be a pseudonymous hash, not PII", "e-mail"],
    ),
    (
        "customer_ref is a phone number",
        with_changes(visit_payload(), customer_ref="13812345678"),
        ["customer_ref: must be a pseudonymous hash, not PII", "phone"],
    ),
    (
        "customer_ref too short",
        with_changes(visit_payload(), customer_ref="abc"),
        ["customer_ref: must be a pseudonymous hash", "(got 3 characters)"],
    ),
    (
        "appointment as 1",
        with_changes(visit_payload(), appointment=1),
        ["appointment: must be a valid boolean (got 1)"],
    ),
    (
        "negative invoice",
        with_changes(visit_payload(), invoice_amount=-1),
        ["invoice_amount: must be greater than or equal to 0 (got -1)"],
    ),
    (
        "naive arrived_at",
        with_changes(visit_payload(), arrived_at="2024-05-01T08:55:00"),
        ["arrived_at: must be timezone-aware"],
    ),
    (
        "missing visit_id",
        {k: v for k, v in visit_payload().items() if k != "visit_id"},
        ["visit_id: is required"],
    ),
    (
        "comment too long",
        with_changes(survey_payload(), comment="x" * 5001),
        ["comment: must be at most 5000 characters (got 5001)"],
    ),
]


@pytest.mark.parametrize(
    ("payload", "expected"),
    [(payload, expected) for _, payload, expected in INVALID_CASES],
    ids=[name for name, _, _ in INVALID_CASES],
)
def test_invalid_event_reason(payload: dict[str, Any], expected: list[str]) -> None:
    reason = reason_for(payload)
    for fragment in expected:
        assert fragment in reason
    assert "\n" not in reason


def test_pii_is_not_echoed_in_reason() -> None:
    reason = reason_for(with_changes(visit_payload(), customer_ref="wang.li@example.com"))
    assert "wang.li" not in reason


@pytest.mark.parametrize("non_finite", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_rating_rejected(non_finite: str) -> None:
    text = raw(survey_payload()).replace(b'"on_time": 7.5', b'"on_time": ' + non_finite.encode())
    with pytest.raises(InvalidEvent) as caught:
        parse_event(text, now=NOW)
    assert "ratings.on_time: must be a finite number" in caught.value.reason


@pytest.mark.parametrize("event_type", ["call", "mystery_shop", "complaint"])
def test_known_but_unsupported_event_type(event_type: str) -> None:
    reason = reason_for(with_changes(visit_payload(), event_type=event_type))
    assert reason == f"event_type {event_type!r} is not supported yet"


def test_unknown_and_missing_event_type() -> None:
    assert reason_for(with_changes(visit_payload(), event_type="foo")) == "unknown event_type 'foo'"
    assert reason_for(with_changes(visit_payload(), event_type=3)) == "unknown event_type 3"
    payload = visit_payload()
    del payload["event_type"]
    assert reason_for(payload).startswith("event_type: is required")


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\xff\xfe{}", "not valid JSON"),
        (b'{"dealer_id": "\xff"}', "not valid JSON"),
        (b"", "not valid JSON"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "event: must be a JSON object (got array)"),
        (b'"visit"', "event: must be a JSON object (got string)"),
        (b"null", "event: must be a JSON object (got null)"),
        (b"[" * 5000 + b"]" * 5000, "not valid JSON: recursion limit exceeded"),
        ("\ud800", "not valid UTF-8"),
        (b" " * (MAX_EVENT_BYTES + 1), f"event is larger than {MAX_EVENT_BYTES} bytes"),
    ],
)
def test_unusable_bytes(data: bytes | str, fragment: str) -> None:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(data, now=NOW)
    assert fragment in caught.value.reason


def test_invalid_event_is_a_value_error_with_reason() -> None:
    error = InvalidEvent("key: must equal dealer_id")
    assert isinstance(error, ValueError)
    assert error.reason == str(error) == "key: must equal dealer_id"


# --- round trip and comment scrubbing ---------------------------------------------


@pytest.mark.parametrize("payload", [visit_payload(), survey_payload()], ids=["visit", "survey"])
def test_round_trip(payload: dict[str, Any]) -> None:
    event = parse_event(raw(payload), now=NOW)
    canonical = event_to_json(event)
    again = parse_event(canonical, now=NOW)

    assert again == event
    assert event_to_json(again) == canonical
    assert json.loads(canonical)["occurred_at"] == payload["occurred_at"]


@pytest.mark.parametrize(
    ("comment", "scrubbed"),
    [
        ("请拨打13812345678联系我", "请拨打[phone]联系我"),
        ("mail me at a.b@x.com", "mail me at [email]"),
        ("邮箱zhang.san@qq.com，电话 +86 138-1234-5678。", "邮箱[email]，电话 [phone]。"),
        ("Call (010) 6552-1234 or +1 555 123 4567!", "Call [phone] or [phone]!"),
        ("13812345678@163.com", "[email]"),
        ("来店时间 2024-05-01，发票 12345.67 元", "来店时间 2024-05-01，发票 12345.67 元"),
        ("Waited 45 minutes, 3 advisors.", "Waited 45 minutes, 3 advisors."),
    ],
)
def test_comment_scrubbing(comment: str, scrubbed: str) -> None:
    event = parse_event(raw(with_changes(survey_payload(), comment=comment)), now=NOW)
    assert isinstance(event, SurveyEvent)
    assert event.comment == scrubbed


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("0123456789 +-.()@abc.xyz请拨打")))
def test_scrubbing_is_idempotent(text: str) -> None:
    once = scrub_personal_data(text)
    assert scrub_personal_data(once) == once


# --- nothing but InvalidEvent, whatever arrives -------------------------------------


def assert_parses_or_gives_reason(data: bytes | str) -> None:
    try:
        parse_event(data, now=NOW)
    except InvalidEvent as exc:
        assert exc.reason
        assert "\n" not in exc.reason
        assert not exc.reason.startswith("internal error"), exc.reason


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes(data: bytes) -> None:
    assert_parses_or_gives_reason(data)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_arbitrary_json(value: object) -> None:
    assert_parses_or_gives_reason(json.dumps(value))


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([visit_payload, survey_payload]),
    st.lists(
        st.tuples(
            st.sampled_from(["delete", "set", "add"]),
            st.sampled_from(sorted(set(visit_payload()) | set(survey_payload()) | {"scale"})),
            json_values,
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_mutated_events(make_payload: Any, mutations: list[tuple[str, str, object]]) -> None:
    payload: dict[str, Any] = make_payload()
    for operation, field, value in mutations:
        if operation == "delete":
            payload.pop(field, None)
        elif operation == "set":
            payload[field] = value
        else:
            payload[f"x_{field}"] = value
    assert_parses_or_gives_reason(raw(payload))
