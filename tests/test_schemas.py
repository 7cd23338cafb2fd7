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
    AuditItem,
    CallEvent,
    ComplaintEvent,
    InvalidEvent,
    MysteryShopEvent,
    Scale,
    SurveyEvent,
    VisitEvent,
    event_to_json,
    parse_event,
)
from schemas.events import MAX_AUDIT_ITEMS, MAX_EVENT_BYTES, scrub_personal_data

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


def call_payload() -> dict[str, Any]:
    return {
        "event_id": EVENT_ID,
        "event_type": "call",
        "schema_version": 1,
        "dealer_id": "SH-0042",
        "occurred_at": "2024-05-02T09:30:00+08:00",
        "customer_ref": "c9f1a2b3d4e5f607",
        "source": "call_centre",
        "visit_id": "RO-2024-001",
        "outcome": "reached",
        "duration_s": 184.5,
        "satisfaction_confirmed": True,
        "issue_reported": False,
        "scale": {"min": 1, "max": 5},
        "ratings": {"work_quality": 5, "explanation": 4},
        "overall": 4.5,
        "comment": "Happy with the repair.",
    }


def mystery_shop_payload() -> dict[str, Any]:
    return {
        "event_id": EVENT_ID,
        "event_type": "mystery_shop",
        "schema_version": 1,
        "dealer_id": "SH-0042",
        "occurred_at": "2024-04-28T15:00:00+08:00",
        "customer_ref": "ms-shopper-0017",
        "source": "auditor",
        "audit_id": "AUD-2024-Q2-0042",
        "scenario": "service_visit",
        "items": [
            {"code": "greeted_in_time", "section": "reception", "weight": 2, "result": "pass"},
            {
                "code": "estimate_explained",
                "section": "reception",
                "weight": 1.5,
                "result": "fail",
                "mandatory": True,
            },
            {"code": "car_washed", "section": "delivery", "weight": 0.5, "result": "na"},
        ],
        "pass_mark": 80,
        "auditor_ref": "aud_7f3e9a1c",
    }


def complaint_payload() -> dict[str, Any]:
    return {
        "event_id": EVENT_ID,
        "event_type": "complaint",
        "schema_version": 1,
        "dealer_id": "SH-0042",
        "occurred_at": "2024-05-02T11:00:00Z",
        "customer_ref": "c9f1a2b3d4e5f607",
        "source": "call_centre",
        "complaint_id": "CMP-2024-0815",
        "status": "closed",
        "category": "repair_quality",
        "severity": 3,
        "visit_id": "RO-2024-001",
        "compensation_amount": 200,
        "satisfied_after": True,
        "comment": "Noise fixed on the second visit.",
    }


PAYLOADS = {
    "visit": visit_payload,
    "survey": survey_payload,
    "call": call_payload,
    "mystery_shop": mystery_shop_payload,
    "complaint": complaint_payload,
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


def test_acsi_items_lie_on_the_survey_scale() -> None:
    payload = survey_payload() | {"disconfirmation": 6, "ideal": 7}
    event = parse_event(raw(payload), now=NOW)
    assert isinstance(event, SurveyEvent)
    assert (event.disconfirmation, event.ideal) == (6.0, 7.0)
    reason = reason_for(payload | {"disconfirmation": 11, "ideal": 0})
    assert "disconfirmation: must be within the survey scale 1–10 (got 11)" in reason
    assert "ideal: must be within the survey scale 1–10 (got 0)" in reason


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


def test_valid_call_with_ratings() -> None:
    event = parse_event(raw(call_payload()), now=NOW)

    assert isinstance(event, CallEvent)
    assert event.outcome == "reached"
    assert event.duration_s == 184.5
    assert (event.satisfaction_confirmed, event.issue_reported) == (True, False)
    assert event.scale == Scale(min=1, max=5)
    assert event.ratings == {"work_quality": 5.0, "explanation": 4.0}
    assert event.overall == 4.5
    assert event.carries_ratings


@pytest.mark.parametrize(
    "outcome", ["reached", "no_answer", "refused", "wrong_number", "callback_requested"]
)
def test_valid_call_without_ratings(outcome: str) -> None:
    payload = call_payload() | {"outcome": outcome}
    for field in ("duration_s", "satisfaction_confirmed", "issue_reported", "scale", "ratings"):
        del payload[field]
    del payload["overall"], payload["comment"]
    event = parse_event(raw(payload), now=NOW)

    assert isinstance(event, CallEvent)
    assert event.outcome == outcome
    assert event.duration_s is None
    assert event.satisfaction_confirmed is None and event.issue_reported is None
    assert event.scale == Scale(min=1, max=10)
    assert event.ratings == {}
    assert event.overall is None and event.comment is None
    assert not event.carries_ratings


def test_call_carries_ratings_with_ratings_or_overall_alone() -> None:
    only_overall = parse_event(raw(with_changes(call_payload(), ratings={})), now=NOW)
    only_ratings = parse_event(raw(with_changes(call_payload(), overall=None)), now=NOW)
    assert isinstance(only_overall, CallEvent) and only_overall.carries_ratings
    assert isinstance(only_ratings, CallEvent) and only_ratings.carries_ratings


def test_valid_mystery_shop() -> None:
    event = parse_event(raw(mystery_shop_payload()), now=NOW)

    assert isinstance(event, MysteryShopEvent)
    assert event.audit_id == "AUD-2024-Q2-0042"
    assert event.scenario == "service_visit"
    assert event.items[0] == AuditItem(
        code="greeted_in_time", section="reception", weight=2.0, result="pass", mandatory=False
    )
    assert [item.mandatory for item in event.items] == [False, True, False]
    assert [item.result for item in event.items] == ["pass", "fail", "na"]
    assert event.pass_mark == 80.0
    assert event.auditor_ref == "aud_7f3e9a1c"


def test_mystery_shop_minimal_and_largest() -> None:
    item = {"code": "greeted", "section": "reception", "weight": 1, "result": "pass"}
    payload = mystery_shop_payload() | {"items": [item]}
    del payload["pass_mark"], payload["auditor_ref"]
    event = parse_event(raw(payload), now=NOW)
    assert isinstance(event, MysteryShopEvent)
    assert (event.pass_mark, event.auditor_ref) == (None, None)

    items = [item | {"code": f"item_{i}"} for i in range(MAX_AUDIT_ITEMS)]
    event = parse_event(raw(with_changes(payload, items=items, pass_mark=0)), now=NOW)
    assert isinstance(event, MysteryShopEvent)
    assert len(event.items) == MAX_AUDIT_ITEMS


def test_valid_complaint() -> None:
    event = parse_event(raw(complaint_payload()), now=NOW)

    assert isinstance(event, ComplaintEvent)
    assert (event.complaint_id, event.status, event.category) == (
        "CMP-2024-0815",
        "closed",
        "repair_quality",
    )
    assert event.severity == 3
    assert event.compensation_amount == 200.0
    assert event.satisfied_after is True


@pytest.mark.parametrize("status", ["opened", "responded", "resolved", "closed", "reopened"])
def test_complaint_state_changes_without_optional_fields(status: str) -> None:
    payload = complaint_payload() | {"status": status, "severity": 1}
    for field in ("visit_id", "compensation_amount", "satisfied_after", "comment"):
        del payload[field]
    event = parse_event(raw(payload), now=NOW)

    assert isinstance(event, ComplaintEvent)
    assert event.status == status
    assert event.visit_id is None and event.compensation_amount is None
    assert event.satisfied_after is None and event.comment is None


def test_event_type_lists() -> None:
    assert set(EVENT_TYPES) == {"visit", "survey", "call", "mystery_shop", "complaint"}
    assert SUPPORTED_EVENT_TYPES == EVENT_TYPES
    assert set(PAYLOADS) == set(EVENT_TYPES)


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
    # call
    (
        "call without visit_id",
        {k: v for k, v in call_payload().items() if k != "visit_id"},
        ["visit_id: is required"],
    ),
    (
        "call visit_id too long",
        with_changes(call_payload(), visit_id="R" * 129),
        ["visit_id: must have at most 128 characters"],
    ),
    (
        "unknown call outcome",
        with_changes(call_payload(), outcome="voicemail"),
        ["outcome: must be 'reached', 'no_answer', 'refused', 'wrong_number' or", "'voicemail'"],
    ),
    (
        "negative duration",
        with_changes(call_payload(), duration_s=-0.5),
        ["duration_s: must be greater than or equal to 0 (got -0.5)"],
    ),
    (
        "non-finite duration",
        with_changes(call_payload(), duration_s=float("inf")),
        ["duration_s: must be a finite number"],
    ),
    (
        "satisfaction_confirmed as 1",
        with_changes(call_payload(), satisfaction_confirmed=1),
        ["satisfaction_confirmed: must be a valid boolean (got 1)"],
    ),
    (
        "issue_reported as a string",
        with_changes(call_payload(), issue_reported="no"),
        ["issue_reported: must be a valid boolean (got 'no')"],
    ),
    (
        "call rating off its scale",
        with_changes(call_payload(), ratings={"work_quality": 6}),
        ["ratings.work_quality: must be within the call scale 1–5 (got 6)"],
    ),
    (
        "call overall off its scale",
        with_changes(call_payload(), overall=0.5),
        ["overall: must be within the call scale 1–5 (got 0.5)"],
    ),
    (
        "call rating code with a dot",
        with_changes(call_payload(), ratings={"work.quality": 5}),
        ["ratings: key 'work.quality' must match pattern"],
    ),
    (
        "call scale upside down",
        with_changes(call_payload(), scale={"min": 5, "max": 5}),
        ["scale: min must be less than max (got min 5, max 5)"],
    ),
    (
        "ratings on an unanswered call",
        with_changes(call_payload(), outcome="no_answer", overall=None),
        ["ratings: a call that did not reach the customer cannot carry ratings (outcome 'no_"],
    ),
    (
        "overall on a refused call",
        with_changes(call_payload(), outcome="refused", ratings={}),
        ["overall: a call that did not reach the customer cannot carry ratings (outcome 'ref"],
    ),
    (
        "call comment too long",
        with_changes(call_payload(), comment="x" * 5001),
        ["comment: must be at most 5000 characters (got 5001)"],
    ),
    (
        "survey field on a call",
        with_changes(call_payload(), recommend=9),
        ["recommend: unknown field, not allowed"],
    ),
    # mystery_shop
    (
        "mystery shop without audit_id",
        {k: v for k, v in mystery_shop_payload().items() if k != "audit_id"},
        ["audit_id: is required"],
    ),
    (
        "empty audit_id",
        with_changes(mystery_shop_payload(), audit_id=""),
        ["audit_id: must have at least 1 character"],
    ),
    (
        "unknown scenario",
        with_changes(mystery_shop_payload(), scenario="test_drive"),
        ["scenario: must be 'service_visit', 'phone_inquiry', 'sales_visit',", "'test_drive'"],
    ),
    (
        "no audit items",
        with_changes(mystery_shop_payload(), items=[]),
        ["items: must have at least 1 item"],
    ),
    (
        "too many audit items",
        with_changes(
            mystery_shop_payload(),
            items=[
                {"code": f"c{i}", "section": "s", "weight": 1, "result": "pass"}
                for i in range(MAX_AUDIT_ITEMS + 1)
            ],
        ),
        [f"items: must have at most {MAX_AUDIT_ITEMS} items"],
    ),
    (
        "items not a list",
        with_changes(mystery_shop_payload(), items={"greeted": "pass"}),
        ["items: must be a valid array (got object)"],
    ),
    (
        "item not an object",
        with_changes(mystery_shop_payload(), items=["greeted"]),
        ["items.0: must be a JSON object (got string)"],
    ),
    (
        "item code with a space",
        with_changes(
            mystery_shop_payload(),
            items=[{"code": "greeted in time", "section": "r", "weight": 1, "result": "pass"}],
        ),
        ["items.0.code: must match pattern", "'greeted in time'"],
    ),
    (
        "item section empty",
        with_changes(
            mystery_shop_payload(),
            items=[{"code": "greeted", "section": "", "weight": 1, "result": "pass"}],
        ),
        ["items.0.section: must match pattern"],
    ),
    (
        "item weight zero",
        with_changes(
            mystery_shop_payload(),
            items=[{"code": "greeted", "section": "r", "weight": 0, "result": "pass"}],
        ),
        ["items.0.weight: must be greater than 0 (got 0)"],
    ),
    (
        "item weight not finite",
        with_changes(
            mystery_shop_payload(),
            items=[{"code": "greeted", "section": "r", "weight": float("nan"), "result": "pass"}],
        ),
        ["items.0.weight: must be a finite number"],
    ),
    (
        "item result unknown",
        with_changes(
            mystery_shop_payload(),
            items=[{"code": "greeted", "section": "r", "weight": 1, "result": "partial"}],
        ),
        ["items.0.result: must be 'pass', 'fail' or 'na' (got 'partial')"],
    ),
    (
        "item mandatory as 1",
        with_changes(
            mystery_shop_payload(),
            items=[
                {"code": "greeted", "section": "r", "weight": 1, "result": "pass", "mandatory": 1}
            ],
        ),
        ["items.0.mandatory: must be a valid boolean (got 1)"],
    ),
    (
        "item unknown field",
        with_changes(
            mystery_shop_payload(),
            items=[{"code": "greeted", "section": "r", "weight": 1, "result": "pass", "note": "x"}],
        ),
        ["items.0.note: unknown field, not allowed"],
    ),
    (
        "duplicate item code",
        with_changes(
            mystery_shop_payload(),
            items=[
                {"code": "greeted", "section": "reception", "weight": 1, "result": "pass"},
                {"code": "washed", "section": "delivery", "weight": 1, "result": "pass"},
                {"code": "greeted", "section": "delivery", "weight": 2, "result": "fail"},
            ],
        ),
        [
            "items.2.code: duplicate code 'greeted': codes must be unique within an audit"
            " (first at items.0)"
        ],
    ),
    (
        "pass mark above 100",
        with_changes(mystery_shop_payload(), pass_mark=100.5),
        ["pass_mark: must be less than or equal to 100 (got 100.5)"],
    ),
    (
        "pass mark negative",
        with_changes(mystery_shop_payload(), pass_mark=-1),
        ["pass_mark: must be greater than or equal to 0 (got -1)"],
    ),
    (
        "auditor_ref is an e-mail",
        with_changes(mystery_shop_payload(), auditor_ref="zhao.auditor@example.com"),
        ["auditor_ref: must be a pseudonymous hash, not PII", "e-mail"],
    ),
    (
        "auditor_ref is a phone number",
        with_changes(mystery_shop_payload(), auditor_ref="+86 138 1234 5678"),
        ["auditor_ref: must be a pseudonymous hash, not PII", "phone"],
    ),
    (
        "auditor_ref too short",
        with_changes(mystery_shop_payload(), auditor_ref="a1"),
        ["auditor_ref: must be a pseudonymous hash", "(got 2 characters)"],
    ),
    # complaint
    (
        "complaint without complaint_id",
        {k: v for k, v in complaint_payload().items() if k != "complaint_id"},
        ["complaint_id: is required"],
    ),
    (
        "complaint_id too long",
        with_changes(complaint_payload(), complaint_id="C" * 129),
        ["complaint_id: must have at most 128 characters"],
    ),
    (
        "unknown complaint status",
        with_changes(complaint_payload(), status="escalated"),
        ["status: must be 'opened', 'responded', 'resolved', 'closed' or 'reopened'"],
    ),
    (
        "unknown complaint category",
        with_changes(complaint_payload(), category="noise"),
        ["category: must be 'waiting_time', 'price', 'repair_quality',", "(got 'noise')"],
    ),
    (
        "severity 0",
        with_changes(complaint_payload(), severity=0),
        ["severity: must be greater than or equal to 1 (got 0)"],
    ),
    (
        "severity 5",
        with_changes(complaint_payload(), severity=5),
        ["severity: must be less than or equal to 4 (got 5)"],
    ),
    (
        "severity as a float",
        with_changes(complaint_payload(), severity=2.0),
        ["severity: must be a valid integer"],
    ),
    (
        "complaint visit_id empty",
        with_changes(complaint_payload(), visit_id=""),
        ["visit_id: must have at least 1 character"],
    ),
    (
        "negative compensation",
        with_changes(complaint_payload(), compensation_amount=-50),
        ["compensation_amount: must be greater than or equal to 0 (got -50)"],
    ),
    (
        "non-finite compensation",
        with_changes(complaint_payload(), compensation_amount=float("inf")),
        ["compensation_amount: must be a finite number"],
    ),
    (
        "satisfied_after as a string",
        with_changes(complaint_payload(), satisfied_after="yes"),
        ["satisfied_after: must be a valid boolean (got 'yes')"],
    ),
    (
        "satisfied_after before close",
        with_changes(complaint_payload(), status="resolved"),
        ["satisfied_after: only allowed when status is 'closed' (got status 'resolved')"],
    ),
    (
        "complaint comment too long",
        with_changes(complaint_payload(), comment="x" * 5001),
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
    reason = reason_for(with_changes(mystery_shop_payload(), auditor_ref="zhao.li@example.com"))
    assert "zhao.li" not in reason
    reason = reason_for(with_changes(mystery_shop_payload(), auditor_ref=13812345678))
    assert reason == "auditor_ref: must be a valid string"


@pytest.mark.parametrize("non_finite", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_rating_rejected(non_finite: str) -> None:
    text = raw(survey_payload()).replace(b'"on_time": 7.5', b'"on_time": ' + non_finite.encode())
    with pytest.raises(InvalidEvent) as caught:
        parse_event(text, now=NOW)
    assert "ratings.on_time: must be a finite number" in caught.value.reason


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_every_event_type_is_validated_by_its_own_model(event_type: str) -> None:
    # A visit body under another type is checked against that type's fields.
    other = "survey" if event_type == "visit" else "visit"
    reason = reason_for(with_changes(PAYLOADS[other](), event_type=event_type))
    assert "not supported yet" not in reason
    assert "unknown field, not allowed" in reason or "is required" in reason


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


@pytest.mark.parametrize(
    "payload",
    [
        *(make() for make in PAYLOADS.values()),
        with_changes(call_payload(), outcome="no_answer", ratings={}, overall=None),
        with_changes(complaint_payload(), status="opened", satisfied_after=None),
    ],
    ids=[*PAYLOADS, "call_no_answer", "complaint_opened"],
)
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


@pytest.mark.parametrize(
    "make_payload", [call_payload, complaint_payload], ids=["call", "complaint"]
)
def test_call_and_complaint_comments_are_scrubbed(make_payload: Any) -> None:
    comment = "回电 13812345678 或 zhang.san@qq.com"
    event = parse_event(raw(with_changes(make_payload(), comment=comment)), now=NOW)
    assert isinstance(event, CallEvent | ComplaintEvent)
    assert event.comment == "回电 [phone] 或 [email]"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("0123456789 +-.()@abc.xyz请拨打")))
def test_scrubbing_is_idempotent(text: str) -> None:
    once = scrub_personal_data(text)
    assert scrub_personal_data(once) == once


# --- nothing but InvalidEvent, whatever arrives -------------------------------------


def assert_parses_or_gives_reason(data: bytes | str) -> None:
    try:
        event = parse_event(data, now=NOW)
    except InvalidEvent as exc:
        assert exc.reason
        assert "\n" not in exc.reason
        assert not exc.reason.startswith("internal error"), exc.reason
        assert "not supported yet" not in exc.reason
    else:
        assert parse_event(event_to_json(event), now=NOW) == event


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


ALL_FIELDS = sorted({field for make in PAYLOADS.values() for field in make()} | {"department"})
ITEM_FIELDS = ["code", "section", "weight", "result", "mandatory"]
# Values that are valid somewhere: another type's tag, an outcome or status that changes
# which rules apply, a result.
field_values = json_values | st.sampled_from(
    [*EVENT_TYPES, "no_answer", "reached", "opened", "closed", "pass", "na", 0.0, 1e-300]
)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(EVENT_TYPES),
    st.dictionaries(st.sampled_from(ALL_FIELDS), field_values, max_size=8),
)
def test_arbitrary_bodies_of_every_type(event_type: str, body: dict[str, object]) -> None:
    # A valid envelope with arbitrary values for any event's fields: reaches each model.
    envelope = {k: v for k, v in visit_payload().items() if k in ("event_id", "schema_version")}
    envelope |= {"dealer_id": "SH-1", "occurred_at": "2024-05-01T00:00:00Z"}
    envelope |= {"customer_ref": "c9f1a2b3d4e5f607", "source": "web"}
    assert_parses_or_gives_reason(raw(envelope | body | {"event_type": event_type}))


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(EVENT_TYPES),
    st.lists(
        st.tuples(
            st.sampled_from(["delete", "set", "add"]),
            st.sampled_from(ALL_FIELDS),
            field_values,
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_mutated_events(event_type: str, mutations: list[tuple[str, str, object]]) -> None:
    payload: dict[str, Any] = PAYLOADS[event_type]()
    for operation, field, value in mutations:
        if operation == "delete":
            payload.pop(field, None)
        elif operation == "set":
            payload[field] = value
        else:
            payload[f"x_{field}"] = value
    assert_parses_or_gives_reason(raw(payload))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["delete", "set", "add", "copy"]),
            st.integers(min_value=0, max_value=2),
            st.sampled_from(ITEM_FIELDS),
            field_values | st.sampled_from(["fail", "greeted_in_time"]),
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_mutated_audit_items(mutations: list[tuple[str, int, str, object]]) -> None:
    payload = mystery_shop_payload()
    items: list[dict[str, Any]] = payload["items"]
    for operation, index, field, value in mutations:
        item = items[index]
        if operation == "delete":
            item.pop(field, None)
        elif operation == "set":
            item[field] = value
        elif operation == "add":
            item[f"x_{field}"] = value
        else:  # duplicate a field of another item, e.g. its code
            item[field] = items[(index + 1) % len(items)].get(field)
    assert_parses_or_gives_reason(raw(payload))


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["reached", "no_answer", "refused", "wrong_number", "callback_requested"]),
    st.dictionaries(st.sampled_from(["booking", "on_time", "quality"]), st.integers(0, 11)),
    st.none() | st.floats(min_value=0, max_value=11, allow_nan=False),
)
def test_call_ratings_rule(outcome: str, ratings: dict[str, int], overall: float | None) -> None:
    payload = with_changes(call_payload(), outcome=outcome, ratings=ratings, overall=overall)
    del payload["scale"]  # 1–10
    answers = [*ratings.values(), *([] if overall is None else [overall])]
    carries = bool(answers)
    valid = (outcome == "reached" or not carries) and all(1 <= a <= 10 for a in answers)
    try:
        event = parse_event(raw(payload), now=NOW)
    except InvalidEvent as exc:
        assert not valid, exc.reason
        not_reached = "did not reach the customer cannot carry ratings" in exc.reason
        assert not_reached == (outcome != "reached" and carries)
    else:
        assert valid
        assert isinstance(event, CallEvent)
        assert event.carries_ratings == carries


# --- plates and VINs (issue 7: no PII stored) ------------------------------------


@pytest.mark.parametrize(
    ("comment", "stored"),
    [
        ("车牌京A12345的车洗得不干净", "车牌[plate]的车洗得不干净"),
        ("我的车是粤B·D12345，电话13812345678", "我的车是[plate]，电话[phone]"),
        ("车牌号 沪C88888 的保养记录不对", "车牌号 [plate] 的保养记录不对"),
        ("VIN LSVAU2180N2183294 still rattles", "VIN [vin] still rattles"),
        ("车架号lsvau2180n2183294有问题", "车架号[vin]有问题"),
        ("plate ABC-1234 was swapped", "plate [plate] was swapped"),
        ("License plate: B-XY 1234 scratched", "License plate: [plate] scratched"),
        ("reg: KA 05 1234 please", "reg: [plate] please"),
        ("my reg is AB12 CDE", "my reg is [plate]"),
        # not personal data: left alone
        ("the plate was dirty", "the plate was dirty"),
        ("regular service was fine, 45 minutes", "regular service was fine, 45 minutes"),
        ("invoice 1234.50 on 2026-05-01", "invoice 1234.50 on 2026-05-01"),
        ("ABCDEFGHJKLMNPRST is just shouting", "ABCDEFGHJKLMNPRST is just shouting"),
    ],
)
def test_plates_and_vins_are_scrubbed(comment: str, stored: str) -> None:
    assert scrub_personal_data(comment) == stored
    assert scrub_personal_data(stored) == stored  # a stored comment validates to itself


def test_a_survey_comment_is_stored_without_the_plate() -> None:
    payload = {**survey_payload(), "comment": "车牌京A12345，VIN LSVAU2180N2183294"}
    survey = parse_event(json.dumps(payload))
    assert isinstance(survey, SurveyEvent)
    assert survey.comment == "车牌[plate]，VIN [vin]"
