"""Alerts and cases (issue 4), broker-free: hot responses and the cases they open,
case actions, overdue escalation and recovery, complaint SLAs, mystery shops and
drop alerts, all by event time. Expected values are worked out by hand in comments.

Events are built as JSON, validated by `parse_event` and fed in order to an
`AlertEngine` over a `DictStore`, or, where the topic routing matters, through
`DealerProcessor` as Kafka records.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.alerts import (
    Alert,
    AlertEngine,
    AlertSettings,
    Case,
    Record,
    hot_reasons,
    load_alert_settings,
)
from pipeline.catalogue import load_catalogue
from pipeline.metrics import SLA_FIRST_RESPONSE_HOURS, SLA_RESOLUTION_HOURS
from pipeline.stream import DealerProcessor, DictStore, RawRecord
from pipeline.topics import CASE_ACTIONS, EVENT_TOPICS
from schemas import AnyEvent, InvalidEvent, parse_event
from schemas.cases import CaseAction, parse_case_action

CATALOGUE = load_catalogue()
ATTRIBUTES = sorted(CATALOGUE.attribute_factor)
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
"""The validation clock: after every event of this file."""
T = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
"""When the hot response (or the complaint) of a test happens."""
H = timedelta(hours=1)
CUSTOMER = "c0ffee00c0ffee00"
OTHER_CUSTOMER = "beefcafe12345678"
CASE_ID = re.compile(r"^D001/[0-9a-f]{10}$")
SOURCES = {"survey": "survey_vendor", "call": "call_centre", "mystery_shop": "auditor"}


# --- building events ---------------------------------------------------------------


def envelope(
    event_type: str, dealer: str, at: datetime, customer: str = CUSTOMER, **body: Any
) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": event_type,
        "schema_version": 1,
        "dealer_id": dealer,
        "department": "service",
        "occurred_at": at.isoformat(),
        "customer_ref": customer,
        "source": SOURCES.get(event_type, "dms"),
        **body,
    }


def survey(
    dealer: str = "D001",
    at: datetime = T,
    *,
    overall: float | None = None,
    recommend: int | None = None,
    comment: str | None = None,
    scale: tuple[int, int] = (1, 10),
    ratings: dict[str, float] | None = None,
    customer: str = CUSTOMER,
) -> dict[str, Any]:
    body: dict[str, Any] = {"channel": "web", "scale": {"min": scale[0], "max": scale[1]}}
    if ratings:
        body["ratings"] = ratings
    if overall is not None:
        body["overall"] = overall
    if recommend is not None:
        body["recommend"] = recommend
    if comment is not None:
        body["comment"] = comment
    return envelope("survey", dealer, at, customer, **body)


def call(
    dealer: str = "D001",
    at: datetime = T,
    *,
    issue_reported: bool | None = None,
    overall: float | None = None,
    customer: str = CUSTOMER,
) -> dict[str, Any]:
    body: dict[str, Any] = {"visit_id": "RO-1", "outcome": "reached"}
    if issue_reported is not None:
        body["issue_reported"] = issue_reported
    if overall is not None:
        body["overall"] = overall
    return envelope("call", dealer, at, customer, **body)


def visit(dealer: str = "D001", at: datetime = T) -> dict[str, Any]:
    """A repair order: it moves the dealer's event clock and nothing else."""
    return envelope(
        "visit", dealer, at, OTHER_CUSTOMER, visit_id=str(uuid.uuid4()), appointment=True,
        arrived_at=at.isoformat(),
    )  # fmt: skip


def complaint(
    status: str, at: datetime, *, complaint_id: str = "CMP-1", severity: int = 3
) -> dict[str, Any]:
    return envelope(
        "complaint", "D001", at, complaint_id=complaint_id, status=status,
        category="waiting_time", severity=severity,
    )  # fmt: skip


def item(code: str, weight: float, result: str, mandatory: bool = False) -> dict[str, Any]:
    return {
        "code": code, "section": "reception", "weight": weight, "result": result,
        "mandatory": mandatory,
    }  # fmt: skip


def audit(
    at: datetime,
    items: list[dict[str, Any]],
    *,
    pass_mark: float | None = None,
    scenario: str = "service_visit",
) -> dict[str, Any]:
    body: dict[str, Any] = {"audit_id": f"A-{at:%m%d}", "scenario": scenario, "items": items}
    if pass_mark is not None:
        body["pass_mark"] = pass_mark
    return envelope("mystery_shop", "D001", at, **body)


def parse(data: dict[str, Any]) -> AnyEvent:
    return parse_event(orjson.dumps(data), now=NOW)


def labels(dealer: str) -> tuple[str, str]:
    return "North", "BrandA"


def new_engine(settings: AlertSettings | None = None) -> AlertEngine:
    return AlertEngine(DictStore(), CATALOGUE, settings or AlertSettings(), labels)


def feed(engine: AlertEngine, *events: dict[str, Any]) -> list[Record]:
    """Every record the events raise, fed in order (one batch)."""
    out: list[Record] = []
    for event in events:
        out += engine.on_event(parse(event), partition=0)
    engine.flush()
    return out


def act(
    case_id: str,
    action: str,
    at: datetime,
    *,
    reason: str | None = None,
    comment: str | None = None,
    action_id: str | None = None,
) -> CaseAction:
    return parse_case_action(
        orjson.dumps(
            {
                "action_id": action_id or str(uuid.uuid4()),
                "case_id": case_id,
                "dealer_id": case_id.split("/")[0],
                "action": action,
                "occurred_at": at.isoformat(),
                "by": "advisor.li",
                "reason": reason,
                "comment": comment,
            }
        )
    )


def apply(engine: AlertEngine, action: CaseAction) -> list[Record]:
    out = engine.on_case_action(action, partition=0)
    engine.flush()
    return out


def alerts(records: Sequence[Record]) -> list[Alert]:
    return [r for r in records if isinstance(r, Alert)]


def cases(records: Sequence[Record]) -> list[Case]:
    return [r for r in records if isinstance(r, Case)]


def open_case(engine: AlertEngine, at: datetime = T) -> tuple[Alert, Case]:
    """A hot survey (overall 1 of 1–10) of CUSTOMER at D001: its alert and its case."""
    [alert, case] = feed(engine, survey(at=at, overall=1))
    assert isinstance(alert, Alert) and isinstance(case, Case)
    return alert, case


# --- 1. hot reasons ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        # hot below min + 2 points: 1 and 2 on 1–10 (< 3), 1 and 2 on 1–5 (< 3)
        (survey(overall=1), ["overall 1 of 1–10"]),
        (survey(overall=2), ["overall 2 of 1–10"]),
        (survey(overall=3), []),
        (survey(overall=1, scale=(1, 5)), ["overall 1 of 1–5"]),
        (survey(overall=2, scale=(1, 5)), ["overall 2 of 1–5"]),
        (survey(overall=3, scale=(1, 5)), []),
        # a detractor (0–6) is hot only with a comment; a promoter never
        (survey(recommend=6, comment="Waited three hours"), ["detractor (6/10) with a comment"]),
        (survey(recommend=0, comment="Never again"), ["detractor (0/10) with a comment"]),
        (survey(recommend=6), []),
        (survey(recommend=7, comment="Fine I guess"), []),  # passive
        (survey(recommend=10, comment="Great service"), []),
        (call(issue_reported=True), ["issue reported on the follow-up call"]),
        (call(issue_reported=False, overall=8), []),
        (visit(), []),
        # both rules at once
        (
            survey(overall=2, recommend=3, comment="Rude"),
            ["overall 2 of 1–10", "detractor (3/10) with a comment"],
        ),
    ],
    ids=[
        "overall-1-of-10",
        "overall-2-of-10",
        "overall-3-of-10",
        "overall-1-of-5",
        "overall-2-of-5",
        "overall-3-of-5",
        "detractor-comment",
        "detractor-0-comment",
        "detractor-silent",
        "passive-comment",
        "promoter-comment",
        "call-issue",
        "call-no-issue",
        "visit",
        "two-reasons",
    ],
)
def test_hot_reasons(event: dict[str, Any], expected: list[str]) -> None:
    assert hot_reasons(parse(event), AlertSettings()) == expected


# --- 2. a hot response opens one case -----------------------------------------------------


def test_hot_survey_opens_exactly_one_case_with_due_times() -> None:
    bad = survey(overall=2, comment="Car came back scratched")
    records = feed(new_engine(), bad)
    assert [type(r) for r in records] == [Alert, Case]
    [alert], [case] = alerts(records), cases(records)
    assert (alert.kind, alert.status, alert.metric) == ("hot", "open", "response")
    assert (alert.scope, alert.key) == ("dealer", "D001")
    assert (alert.region, alert.brand) == ("North", "BrandA")
    assert (alert.current, alert.n, alert.event_id) == (2.0, 1, bad["event_id"])
    assert alert.detected_at == alert.updated_at == T
    assert CASE_ID.match(case.case_id) and alert.case_id == case.case_id
    assert (case.status, case.change, case.seq, case.hot_events) == ("open", "opened", 1, 1)
    assert (case.dealer_id, case.customer_ref) == ("D001", CUSTOMER)
    assert case.source_event_id == bad["event_id"]
    assert case.reasons == ["overall 2 of 1–10"]
    assert case.opened_at == case.updated_at == T
    # 2 Mar 09:00 + 24 h = 3 Mar 09:00; + 168 h = 7 days later, 9 Mar 09:00
    assert case.contact_due_at == datetime(2026, 3, 3, 9, 0, tzinfo=UTC)
    assert case.resolve_due_at == datetime(2026, 3, 9, 9, 0, tzinfo=UTC)
    assert (case.recovery, case.escalation_level) == ("pending", 0)
    assert "Contact the customer by 2026-03-03 09:00 UTC" in alert.message
    assert '"Car came back scratched"' in alert.message
    assert case.case_id in alert.message


def test_case_and_alert_ids_are_deterministic_in_a_replay() -> None:
    bad = survey(overall=1)
    first = feed(new_engine(), bad)
    again = feed(new_engine(), bad)  # the same event into a fresh engine
    assert [r.to_message() for r in again] == [r.to_message() for r in first]
    assert cases(again)[0].case_id == cases(first)[0].case_id
    assert alerts(again)[0].alert_id == alerts(first)[0].alert_id
    # another hot event, same customer and moment, in a fresh engine: other ids
    other = feed(new_engine(), survey(overall=1))
    assert cases(other)[0].case_id != cases(first)[0].case_id
    assert alerts(other)[0].alert_id != alerts(first)[0].alert_id


def test_same_customer_hot_again_does_not_open_a_second_case() -> None:
    engine = new_engine()
    _, opened = open_case(engine)
    again = feed(engine, call(at=T + 3 * H, issue_reported=True))
    # the customer's next response is hot, so first it says "not recovered" (seq 2)
    assert [type(r) for r in again] == [Case, Alert, Case]
    [alert], [verdict, case] = alerts(again), cases(again)
    assert (verdict.change, verdict.recovery, verdict.seq) == ("recovery", "not_recovered", 2)
    assert alert.case_id == case.case_id == opened.case_id
    assert (case.change, case.hot_events, case.seq, case.status) == ("hot_again", 2, 3, "open")
    assert case.reasons == ["overall 1 of 1–10", "issue reported on the follow-up call"]
    assert case.opened_at == T and case.updated_at == T + 3 * H
    assert case.contact_due_at == opened.contact_due_at  # the clock is not restarted
    # another customer's hot response at the same dealer is another case
    [_, other] = feed(engine, survey(at=T + 4 * H, overall=2, customer=OTHER_CUSTOMER))
    assert isinstance(other, Case)
    assert other.change == "opened" and other.case_id != opened.case_id


def test_closing_a_case_closes_every_hot_alert_it_raised() -> None:
    engine = new_engine()
    first, case = open_case(engine)
    [second] = alerts(feed(engine, call(at=T + 3 * H, issue_reported=True)))
    apply(engine, act(case.case_id, "contact", T + 4 * H))
    closing = apply(
        engine, act(case.case_id, "close", T + 5 * H, reason="other", comment="Called twice")
    )
    opened_ids = {first.alert_id, second.alert_id}
    closed_ids = {a.alert_id for a in alerts(closing) if a.status == "closed"}
    assert closed_ids == opened_ids


# --- 3. case lifecycle ----------------------------------------------------------------


def test_case_lifecycle_contact_resolve_close() -> None:
    engine = new_engine()
    hot, case = open_case(engine)
    [contacted] = apply(engine, act(case.case_id, "contact", T + 2 * H))
    assert isinstance(contacted, Case)
    assert (contacted.status, contacted.change, contacted.seq) == ("contacted", "contact", 2)
    assert contacted.contacted_at == contacted.updated_at == T + 2 * H
    [resolved] = apply(engine, act(case.case_id, "resolve", T + 20 * H))
    assert isinstance(resolved, Case)
    assert (resolved.status, resolved.change, resolved.seq) == ("resolved", "resolve", 3)
    assert resolved.resolved_at == T + 20 * H and resolved.contacted_at == T + 2 * H
    closing = apply(
        engine,
        act(case.case_id, "close", T + 30 * H, reason="resolved", comment="Paint redone, happy"),
    )
    assert [type(r) for r in closing] == [Case, Alert]
    [closed], [closed_hot] = cases(closing), alerts(closing)
    assert (closed.status, closed.change, closed.seq) == ("closed", "close", 4)
    assert (closed.close_reason, closed.comment) == ("resolved", "Paint redone, happy")
    assert closed.closed_at == T + 30 * H
    assert (closed.contacted_at, closed.resolved_at) == (T + 2 * H, T + 20 * H)
    assert closed.escalation_level == 0  # contacted after 2 h, resolved after 20 h: never late
    # the hot alert closes: same id, same opening moment, updated at the close
    assert (closed_hot.kind, closed_hot.status) == ("hot", "closed")
    assert closed_hot.alert_id == hot.alert_id and closed_hot.case_id == case.case_id
    assert closed_hot.detected_at == T and closed_hot.updated_at == T + 30 * H
    assert closed_hot.message == (f"Case {case.case_id} closed (resolved): Paint redone, happy")


def test_invalid_transitions_raise_with_a_reason_and_change_nothing() -> None:
    engine = new_engine()
    _, case = open_case(engine)
    cid = case.case_id
    with pytest.raises(InvalidEvent) as resolve_open:
        apply(engine, act(cid, "resolve", T + H))
    assert resolve_open.value.reason == (
        f"action: cannot resolve case {cid} while it is open (allowed from contacted)"
    )
    [contacted] = apply(engine, act(cid, "contact", T + 2 * H))
    assert isinstance(contacted, Case) and contacted.seq == 2  # the rejected action took no seq
    with pytest.raises(InvalidEvent) as close_resolved:
        apply(engine, act(cid, "close", T + 3 * H, reason="resolved", comment="Done"))
    assert close_resolved.value.reason == (
        f"reason: case {cid} is contacted, not resolved; "
        "close it with another reason or resolve it first"
    )
    with pytest.raises(InvalidEvent, match=r"cannot contact case .* while it is contacted"):
        apply(engine, act(cid, "contact", T + 3 * H))
    closing = apply(
        engine, act(cid, "close", T + 4 * H, reason="customer_unreachable", comment="3 calls")
    )
    assert cases(closing)[0].seq == 3
    with pytest.raises(InvalidEvent) as contact_closed:
        apply(engine, act(cid, "contact", T + 5 * H))
    assert contact_closed.value.reason == (
        f"action: cannot contact case {cid} while it is closed (allowed from open)"
    )


@pytest.mark.parametrize(
    ("fields", "reasons"),
    [
        ({"reason": None, "comment": None}, [
            "reason: closing a case needs a reason", "comment: closing a case needs a comment",
        ]),
        ({"reason": "other", "comment": "   "}, ["comment: closing a case needs a comment"]),
        ({"reason": None, "comment": "Done"}, ["reason: closing a case needs a reason"]),
    ],
    ids=["neither", "blank-comment", "no-reason"],
)  # fmt: skip
def test_schema_rejects_close_without_reason_or_comment(
    fields: dict[str, Any], reasons: list[str]
) -> None:
    raw = {
        "action_id": str(uuid.uuid4()), "case_id": "D001/0123456789", "dealer_id": "D001",
        "action": "close", "occurred_at": T.isoformat(), "by": "advisor.li", **fields,
    }  # fmt: skip
    with pytest.raises(InvalidEvent) as rejected:
        parse_case_action(orjson.dumps(raw))
    for reason in reasons:
        assert reason in rejected.value.reason


def test_schema_rejects_a_reason_on_contact_and_a_foreign_dealer() -> None:
    with pytest.raises(InvalidEvent, match="reason: only a close action takes a reason"):
        act("D001/0123456789", "contact", T, reason="other")
    raw = {
        "action_id": str(uuid.uuid4()), "case_id": "D001/0123456789", "dealer_id": "D002",
        "action": "contact", "occurred_at": T.isoformat(), "by": "advisor.li",
    }  # fmt: skip
    with pytest.raises(InvalidEvent, match="dealer_id: case D001/0123456789 belongs to another"):
        parse_case_action(orjson.dumps(raw))


def test_action_for_an_unknown_case_raises() -> None:
    engine = new_engine()
    open_case(engine)
    with pytest.raises(InvalidEvent) as unknown:
        apply(engine, act("D001/0123456789", "contact", T + H))
    assert unknown.value.reason == "case_id: no case 'D001/0123456789' is known"


def test_replayed_action_returns_nothing_and_changes_nothing() -> None:
    engine = new_engine()
    _, case = open_case(engine)
    action_id = str(uuid.uuid4())
    contact = act(case.case_id, "contact", T + 2 * H, action_id=action_id)
    assert len(apply(engine, contact)) == 1
    assert apply(engine, contact) == []
    # even a copy sent later with the same id is a replay
    assert apply(engine, act(case.case_id, "contact", T + 9 * H, action_id=action_id)) == []
    [resolved] = apply(engine, act(case.case_id, "resolve", T + 10 * H))
    assert isinstance(resolved, Case)
    assert resolved.seq == 3 and resolved.contacted_at == T + 2 * H  # 1 open, 2 contact, 3


def test_reopen_after_close_goes_back_to_contacted_or_open() -> None:
    engine = new_engine()
    _, case = open_case(engine)
    apply(engine, act(case.case_id, "contact", T + 2 * H))
    apply(engine, act(case.case_id, "close", T + 3 * H, reason="other", comment="Voucher sent"))
    [reopened] = apply(engine, act(case.case_id, "reopen", T + 50 * H))
    assert isinstance(reopened, Case)
    # seq: 1 opened, 2 contact, 3 close, 4 reopen
    assert (reopened.status, reopened.change, reopened.seq) == ("contacted", "reopen", 4)
    assert reopened.contacted_at == T + 2 * H
    assert reopened.closed_at is None and reopened.resolved_at is None
    # the reopened case is watched again: resolution due at T + 168 h escalates
    [late] = feed(engine, visit(at=T + 170 * H))
    assert isinstance(late, Case)
    assert (late.change, late.escalation_level, late.seq) == ("escalated_resolution", 2, 5)

    # never contacted: reopen goes back to open
    other = new_engine()
    _, fresh = open_case(other)
    apply(other, act(fresh.case_id, "close", T + H, reason="duplicate", comment="Same as before"))
    [back] = apply(other, act(fresh.case_id, "reopen", T + 2 * H))
    assert isinstance(back, Case) and (back.status, back.seq) == ("open", 3)
    assert back.contacted_at is None


# --- 4. overdue escalation by event time ------------------------------------------------


def test_open_case_escalates_by_event_time() -> None:
    engine = new_engine()
    _, case = open_case(engine)
    # the wall clock is months past every due time: only event time counts
    assert feed(engine, visit(at=T + 23 * H)) == []  # 23 h < 24 h contact due
    [contact_late] = feed(engine, visit(at=T + 25 * H))  # 25 h > 24 h
    assert isinstance(contact_late, Case)
    assert (contact_late.case_id, contact_late.status) == (case.case_id, "open")
    assert (contact_late.change, contact_late.escalation_level) == ("escalated_contact", 1)
    assert contact_late.seq == 2 and contact_late.updated_at == T + 25 * H
    assert feed(engine, visit(at=T + 100 * H)) == []  # level 1 once
    [resolve_late] = feed(engine, visit(at=T + 169 * H))  # 169 h > 168 h, still open
    assert isinstance(resolve_late, Case)
    assert (resolve_late.change, resolve_late.escalation_level) == ("escalated_resolution", 2)
    assert resolve_late.seq == 3
    assert feed(engine, visit(at=T + 300 * H)) == []  # level 2 once


def test_contacted_case_does_not_escalate_for_contact() -> None:
    engine = new_engine()
    _, case = open_case(engine)
    apply(engine, act(case.case_id, "contact", T + 2 * H))
    assert feed(engine, visit(at=T + 25 * H), visit(at=T + 167 * H)) == []
    [late] = feed(engine, visit(at=T + 169 * H))
    assert isinstance(late, Case)
    assert (late.change, late.escalation_level, late.status) == (
        "escalated_resolution", 2, "contacted",
    )  # fmt: skip


def test_events_of_another_dealer_do_not_move_the_clock() -> None:
    engine = new_engine()
    open_case(engine)
    assert feed(engine, visit("D002", T + 200 * H), survey("D002", T + 300 * H, overall=9)) == []
    assert feed(engine, visit(at=T + 23 * H)) == []  # D001's clock: 23 h, nothing due
    [late] = feed(engine, visit(at=T + 25 * H))
    assert isinstance(late, Case) and late.escalation_level == 1


def test_late_contact_is_first_seen_as_overdue() -> None:
    engine = new_engine()
    _, case = open_case(engine)
    # the action itself moves the clock to 30 h > 24 h: escalate, then contact
    records = apply(engine, act(case.case_id, "contact", T + 30 * H))
    assert [(c.change, c.seq, c.status) for c in cases(records)] == [
        ("escalated_contact", 2, "open"), ("contact", 3, "contacted"),
    ]  # fmt: skip


# --- 5. recovery ---------------------------------------------------------------------


def test_next_satisfied_survey_records_recovery() -> None:
    engine = new_engine()
    _, case = open_case(engine)
    apply(engine, act(case.case_id, "contact", T + 2 * H))
    # another customer's good survey says nothing about this case
    assert feed(engine, survey(at=T + 10 * H, overall=9, customer=OTHER_CUSTOMER)) == []
    good = survey(at=T + 72 * H, overall=9, recommend=9)  # (9 − 1)/9 = 0.89 ≥ 0.5, not hot
    [recovery] = feed(engine, good)
    assert isinstance(recovery, Case)
    assert (recovery.change, recovery.recovery, recovery.seq) == ("recovery", "recovered", 3)
    assert recovery.recovery_event_id == good["event_id"]
    assert recovery.status == "contacted" and recovery.updated_at == T + 72 * H
    # only the first response after the case counts
    assert feed(engine, survey(at=T + 80 * H, overall=4)) == []


def test_next_bad_survey_records_no_recovery() -> None:
    engine = new_engine()
    _, case = open_case(engine)
    apply(engine, act(case.case_id, "contact", T + 2 * H))
    # overall 4: not hot (4 ≥ 1 + 2), dissatisfied: (4 − 1)/9 = 0.33 < 0.5
    bad = survey(at=T + 72 * H, overall=4)
    [verdict] = feed(engine, bad)
    assert isinstance(verdict, Case)
    assert (verdict.change, verdict.recovery) == ("recovery", "not_recovered")
    assert verdict.recovery_event_id == bad["event_id"]


def test_hot_again_is_no_recovery() -> None:
    engine = new_engine()
    open_case(engine)
    records = feed(engine, survey(at=T + 5 * H, overall=2))
    assert [(c.change, c.recovery, c.hot_events) for c in cases(records)] == [
        ("recovery", "not_recovered", 1), ("hot_again", "not_recovered", 2),
    ]  # fmt: skip


# --- 6. complaint SLA -------------------------------------------------------------------


def test_defaults_are_the_metrics_sla_tables() -> None:
    settings = AlertSettings()
    assert settings.sla_first_response_hours[3] == SLA_FIRST_RESPONSE_HOURS[3] == 8
    assert settings.sla_resolution_hours[3] == SLA_RESOLUTION_HOURS[3] == 120


def test_first_response_past_due_opens_then_closes_one_alert() -> None:
    engine = new_engine()
    assert feed(engine, complaint("opened", T)) == []
    assert feed(engine, visit(at=T + 7 * H)) == []  # 7 h < 8 h due (severity 3)
    [late] = feed(engine, visit(at=T + 9 * H))
    assert isinstance(late, Alert)
    assert (late.kind, late.metric, late.status) == ("complaint_sla", "first_response", "open")
    assert (late.scope, late.key, late.region) == ("dealer", "D001", "North")
    # due at T + 8 h: that is when it became overdue; seen at 9 h
    assert late.detected_at == T + 8 * H and late.updated_at == T + 8 * H
    assert (late.baseline, late.current, late.n) == (8.0, 9.0, 1)
    assert "CMP-1" in late.message and "severity 3" in late.message
    assert "due 2026-03-02 17:00 UTC" in late.message
    assert feed(engine, visit(at=T + 9.5 * H)) == []  # no duplicate
    [answered] = feed(engine, complaint("responded", T + 10 * H))
    assert isinstance(answered, Alert)
    assert (answered.alert_id, answered.status, answered.metric) == (
        late.alert_id, "closed", "first_response",
    )  # fmt: skip
    assert answered.current == 10.0 and answered.updated_at == T + 10 * H
    # more events before the resolution is due (T + 120 h): nothing more
    assert feed(engine, visit(at=T + 11 * H), complaint("responded", T + 12 * H)) == []
    assert feed(engine, visit(at=T + 119 * H)) == []


def test_complaint_answered_in_time_raises_nothing() -> None:
    engine = new_engine()
    records = feed(
        engine,
        complaint("opened", T),
        complaint("responded", T + 7 * H),  # < 8 h
        complaint("resolved", T + 100 * H),  # < 120 h
        visit(at=T + 500 * H),
    )
    assert records == []


def test_resolution_past_due_raises_a_resolution_alert() -> None:
    engine = new_engine()
    feed(engine, complaint("opened", T), complaint("responded", T + H))
    assert feed(engine, visit(at=T + 119 * H)) == []
    [late] = feed(engine, visit(at=T + 121 * H))
    assert isinstance(late, Alert)
    assert (late.metric, late.status, late.detected_at) == ("resolution", "open", T + 120 * H)
    assert (late.baseline, late.current) == (120.0, 121.0)
    assert "not resolved 120 h after it was opened" in late.message
    [done] = feed(engine, complaint("closed", T + 130 * H))
    assert isinstance(done, Alert)
    assert (done.alert_id, done.status, done.current) == (late.alert_id, "closed", 130.0)


def test_sla_settings_override_changes_the_due_time() -> None:
    fast = AlertSettings(sla_first_response_hours={1: 1, 2: 1, 3: 1, 4: 1})
    engine = new_engine(fast)
    feed(engine, complaint("opened", T))
    [late] = feed(engine, visit(at=T + 2 * H))  # due after 1 h, seen at 2 h
    assert isinstance(late, Alert)
    assert (late.metric, late.detected_at, late.baseline, late.current) == (
        "first_response", T + H, 1.0, 2.0,
    )  # fmt: skip
    # the defaults (8 h) see nothing at 2 h
    default = new_engine()
    assert feed(default, complaint("opened", T), visit(at=T + 2 * H)) == []


def test_resolved_without_first_response_closes_both_stages() -> None:
    engine = new_engine()
    feed(engine, complaint("opened", T, severity=4))  # severity 4: 4 h and 48 h
    [first] = feed(engine, visit(at=T + 5 * H))
    assert isinstance(first, Alert) and first.detected_at == T + 4 * H
    records = feed(engine, complaint("resolved", T + 6 * H))
    assert [(a.alert_id, a.metric, a.status) for a in alerts(records)] == [
        (first.alert_id, "first_response", "closed"),
    ]
    assert feed(engine, visit(at=T + 100 * H)) == []  # resolved: no resolution alert


def test_closed_sla_record_keeps_its_detected_at() -> None:
    engine = new_engine()
    opened = datetime(2026, 3, 31, 12, 0, tzinfo=UTC)
    feed(engine, complaint("opened", opened))
    [late] = feed(engine, visit(at=opened + 9 * H))  # overdue since 31 Mar 20:00
    [answered] = feed(engine, complaint("responded", opened + 14 * H))  # 1 Apr 02:00
    assert isinstance(late, Alert) and isinstance(answered, Alert)
    assert answered.alert_id == late.alert_id
    assert answered.detected_at == late.detected_at == opened + 8 * H


def test_partial_sla_table_keeps_the_other_severities(tmp_path: Path) -> None:
    path = tmp_path / "alerts.toml"
    path.write_text('[sla_first_response_hours]\n"3" = 2\n', encoding="utf-8")
    engine = new_engine(load_alert_settings(path))
    feed(engine, complaint("opened", T, severity=4))
    [late] = feed(engine, visit(at=T + 5 * H))  # severity 4 keeps its default 4 h
    assert isinstance(late, Alert) and late.detected_at == T + 4 * H


# --- 7. mystery shop ----------------------------------------------------------------------

# passed weight 2 + 3 + 2 = 7, failed 3, n/a 4 left out: 100 · 7 / 10 = 70 %
SEVENTY = [
    item("greeting", 2, "pass"), item("needs", 3, "pass"), item("explain", 2, "pass"),
    item("follow_up", 3, "fail"), item("test_drive", 4, "na"),
]  # fmt: skip
# 9 of 10 passed = 90 %, but the one failed item is mandatory
NINETY_MANDATORY_FAIL = [item("greeting", 9, "pass"), item("safety", 1, "fail", mandatory=True)]
PASSING = [item("greeting", 5, "pass"), item("needs", 5, "pass")]  # 100 %


def test_audit_below_the_default_pass_mark_alerts() -> None:
    audit_event = audit(T, SEVENTY)
    [alert] = feed(new_engine(), audit_event)
    assert isinstance(alert, Alert)
    assert (alert.kind, alert.metric, alert.status) == ("mystery_shop", "audit_score", "open")
    assert (alert.baseline, alert.current, alert.n) == (80.0, 70.0, 1)  # default mark 80
    assert alert.event_id == audit_event["event_id"] and alert.detected_at == T
    assert "scored 70% against a pass mark of 80%" in alert.message


def test_audit_above_its_own_pass_mark_raises_nothing() -> None:
    assert feed(new_engine(), audit(T, SEVENTY, pass_mark=60)) == []  # 70 ≥ 60


def test_failed_mandatory_item_alerts_despite_a_high_score() -> None:
    [alert] = feed(new_engine(), audit(T, NINETY_MANDATORY_FAIL))
    assert isinstance(alert, Alert)
    assert (alert.metric, alert.baseline, alert.current) == ("mandatory_item", 80.0, 90.0)
    assert "failed mandatory item safety" in alert.message


def test_next_passing_audit_of_the_scenario_closes_the_alert() -> None:
    engine = new_engine()
    [opened] = feed(engine, audit(T, SEVENTY))
    # a passing audit of another scenario leaves it open
    assert feed(engine, audit(T + 24 * H, PASSING, scenario="phone_inquiry")) == []
    [closed] = feed(engine, audit(T + 30 * 24 * H, PASSING))
    assert isinstance(opened, Alert) and isinstance(closed, Alert)
    assert (closed.alert_id, closed.status, closed.current) == (opened.alert_id, "closed", 100.0)
    assert feed(engine, audit(T + 60 * 24 * H, PASSING)) == []  # nothing left to close


def test_failing_again_supersedes_the_open_audit_alert() -> None:
    engine = new_engine()
    [first] = alerts(feed(engine, audit(T, SEVENTY)))
    [superseded, second] = alerts(feed(engine, audit(T + 24 * H, NINETY_MANDATORY_FAIL)))
    assert (superseded.alert_id, superseded.status) == (first.alert_id, "closed")
    assert (second.status, second.metric) == ("open", "mandatory_item")
    assert second.alert_id != first.alert_id
    assert superseded.message == "Superseded by audit A-0303."


def test_closed_audit_record_keeps_metric_and_detected_at() -> None:
    engine = new_engine()
    [opened] = feed(engine, audit(T, NINETY_MANDATORY_FAIL))
    [closed] = feed(engine, audit(T + 40 * 24 * H, PASSING))
    assert isinstance(opened, Alert) and isinstance(closed, Alert)
    assert closed.alert_id == opened.alert_id
    assert (closed.metric, closed.detected_at) == ("mandatory_item", T)


# --- 8. drop alerts through the engine ---------------------------------------------------


DROP_START = datetime(2025, 9, 1, 9, 0, tzinfo=UTC)


def responses(
    rng: random.Random, n: int, start: datetime, lower: float, first: int
) -> list[dict[str, Any]]:
    """Surveys 12 h apart rating every catalogue attribute around 8.5 − lower of 10:
    a customer mood (sd 0.6) plus item noise (sd 0.8), rounded and clipped to 1–10."""
    out = []
    for i in range(n):
        mood = rng.gauss(0.0, 0.6)
        ratings: dict[str, float] = {
            code: min(10, max(1, round(8.5 - lower + mood + rng.gauss(0.0, 0.8))))
            for code in ATTRIBUTES
        }
        out.append(
            survey(
                at=start + i * 12 * H, ratings=ratings,
                overall=min(10, max(1, round(8.5 - lower + mood))),
                recommend=rng.choices([10, 9, 8, 6], weights=[45, 40, 12, 3])[0],
                customer=f"cust{first + i:08d}",
            )
        )  # fmt: skip
    return out


def drop_alerts(events: list[dict[str, Any]]) -> list[tuple[int, Alert]]:
    engine = new_engine()
    found: list[tuple[int, Alert]] = []
    for index, event in enumerate(events):
        found += [(index, a) for a in alerts(engine.on_event(parse(event), 0)) if a.kind == "drop"]
    engine.flush()
    return found


def test_a_real_fall_opens_one_csi_alert_after_the_change() -> None:
    rng = random.Random(2)
    change = DROP_START + 300 * 12 * H  # 150 days of 2 surveys a day
    steady = responses(rng, 300, DROP_START, 0.0, 0)
    lowered = responses(rng, 150, change, 1.5, 300)  # 1.5 points ≈ 150 CSI points lower
    found = drop_alerts(steady + lowered)
    assert [i for i, _ in found if i < 300] == []  # nothing before the change
    csi_opened = [(i, a) for i, a in found if a.metric == "csi" and a.status == "open"]
    assert len(csi_opened) == 1
    [(index, alert)] = csi_opened
    assert index >= 300 and alert.detected_at >= change
    assert (alert.scope, alert.key, alert.department) == ("dealer", "D001", "service")
    assert alert.baseline is not None and alert.current is not None
    assert alert.baseline > alert.current and alert.n > 0
    # a steady dealer rates about 850 (8.5 of 10); the lowered one ~150 below
    assert 800 < alert.baseline < 900 and alert.current < alert.baseline - 50
    assert "D001" in alert.message and "fell from" in alert.message
    assert alert.event_id == (steady + lowered)[index]["event_id"]
    assert alert.statistic is not None and alert.threshold is not None
    assert alert.statistic > alert.threshold


def test_a_steady_dealer_raises_no_drop_alert() -> None:
    rng = random.Random(7)
    assert drop_alerts(responses(rng, 600, DROP_START, 0.0, 0)) == []  # 300 days


# --- 9. settings from TOML ----------------------------------------------------------------


def test_load_alert_settings_reads_an_override(tmp_path: Path) -> None:
    path = tmp_path / "alerts.toml"
    path.write_text(
        'cusum_h = 9.0\nprior_csi = [800.0, 90.0]\n[sla_first_response_hours]\n"3" = 2\n',
        encoding="utf-8",
    )
    settings = load_alert_settings(path)
    assert settings.cusum_h == 9.0
    assert settings.prior_csi == (800.0, 90.0)
    assert settings.sla_first_response_hours[3] == 2.0  # string key "3" → severity 3
    assert settings.bernoulli_h == AlertSettings().bernoulli_h  # untouched keys keep defaults
    assert load_alert_settings(None) == AlertSettings()


def test_load_alert_settings_rejects_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "alerts.toml"
    path.write_text("cusum_h = 9.0\ncusum_hh = 1.0\nwarm_up = 3\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unknown alert settings \['cusum_hh', 'warm_up'\]"):
        load_alert_settings(path)


# --- 10. messages ----------------------------------------------------------------------------


def test_messages_are_json_with_distinct_delivery_ids() -> None:
    engine = new_engine()
    hot, case = open_case(engine)
    [contacted] = apply(engine, act(case.case_id, "contact", T + H))
    closing = apply(
        engine, act(case.case_id, "close", T + 2 * H, reason="other", comment="Refund given")
    )
    [closed_hot] = alerts(closing)
    assert isinstance(contacted, Case)
    messages = [r.to_message() for r in (hot, closed_hot, case, contacted)]
    decoded = [orjson.loads(orjson.dumps(m)) for m in messages]
    assert [m["record"] for m in decoded] == ["alert", "alert", "case", "case"]
    assert decoded[0]["delivery_id"] == f"alert:{hot.alert_id}:open"
    assert decoded[1]["delivery_id"] == f"alert:{hot.alert_id}:closed"
    assert decoded[2]["delivery_id"] == f"case:{case.case_id}:1"
    assert decoded[3]["delivery_id"] == f"case:{case.case_id}:2"
    assert len({m["delivery_id"] for m in decoded}) == 4
    assert decoded[0]["detected_at"] == "2026-03-02T09:00:00+00:00"
    assert decoded[3]["contacted_at"] == "2026-03-02T10:00:00+00:00"
    assert "action_ids" not in decoded[3]
    assert (hot.version, closed_hot.version) == (1, 2)
    # a case survives its own dict form (the state store's)
    assert Case.from_dict(contacted.to_dict()) == contacted


# --- through the dealer processor: topic routing -------------------------------------------


def test_processor_routes_events_and_case_actions_to_the_engine() -> None:
    processor = DealerProcessor(DictStore(), CATALOGUE, clock=lambda: NOW)
    bad = survey(overall=1)
    survey_record = RawRecord(EVENT_TOPICS["survey"].name, 1, 1, b"D001", orjson.dumps(bad))
    out = processor.process([survey_record])
    [hot], [case] = out.alerts, out.cases
    assert (hot.kind, hot.case_id, case.status) == ("hot", case.case_id, "open")
    assert (hot.region, hot.brand) == ("unknown", "unknown")  # no registry
    # the same survey again is a duplicate: counted once, no second alert
    again = processor.process([survey_record])
    assert again.duplicates == 1 and not again.alerts and not again.cases

    def action_record(offset: int, key: bytes, **fields: Any) -> RawRecord:
        action = {
            "action_id": str(uuid.uuid4()), "case_id": case.case_id, "dealer_id": "D001",
            "action": "contact", "occurred_at": (T + H).isoformat(), "by": "advisor.li",
            **fields,
        }  # fmt: skip
        return RawRecord(CASE_ACTIONS.name, 1, offset, key, orjson.dumps(action))

    out = processor.process(
        [
            action_record(2, b"D001"),
            action_record(3, b"D002"),  # key is not the dealer
            action_record(4, b"D001"),  # contact again: not allowed
            action_record(5, b"D001", action="close"),  # no reason, no comment
        ]
    )
    assert [(c.status, c.seq) for c in out.cases] == [("contacted", 2)]
    assert not out.alerts and not out.event_rows
    assert [(d.source_topic, d.offset) for d in out.dead_letters] == [
        (CASE_ACTIONS.name, 3), (CASE_ACTIONS.name, 4), (CASE_ACTIONS.name, 5),
    ]  # fmt: skip
    reasons = [d.reason for d in out.dead_letters]
    assert reasons[0] == "key: message key 'D002' must equal dealer_id 'D001'"
    assert "cannot contact case" in reasons[1] and "while it is contacted" in reasons[1]
    assert "reason: closing a case needs a reason" in reasons[2]
    # an event of the case topic's JSON on an event topic is not an action
    wrong = RawRecord(EVENT_TOPICS["survey"].name, 1, 6, b"D001", action_record(6, b"D001").value)
    assert len(processor.process([wrong]).dead_letters) == 1


def test_reclosing_a_reopened_case_sends_nothing_twice() -> None:
    engine = new_engine()
    first, case = open_case(engine)
    records: list[Alert | Case] = [first, case]
    for step, (action, extra) in enumerate(
        [
            ("contact", {}),
            ("close", {"reason": "other", "comment": "Called back"}),
            ("reopen", {}),
            ("close", {"reason": "other", "comment": "Called again"}),
        ],
        start=1,
    ):
        records += apply(engine, act(case.case_id, action, T + step * H, **extra))
    ids = [r.delivery_id for r in records]
    assert len(ids) == len(set(ids))  # every record a consumer sees is new
    # the hot alert closed with the first close; the reopened case's close is a case change
    assert [a.status for a in alerts(records)] == ["open", "closed"]
