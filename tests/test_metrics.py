"""Formula tests: every expected figure below is worked out by hand in the comments.

Events are built as JSON and go through `schemas.parse_event`, exactly like the
stream's input, then into a `Bucket`; `figures()` gives the metrics.
"""

from __future__ import annotations

import dataclasses
import math
import uuid
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.catalogue import CatalogueError, catalogue_from_dict, load_catalogue
from pipeline.metrics import (
    CSS_EPSILON,
    WINDOWS,
    Bucket,
    Figures,
    affected_window_ends,
    csi,
    csm_from_x10,
    css_verdict,
    factor_index,
    figures,
    is_satisfied,
    is_top2,
    merged,
    nps,
    nps_standard_error,
    percent,
    rescale_to_10,
    satisfaction_degree_from_x10,
    window_days,
    window_start,
)
from schemas import AnyEvent, Scale, parse_event

CATALOGUE = load_catalogue()
NOW = datetime(2026, 11, 23, tzinfo=UTC)
SOURCES = {
    "survey": "survey_vendor",
    "visit": "dms",
    "call": "call_centre",
    "mystery_shop": "auditor",
    "complaint": "dms",
}
ONE_TO_FIVE = {"min": 1, "max": 5}
ONE_TO_SEVEN = {"min": 1, "max": 7}


# --- building events ----------------------------------------------------------


def event(event_type: str, **body: Any) -> AnyEvent:
    """A valid event of `event_type`: the envelope plus `body`, parsed from JSON."""
    payload: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "event_type": event_type,
        "schema_version": 1,
        "dealer_id": "D001",
        "department": "service",
        "occurred_at": "2026-11-10T10:00:00Z",
        "customer_ref": "abcdef0123456789",
        "source": SOURCES[event_type],
        **body,
    }
    return parse_event(orjson.dumps(payload), now=NOW)


def survey(**body: Any) -> AnyEvent:
    return event("survey", channel="web", **body)


def visit(**body: Any) -> AnyEvent:
    body.setdefault("arrived_at", "2026-11-10T09:00:00Z")
    return event("visit", visit_id=f"RO-{uuid.uuid4().hex[:8]}", appointment=True, **body)


def call(outcome: str, **body: Any) -> AnyEvent:
    return event("call", visit_id="RO-1", outcome=outcome, **body)


def complaint(complaint_id: str, status: str, **body: Any) -> AnyEvent:
    return event(
        "complaint",
        complaint_id=complaint_id,
        status=status,
        category="waiting_time",
        severity=2,
        **body,
    )


def audit(*items: tuple[str, str, float, str]) -> AnyEvent:
    """An audit from (code, section, weight, result) items."""
    return event(
        "mystery_shop",
        audit_id=f"A-{uuid.uuid4().hex[:8]}",
        scenario="service_visit",
        items=[
            {"code": code, "section": section, "weight": weight, "result": result}
            for code, section, weight, result in items
        ],
    )


def bucket_of(events: Iterable[AnyEvent]) -> Bucket:
    bucket = Bucket()
    for item in events:
        bucket.add_event(item, CATALOGUE)
    return bucket


def figures_of(*events: AnyEvent) -> Figures:
    return figures(bucket_of(events), CATALOGUE)


def assert_figures_close(one: Figures, other: Figures, tol: float = 1e-9) -> None:
    """Field by field: counts exact, floats within `tol`, None only where None."""
    for spec in dataclasses.fields(Figures):
        a, b = getattr(one, spec.name), getattr(other, spec.name)
        if isinstance(a, dict):
            assert isinstance(b, dict) and a.keys() == b.keys(), spec.name
            for key, value in a.items():
                assert b[key] == pytest.approx(value, abs=tol), (spec.name, key)
        elif isinstance(a, float):
            assert isinstance(b, float), spec.name
            assert b == pytest.approx(a, abs=tol), spec.name
        else:
            assert a == b, spec.name


# --- the catalogue ---------------------------------------------------------------


def test_default_catalogue_is_domain_md() -> None:
    assert CATALOGUE.factor_weights == {
        "service_initiation": 15,
        "service_advisor": 19,
        "service_facility": 15,
        "vehicle_pickup": 19,
        "service_quality": 32,
    }
    assert len(CATALOGUE.attribute_factor) == 21
    assert CATALOGUE.attribute_factor["promises_kept"] == "service_advisor"
    assert CATALOGUE.attribute_dimension["promises_kept"] == "reliability"


def test_catalogue_errors_name_the_entry() -> None:
    with pytest.raises(CatalogueError, match="unknown factor 'nope'"):
        catalogue_from_dict(
            {"version": "x", "factors": {"a": 1}, "attributes": {"q": {"factor": "nope"}}}
        )
    with pytest.raises(CatalogueError, match="weights must be > 0"):
        catalogue_from_dict({"version": "x", "factors": {"a": 0}, "attributes": {}})


# --- scalar formulas --------------------------------------------------------------


def test_rescale_to_10() -> None:
    # 1–5: x10 = 1 + 9·(x−1)/4
    assert rescale_to_10(1, 1, 5) == 1.0
    assert rescale_to_10(3, 1, 5) == 5.5  # 1 + 9·2/4
    assert rescale_to_10(4, 1, 5) == 7.75  # 1 + 9·3/4
    assert rescale_to_10(5, 1, 5) == 10.0
    # 1–7: x10 = 1 + 9·(x−1)/6
    assert rescale_to_10(1, 1, 7) == 1.0
    assert rescale_to_10(4, 1, 7) == 5.5  # 1 + 9·3/6
    assert rescale_to_10(6, 1, 7) == 8.5  # 1 + 9·5/6
    assert rescale_to_10(7, 1, 7) == 10.0
    # 1–10 is the identity; 0–10: 1 + 9·5/10 = 5.5
    assert [rescale_to_10(x, 1, 10) for x in (1, 7, 10)] == [1.0, 7.0, 10.0]
    assert rescale_to_10(5, 0, 10) == 5.5


def test_scalar_helpers() -> None:
    assert factor_index(16.5, 3) == 550.0  # 100 · 16.5/3
    assert factor_index(0.0, 0) is None
    assert percent(1, 4) == 25.0 and percent(0, 0) is None
    assert satisfaction_degree_from_x10(10.0) == 100.0
    assert satisfaction_degree_from_x10(5.5) == 50.0  # 100·4.5/9
    assert csm_from_x10(1.0) == -90.0 and csm_from_x10(10.0) == 90.0
    assert csm_from_x10(8.5) == 60.0  # −90 + 20·7.5
    # (15·800 + 19·600)/34 = 23400/34
    assert csi(
        {"service_initiation": 800.0, "vehicle_pickup": 600.0}, CATALOGUE.factor_weights
    ) == (pytest.approx(23400 / 34, abs=1e-9))
    assert csi({}, CATALOGUE.factor_weights) is None
    assert csi({"service_quality": None}, CATALOGUE.factor_weights) is None


# --- CSI ---------------------------------------------------------------------------


def test_csi_with_all_five_factors_by_hand() -> None:
    # One 1–10 survey: initiation 8 → 800; advisor (9 + 7)/2 = 8 → 800;
    # facility 10 → 1000; pickup 6 → 600; quality 9 → 900.
    # CSI = (15·800 + 19·800 + 15·1000 + 19·600 + 32·900)/100
    #     = (12000 + 15200 + 15000 + 11400 + 28800)/100 = 82400/100 = 824
    result = figures_of(
        survey(
            ratings={
                "booking_ease": 8,
                "advisor_courtesy": 9,
                "advisor_honesty": 7,
                "waiting_clean": 10,
                "on_time": 6,
                "work_quality": 9,
                "not_in_catalogue": 1,  # stored raw, counts toward no factor
            }
        )
    )
    assert result.factors == {
        "service_initiation": 800.0,
        "service_advisor": 800.0,
        "service_facility": 1000.0,
        "vehicle_pickup": 600.0,
        "service_quality": 900.0,
    }
    assert result.csi == pytest.approx(824.0, abs=1e-9)
    assert result.factor_n == {
        "service_initiation": 1,
        "service_advisor": 2,
        "service_facility": 1,
        "vehicle_pickup": 1,
        "service_quality": 1,
    }
    # degree per factor 100·(mean−1)/9: 700/9, 700/9, 900/9, 500/9, 800/9;
    # weighted: (15·700 + 19·700 + 15·900 + 19·500 + 32·800)/(9·100) = 72400/900 = 724/9
    assert result.satisfaction_degree == pytest.approx(724 / 9, abs=1e-9)
    # CSM: mean x10 over the six catalogue ratings = (8+9+7+10+6+9)/6 = 49/6;
    # −90 + 20·(49/6 − 1) = −90 + 20·43/6 = 160/3
    assert result.csm == pytest.approx(160 / 3, abs=1e-9)
    assert result.n_responses == 1 and result.n_surveys == 1
    assert result.weights_version == CATALOGUE.version


def test_csi_with_missing_factors_uses_the_weights_of_the_factors_with_data() -> None:
    # quality 9 → 900 and facility 10 → 1000 only: (32·900 + 15·1000)/(32 + 15) = 43800/47
    result = figures_of(survey(ratings={"work_quality": 9, "waiting_clean": 10}))
    assert result.factors == {"service_quality": 900.0, "service_facility": 1000.0}
    assert result.csi == pytest.approx(43800 / 47, abs=1e-9)
    assert "vehicle_pickup" not in result.factor_n


def test_csi_pools_a_1_to_10_and_a_1_to_5_survey() -> None:
    # booking_ease 8 on 1–10 (x10 8) and 4 on 1–5 (x10 = 1 + 9·3/4 = 7.75):
    # mean 7.875 → factor 787.5; one factor only, so CSI = 787.5
    result = figures_of(
        survey(ratings={"booking_ease": 8}),
        survey(scale=ONE_TO_FIVE, ratings={"booking_ease": 4}),
    )
    assert result.factors == {"service_initiation": 787.5}
    assert result.factor_n == {"service_initiation": 2}
    assert result.csi == pytest.approx(787.5, abs=1e-9)


# --- NPS ---------------------------------------------------------------------------


def test_nps_and_its_standard_error_by_hand() -> None:
    # recommend 10, 9, 8, 7, 6, 0, 10: promoters 3 (10, 9, 10), passives 2 (8, 7),
    # detractors 2 (6, 0), n 7 → NPS = 100·(3 − 2)/7 = 100/7
    answers = [survey(recommend=r) for r in (10, 9, 8, 7, 6, 0, 10)]
    no_recommend = survey(ratings={"work_quality": 5})  # a response, but not in NPS n
    result = figures_of(*answers, no_recommend)
    assert result.nps_n == 7
    assert result.nps == pytest.approx(100 / 7, abs=1e-12)
    # p = 3/7, d = 2/7: p + d − (p − d)² = 5/7 − 1/49 = 34/49; /n = 34/343
    assert result.nps_se == pytest.approx(100 * math.sqrt(34 / 343), abs=1e-12)
    assert result.n_responses == 8
    assert nps(0, 0, 0) is None and nps_standard_error(0, 0, 0) is None
    # all promoters: 100, no spread: p + d − (p − d)² = 1 − 1 = 0
    assert nps(5, 0, 5) == 100.0 and nps_standard_error(5, 0, 5) == 0.0
    # 1 promoter, 1 detractor: NPS 0; p + d − 0 = 1 → 100·sqrt(1/2)
    assert nps(1, 1, 2) == 0.0
    assert nps_standard_error(1, 1, 2) == pytest.approx(100 * math.sqrt(0.5), abs=1e-12)


# --- CSAT top-2-box and satisfaction rate --------------------------------------------


def test_top2_and_satisfied_boundaries() -> None:
    ten, five = Scale(), Scale(min=1, max=5)
    # 1–10: top-2 is 9–10
    assert [is_top2(x, ten) for x in (8, 9, 10)] == [False, True, True]
    # 1–10: 6 → (6−1)/9 = 0.556 ≥ 0.5 satisfied; 5 → 4/9 = 0.444 not
    assert is_satisfied(6, ten) and not is_satisfied(5, ten)
    # 1–5: top-2 is 4–5; 3 → (3−1)/4 = 0.5 exactly → satisfied; 2 → 0.25 not
    assert [is_top2(x, five) for x in (3, 4, 5)] == [False, True, True]
    assert is_satisfied(3, five) and not is_satisfied(2, five)


def test_csat_top2_and_satisfaction_rate_by_hand() -> None:
    # 1–10, overall 10, 9, 8, 6, 5, 1: top-2 {10, 9} = 2/6; satisfied {10, 9, 8, 6} = 4/6
    on_ten = [survey(overall=x) for x in (10, 9, 8, 6, 5, 1)]
    result = figures_of(*on_ten)
    assert result.overall_n == 6
    assert result.csat_top2 == pytest.approx(100 * 2 / 6, abs=1e-9)
    assert result.satisfaction_rate == pytest.approx(100 * 4 / 6, abs=1e-9)
    # 1–5, overall 5, 4, 3, 2: top-2 {5, 4} = 2/4; satisfied {5, 4, 3} = 3/4
    on_five = [survey(scale=ONE_TO_FIVE, overall=x) for x in (5, 4, 3, 2)]
    result = figures_of(*on_five)
    assert result.csat_top2 == 50.0
    assert result.satisfaction_rate == 75.0
    # pooled: top-2 (2 + 2)/10, satisfied (4 + 3)/10
    result = figures_of(*on_ten, *on_five)
    assert result.overall_n == 10
    assert result.csat_top2 == pytest.approx(40.0, abs=1e-9)
    assert result.satisfaction_rate == pytest.approx(70.0, abs=1e-9)


# --- satisfaction degree, CSM --------------------------------------------------------


def test_satisfaction_degree_by_hand() -> None:
    # 1–5: booking_ease 4 → 100·3/4 = 75, appointment_time 5 → 100 (initiation mean 87.5);
    # work_quality 2 → 100·1/4 = 25 (quality).
    # degree = (15·87.5 + 32·25)/(15 + 32) = (1312.5 + 800)/47 = 2112.5/47
    result = figures_of(
        survey(
            scale=ONE_TO_FIVE,
            ratings={"booking_ease": 4, "appointment_time": 5, "work_quality": 2},
        )
    )
    assert result.satisfaction_degree == pytest.approx(2112.5 / 47, abs=1e-9)


def test_csm_worked_check_from_domain_md() -> None:
    # seven-level scale 1–7: CSM per item = −90 + 180·(x−1)/6 = −90 + 30·(x−1):
    # 6 → 60, 4 → 0, 5 → 30, 6 → 60, 5 → 30, 6 → 60; mean 240/6 = 40
    ratings = {
        "booking_ease": 6,
        "advisor_courtesy": 4,
        "waiting_clean": 5,
        "on_time": 6,
        "work_quality": 5,
        "listened": 6,
    }
    per_item = [csm_from_x10(rescale_to_10(x, 1, 7)) for x in ratings.values()]
    assert per_item == pytest.approx([60, 0, 30, 60, 30, 60], abs=1e-9)
    result = figures_of(survey(scale=ONE_TO_SEVEN, ratings=ratings))
    assert result.csm == pytest.approx(40.0, abs=1e-9)


# --- CSS ratio ------------------------------------------------------------------------


def test_css_ratio_worked_check() -> None:
    # perception 9, expectation 8: 9/8 = 1.125 > 1.05 → exceeded
    assert css_verdict(9 / 8) == "exceeded"
    result = figures_of(survey(overall=9, perception=9, expectation=8))
    assert result.css_n == 1
    assert result.css_ratio == pytest.approx(1.125, abs=1e-12)
    assert (result.css_exceeded, result.css_met, result.css_disappointed) == (100.0, 0.0, 0.0)


def test_css_shares_and_epsilon_boundaries() -> None:
    assert CSS_EPSILON == 0.05
    # exactly 1 ± ε is met; just outside is not
    assert css_verdict(1.05) == "met" and css_verdict(0.95) == "met"
    assert css_verdict(1.06) == "exceeded" and css_verdict(0.94) == "disappointed"
    # ratios: 9/8 = 1.125 exceeded; 8.4/8 = 1.05 met; 9.5/10 = 0.95 met; 7/10 = 0.7
    # disappointed → exceeded 1/4, met 2/4, disappointed 1/4;
    # mean ratio (1.125 + 1.05 + 0.95 + 0.7)/4 = 3.825/4 = 0.95625
    result = figures_of(
        survey(overall=9, perception=9, expectation=8),
        survey(overall=9, perception=8.4, expectation=8),
        survey(overall=9, perception=9.5, expectation=10),
        survey(overall=9, perception=7, expectation=10),
        survey(overall=9, perception=7),  # no expectation: no ratio
    )
    assert result.css_n == 4
    assert result.css_ratio == pytest.approx(0.95625, abs=1e-12)
    assert result.css_exceeded == 25.0
    assert result.css_met == 50.0
    assert result.css_disappointed == 25.0


# --- SERVQUAL ---------------------------------------------------------------------------


def test_servqual_gap_per_rater_dimension_by_hand() -> None:
    # 1–10 survey (x10 = x):
    #   promises_kept 8 vs 9 → −1 (reliability), on_time 6 vs 8 → −2 (reliability),
    #   advisor_courtesy 9 vs 7 → +2 (assurance), waiting_clean 7 vs 7 → 0 (tangibles),
    #   listened: expectation without a rating → skipped; not_in_catalogue → skipped.
    # 1–5 survey: promises_kept 4 vs 5 → 7.75 − 10 = −2.25 (reliability).
    # reliability (−1 − 2 − 2.25)/3 = −1.75; assurance 2; tangibles 0
    # overall = (−1.75 + 2 + 0)/3 = 0.25/3 = 1/12 (a zero gap is data)
    result = figures_of(
        survey(
            ratings={
                "promises_kept": 8,
                "on_time": 6,
                "advisor_courtesy": 9,
                "waiting_clean": 7,
                "not_in_catalogue": 5,
            },
            expectations={
                "promises_kept": 9,
                "on_time": 8,
                "advisor_courtesy": 7,
                "waiting_clean": 7,
                "listened": 8,
                "not_in_catalogue": 9,
            },
        ),
        survey(scale=ONE_TO_FIVE, ratings={"promises_kept": 4}, expectations={"promises_kept": 5}),
    )
    assert result.servqual_gap.keys() == {"reliability", "assurance", "tangibles"}
    assert result.servqual_gap["reliability"] == pytest.approx(-1.75, abs=1e-12)
    assert result.servqual_gap["assurance"] == pytest.approx(2.0, abs=1e-12)
    assert result.servqual_gap["tangibles"] == pytest.approx(0.0, abs=1e-12)
    assert result.servqual_overall == pytest.approx(1 / 12, abs=1e-12)


def test_servqual_gap_of_zero_survives_minus() -> None:
    # rating 8 against expectation 8: gap 0 → servqual_n:assurance 1, servqual_sum:assurance 0.
    # `minus` drops zero-valued statistics, and the roll-up applies its first delta as
    # `new.minus(Bucket())`; the gap must still read 0 (found by the merge/minus property).
    answer = bucket_of(
        [survey(ratings={"advisor_courtesy": 8}, expectations={"advisor_courtesy": 8})]
    )
    assert figures(answer, CATALOGUE).servqual_gap == {"assurance": 0.0}
    assert figures(answer.minus(Bucket()), CATALOGUE).servqual_gap == {"assurance": 0.0}


# --- responses, calls ---------------------------------------------------------------------


def test_response_rate_contact_rate_and_calls_with_ratings() -> None:
    # 4 visits, 2 surveys → response rate 100·2/4 = 50.
    # calls: reached with ratings, reached without, no_answer, refused → contact 2/4 = 50.
    # The call with ratings is a response (3 in all) but not a survey and not in NPS.
    result = figures_of(
        *(visit() for _ in range(4)),
        survey(recommend=10),
        survey(ratings={"booking_ease": 6}),
        call("reached", ratings={"work_quality": 8}, overall=9),
        call("reached", issue_reported=False),
        call("no_answer"),
        call("refused"),
    )
    assert (result.n_visits, result.n_surveys, result.n_responses, result.n_calls) == (4, 2, 3, 4)
    assert result.response_rate == 50.0
    assert result.contact_rate == 50.0
    assert result.nps_n == 1 and result.nps == 100.0  # the survey's 10 only
    # the call's ratings feed the factors and its overall the CSAT figures
    assert result.factors == {"service_initiation": 600.0, "service_quality": 800.0}
    assert result.overall_n == 1 and result.csat_top2 == 100.0


# --- visit KPIs ------------------------------------------------------------------------------


def test_visit_kpis_by_hand() -> None:
    result = figures_of(
        # on time (16:30 ≤ 17:00); greet wait 4.5 min; invoice/estimate 220/200 = 1.1
        visit(
            arrived_at="2026-11-10T09:00:00Z",
            greeted_at="2026-11-10T09:04:30Z",
            promised_at="2026-11-10T17:00:00Z",
            delivered_at="2026-11-10T16:30:00Z",
            estimate_amount=200,
            invoice_amount=220,
        ),
        # late (12:30 > 12:00); wait 10 min; 90/100 = 0.9
        visit(
            arrived_at="2026-11-10T10:00:00Z",
            greeted_at="2026-11-10T10:10:00Z",
            promised_at="2026-11-10T12:00:00Z",
            delivered_at="2026-11-10T12:30:00Z",
            estimate_amount=100,
            invoice_amount=90,
        ),
        # delivered exactly at the promise: on time; estimate 0 → no ratio; a comeback
        visit(
            promised_at="2026-11-10T15:00:00Z",
            delivered_at="2026-11-10T15:00:00Z",
            estimate_amount=0,
            invoice_amount=50,
            comeback_of="RO-1",
        ),
        # invoice without estimate, no times: only the visit count
        visit(invoice_amount=100),
    )
    assert result.n_visits == 4
    assert result.on_time_rate == pytest.approx(100 * 2 / 3, abs=1e-9)  # 2 of 3 with both times
    assert result.greet_wait_min == pytest.approx(7.25, abs=1e-12)  # (4.5 + 10)/2
    assert result.invoice_vs_estimate == pytest.approx(1.0, abs=1e-12)  # (1.1 + 0.9)/2
    assert result.comeback_rate == 25.0  # 1/4


# --- complaints ----------------------------------------------------------------------------


def test_complaints_per_100_visits_and_recovery_success() -> None:
    # opened: C1, C2, C3 → 3 complaints over 4 visits = 75 per 100 visits
    # (responded, closed, reopened events are not new complaints).
    # closed with satisfied_after: true (C1), false (C2), true (C3) → 2/3;
    # C4 closed without satisfied_after does not count.
    result = figures_of(
        *(visit() for _ in range(4)),
        complaint("C1", "opened"),
        complaint("C2", "opened"),
        complaint("C3", "opened"),
        complaint("C1", "responded"),
        complaint("C1", "closed", satisfied_after=True),
        complaint("C2", "closed", satisfied_after=False),
        complaint("C3", "closed", satisfied_after=True),
        complaint("C4", "closed"),
        complaint("C2", "reopened"),
    )
    assert result.complaints_opened == 3
    assert result.complaints_per_100_visits == 75.0
    assert result.recovery_success == pytest.approx(100 * 2 / 3, abs=1e-9)


# --- mystery shop --------------------------------------------------------------------------


def test_mystery_shop_score_overall_and_per_section() -> None:
    # section A: weight 2 pass, 1 fail, 3 n/a → 2/3; section B: weight 1 pass → 1/1.
    # overall: pass 2 + 1 = 3 over pass+fail 2 + 1 + 1 = 4 → 75 (the n/a 3 leaves both).
    # A second audit with only an n/a item adds nothing but the audit count.
    result = figures_of(
        audit(
            ("a1", "A", 2, "pass"),
            ("a2", "A", 1, "fail"),
            ("a3", "A", 3, "na"),
            ("b1", "B", 1, "pass"),
        ),
        audit(("c1", "C", 5, "na")),
    )
    assert result.n_audits == 2
    assert result.mystery_shop_score == 75.0
    assert result.mystery_shop_sections.keys() == {"A", "B"}
    assert result.mystery_shop_sections["A"] == pytest.approx(200 / 3, abs=1e-12)
    assert result.mystery_shop_sections["B"] == 100.0
    # only n/a: no score (not 0)
    assert figures_of(audit(("c1", "C", 5, "na"))).mystery_shop_score is None


# --- no data is None -----------------------------------------------------------------------


def test_metrics_without_data_are_none_not_zero() -> None:
    empty = figures(Bucket(), CATALOGUE)
    for name in (
        "csi",
        "nps",
        "nps_se",
        "csat_top2",
        "satisfaction_rate",
        "satisfaction_degree",
        "csm",
        "css_ratio",
        "css_exceeded",
        "css_met",
        "css_disappointed",
        "servqual_overall",
        "response_rate",
        "contact_rate",
        "on_time_rate",
        "greet_wait_min",
        "invoice_vs_estimate",
        "comeback_rate",
        "complaints_per_100_visits",
        "recovery_success",
        "mystery_shop_score",
    ):
        assert getattr(empty, name) is None, name
    assert empty.factors == {} and empty.servqual_gap == {} and empty.mystery_shop_sections == {}
    assert (empty.n_responses, empty.nps_n, empty.overall_n, empty.n_visits) == (0, 0, 0, 0)
    # a survey with only `recommend`: NPS has data, nothing else that needs ratings does
    only_nps = figures_of(survey(recommend=3))
    assert only_nps.nps == -100.0
    assert only_nps.csi is None and only_nps.csat_top2 is None and only_nps.csm is None
    assert only_nps.response_rate is None  # surveys but no visits: no rate, not infinity


# --- windows -------------------------------------------------------------------------------


def test_window_names() -> None:
    assert WINDOWS == {"day": 1, "7d": 7, "30d": 30, "90d": 90, "month": None}


def test_window_start_and_days() -> None:
    end = date(2026, 3, 2)
    assert window_start("day", end) == end and window_days("day", end) == [end]
    # 7 days ending 2 March 2026 (February has 28 days): 24 Feb … 2 Mar
    assert window_start("7d", end) == date(2026, 2, 24)
    assert window_days("7d", end) == [date(2026, 2, 24) + timedelta(days=i) for i in range(7)]
    # 30 days ending 30 March: 30 − 29 = 1 March
    assert window_start("30d", date(2026, 3, 30)) == date(2026, 3, 1)
    assert len(window_days("30d", date(2026, 3, 30))) == 30
    # 90 days ending 31 March: back 89 = 30 (March) + 28 (February) + 31 (January) → 1 Jan
    assert window_start("90d", date(2026, 3, 31)) == date(2026, 1, 1)
    assert len(window_days("90d", date(2026, 3, 31))) == 90
    # calendar month to date
    assert window_start("month", date(2026, 3, 5)) == date(2026, 3, 1)
    assert window_days("month", date(2026, 3, 5)) == [date(2026, 3, d) for d in range(1, 6)]
    assert window_days("month", date(2026, 3, 1)) == [date(2026, 3, 1)]
    assert len(window_days("month", date(2024, 2, 29))) == 29
    assert window_days("7d", end)[0] < window_days("7d", end)[-1]  # oldest first


def test_affected_window_ends() -> None:
    changed = date(2026, 3, 1)
    assert affected_window_ends("day", changed, date(2026, 3, 10)) == [changed]
    # a late event on 1 March re-opens the 7-day windows ending 1 … 7 March
    assert affected_window_ends("7d", changed, date(2026, 3, 10)) == [
        changed + timedelta(days=i) for i in range(7)
    ]
    # …but none beyond the newest date seen
    assert affected_window_ends("30d", changed, date(2026, 3, 2)) == [changed, date(2026, 3, 2)]
    # 90d: 1 Jan … 1 Jan + 89 days = 31 March
    ends = affected_window_ends("90d", date(2026, 1, 1), date(2026, 12, 31))
    assert len(ends) == 90 and ends[-1] == date(2026, 3, 31)
    # month: windows ending 30 and 31 January only (February's windows start 1 Feb)
    assert affected_window_ends("month", date(2026, 1, 30), date(2026, 2, 10)) == [
        date(2026, 1, 30),
        date(2026, 1, 31),
    ]
    # across a year end, and capped at the latest day inside the month
    assert affected_window_ends("month", date(2026, 12, 30), date(2027, 1, 5)) == [
        date(2026, 12, 30),
        date(2026, 12, 31),
    ]
    assert affected_window_ends("month", date(2026, 3, 5), date(2026, 3, 7)) == [
        date(2026, 3, 5),
        date(2026, 3, 6),
        date(2026, 3, 7),
    ]


@pytest.mark.parametrize("window", sorted(WINDOWS))
def test_affected_window_ends_are_exactly_the_windows_holding_the_day(window: str) -> None:
    # brute force: every end date from the changed day to the latest day whose window
    # holds the changed day (2028 is a leap year: month ends 31 Jan, 29 Feb, 31 Mar)
    for changed in (date(2028, 1, 31), date(2028, 2, 1), date(2028, 2, 29), date(2028, 3, 1)):
        latest = date(2028, 4, 15)
        expected = [
            changed + timedelta(days=i)
            for i in range((latest - changed).days + 1)
            if changed in window_days(window, changed + timedelta(days=i))
        ]
        assert affected_window_ends(window, changed, latest) == expected, (window, changed)


# --- property tests ----------------------------------------------------------------------

ATTRIBUTES = sorted(CATALOGUE.attribute_factor)
SCALES = [(1, 5), (1, 7), (1, 10), (0, 10)]
STAMP = "2026-11-10T{:02d}:{:02d}:00Z"


def stamp(minutes: int) -> str:
    return STAMP.format(minutes // 60, minutes % 60)


@st.composite
def survey_events(draw: st.DrawFn) -> AnyEvent:
    lo, hi = draw(st.sampled_from(SCALES))
    on_scale = st.integers(lo, hi)
    body: dict[str, Any] = {"scale": {"min": lo, "max": hi}}
    ratings = draw(st.dictionaries(st.sampled_from([*ATTRIBUTES, "extra"]), on_scale, max_size=6))
    body["ratings"] = ratings
    body["overall"] = draw(st.none() | on_scale)
    body["recommend"] = draw(st.none() | st.integers(0, 10))
    if not ratings and body["overall"] is None and body["recommend"] is None:
        body["recommend"] = 8
    body["perception"] = draw(st.none() | on_scale)
    body["expectation"] = draw(st.none() | on_scale)
    body["expectations"] = {code: draw(on_scale) for code in ratings if draw(st.booleans())}
    return survey(**body)


@st.composite
def visit_events(draw: st.DrawFn) -> AnyEvent:
    arrived = draw(st.integers(0, 600))
    body: dict[str, Any] = {"arrived_at": stamp(arrived)}
    if draw(st.booleans()):
        body["greeted_at"] = stamp(arrived + draw(st.integers(0, 30)))
    if draw(st.booleans()):
        body["promised_at"] = stamp(arrived + draw(st.integers(0, 300)))
        body["delivered_at"] = stamp(arrived + draw(st.integers(0, 300)))
    if draw(st.booleans()):
        body["estimate_amount"] = draw(st.integers(0, 1000))
        # an amount is 0 or at least 0.001 (schemas/events.py): no ratio to infinity
        body["invoice_amount"] = draw(st.one_of(st.just(0.0), st.floats(0.001, 2000)))
    if draw(st.booleans()):
        body["comeback_of"] = "RO-0"
    return visit(**body)


@st.composite
def call_events(draw: st.DrawFn) -> AnyEvent:
    outcome = draw(st.sampled_from(["reached", "no_answer", "refused"]))
    body: dict[str, Any] = {}
    if outcome == "reached" and draw(st.booleans()):
        body["ratings"] = draw(st.dictionaries(st.sampled_from(ATTRIBUTES), st.integers(1, 10)))
        body["overall"] = draw(st.integers(1, 10))
    return call(outcome, **body)


@st.composite
def complaint_events(draw: st.DrawFn) -> AnyEvent:
    status = draw(st.sampled_from(["opened", "responded", "closed", "reopened"]))
    body: dict[str, Any] = {}
    if status == "closed":
        body["satisfied_after"] = draw(st.none() | st.booleans())
    return complaint("C1", status, **body)


@st.composite
def audit_events(draw: st.DrawFn) -> AnyEvent:
    n = draw(st.integers(1, 4))
    return audit(
        *(
            (
                f"i{i}",
                draw(st.sampled_from(["A", "B"])),
                draw(st.sampled_from([0.5, 1.0, 2.0, 3.0])),
                draw(st.sampled_from(["pass", "fail", "na"])),
            )
            for i in range(n)
        )
    )


any_event = st.one_of(
    survey_events(), visit_events(), call_events(), complaint_events(), audit_events()
)
daily_buckets = st.lists(st.lists(any_event, max_size=4).map(bucket_of), min_size=1, max_size=5)


@settings(max_examples=100, deadline=None)
@given(daily_buckets, st.data())
def test_merging_daily_buckets_in_any_order_gives_the_same_figures(
    days: list[Bucket], data: st.DataObject
) -> None:
    order = data.draw(st.permutations(range(len(days))))
    in_order = figures(merged(days), CATALOGUE)
    shuffled = figures(merged(days[i] for i in order), CATALOGUE)
    assert_figures_close(in_order, shuffled)


@settings(max_examples=100, deadline=None)
@given(daily_buckets, daily_buckets)
def test_merge_then_minus_gives_back_the_figures(
    a_days: list[Bucket], b_days: list[Bucket]
) -> None:
    a, b = merged(a_days), merged(b_days)
    both = merged([a, b])  # a copy: `merge` works in place
    assert_figures_close(figures(both.minus(b), CATALOGUE), figures(a, CATALOGUE))
    assert a.stats == merged(a_days).stats  # merged() left its inputs alone


@settings(max_examples=100, deadline=None)
@given(daily_buckets)
def test_bucket_dict_round_trip(days: list[Bucket]) -> None:
    bucket = merged(days)
    assert Bucket.from_dict(bucket.to_dict()) == bucket
    # through JSON, as a state store would keep it
    assert Bucket.from_dict(orjson.loads(orjson.dumps(bucket.to_dict()))) == bucket


def test_acsi_style_index_by_hand() -> None:
    # 1–10 surveys: overall 8 and 10 → mean 9; disconfirmation 6 and 8 → 7;
    # ideal 7 and 9 → 8. Equal weights: 100/9 · (⅓·8 + ⅓·6 + ⅓·7) = 100/9 · 7
    result = figures_of(
        survey(overall=8, disconfirmation=6, ideal=7),
        survey(overall=10, disconfirmation=8, ideal=9),
    )
    assert result.acsi == pytest.approx(700 / 9, abs=1e-9)
    # on 1–5: overall 4 → x10 7.75, disconfirmation 3 → 5.5, ideal 5 → 10:
    # 100/9 · ⅓ · (6.75 + 4.5 + 9) = 100/9 · 6.75
    small = figures_of(survey(scale={"min": 1, "max": 5}, overall=4, disconfirmation=3, ideal=5))
    assert small.acsi == pytest.approx(675 / 9, abs=1e-9)
    # an item without answers: no index (the three together define it)
    assert figures_of(survey(overall=8, disconfirmation=6)).acsi is None


def test_acsi_weights_must_cover_the_three_items_and_sum_to_one() -> None:
    base = {
        "version": "x",
        "factors": {"a": 1},
        "attributes": {"q": {"factor": "a", "dimension": "reliability"}},
    }
    catalogue = catalogue_from_dict(
        {**base, "acsi": {"overall": 0.5, "disconfirmation": 0.25, "ideal": 0.25}}
    )
    assert catalogue.acsi_weights["overall"] == 0.5
    with pytest.raises(CatalogueError, match="summing to 1"):
        catalogue_from_dict({**base, "acsi": {"overall": 0.5, "ideal": 0.5}})
    with pytest.raises(CatalogueError, match="summing to 1"):
        catalogue_from_dict(
            {**base, "acsi": {"overall": 0.5, "disconfirmation": 0.5, "ideal": 0.5}}
        )
