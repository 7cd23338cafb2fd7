"""The simulator: determinism, order, realism knobs, drops and schema validity."""

from __future__ import annotations

import io
import statistics
import time
from collections import Counter, defaultdict
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.registry import load_registry, write_registry
from pipeline.simulator import (
    MYSTERY_SHOP_PASS_MARK,
    SERVICE_FACTORS,
    Drop,
    dealer_ids,
    parse_drop,
    simulate,
    simulated_registry,
    write_jsonl,
)
from schemas import parse_event

END = date(2024, 6, 30)
DAYS = 90
START = END - timedelta(days=DAYS - 1)
RANGE_END = (END + timedelta(days=1)).isoformat()
DROP_START = date(2024, 5, 15)

Event = dict[str, Any]


def x10(value: float, high: int) -> float:
    """DOMAIN.md rescaling of a rating on a 1..high scale to 1-10."""
    return 1 + 9 * (value - 1) / (high - 1)


@pytest.fixture(scope="module")
def sample() -> list[Event]:
    # ~36k events (17k visits, 13k calls, 4k surveys, 2k complaint state changes,
    # 90 audits): big enough for the share and dealer-spread checks below.
    return list(simulate(30, DAYS, end=END, seed=11))


def test_dealer_ids_are_zero_padded_and_widen_past_999() -> None:
    assert dealer_ids(3) == ["D001", "D002", "D003"]
    assert dealer_ids(0) == []
    ids = dealer_ids(1200)
    assert ids[0] == "D0001" and ids[998] == "D0999" and ids[-1] == "D1200"
    assert len(set(ids)) == 1200
    with pytest.raises(ValueError):
        dealer_ids(-1)


def test_parse_drop() -> None:
    assert parse_drop("D003:2024-05-01:80") == Drop("D003", date(2024, 5, 1), 80.0)
    assert parse_drop(" D010:2024-05-01:12.5 ") == Drop("D010", date(2024, 5, 1), 12.5)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("D003:2024-05-01", "DEALER:YYYY-MM-DD:SIZE"),
        ("D003:2024-05-01:80:1", "DEALER:YYYY-MM-DD:SIZE"),
        (":2024-05-01:80", "dealer id"),
        ("D003:2024-13-01:80", "not a YYYY-MM-DD date"),
        ("D003:yesterday:80", "not a YYYY-MM-DD date"),
        ("D003:2024-05-01:lots", "not a number"),
        ("D003:2024-05-01:nan", "finite"),
        ("D003:2024-05-01:inf", "finite"),
    ],
)
def test_parse_drop_rejects_malformed_text(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_drop(text)


def test_same_seed_gives_identical_bytes_and_other_seed_differs() -> None:
    first, second = io.BytesIO(), io.BytesIO()
    write_jsonl(simulate(5, 20, end=END, seed=3), first)
    write_jsonl(simulate(5, 20, end=END, seed=3), second)
    assert first.getvalue() == second.getvalue()
    types = {orjson.loads(line)["event_type"] for line in first.getvalue().splitlines()}
    assert types == {"visit", "survey", "call", "complaint", "mystery_shop"}
    other = list(simulate(5, 20, end=END, seed=4))
    assert [orjson.dumps(e) for e in other] != first.getvalue().splitlines()
    assert not {e["event_id"] for e in other} & {
        orjson.loads(line)["event_id"] for line in first.getvalue().splitlines()
    }


def test_events_are_sorted_by_occurred_at_and_inside_the_range(sample: list[Event]) -> None:
    stamps = [e["occurred_at"] for e in sample]
    assert stamps == sorted(stamps)
    assert stamps[0] >= START.isoformat()
    assert stamps[-1] < RANGE_END
    assert len({e["event_id"] for e in sample}) == len(sample)


def test_default_end_is_today_and_nothing_lies_in_the_future() -> None:
    events = list(simulate(3, 3, seed=1))
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert events and all(e["occurred_at"] <= now for e in events)
    first_day = (datetime.now(UTC).date() - timedelta(days=2)).isoformat()
    assert events[0]["occurred_at"] >= first_day


def test_generation_is_lazy() -> None:
    # Thousands of dealer-days in range: the first event must come after one day's work.
    began = time.monotonic()
    stream = simulate(300, 3650, end=END, seed=0)
    first = next(stream)
    assert time.monotonic() - began < 5
    assert first["occurred_at"].startswith((END - timedelta(days=3649)).isoformat())


def test_survey_share_close_to_requested(sample: list[Event]) -> None:
    # Only visits whose survey (1-3 days after delivery) cannot fall past the range.
    last_full = (END - timedelta(days=3)).isoformat()
    visits = {
        e["visit_id"] for e in sample if e["event_type"] == "visit" and e["occurred_at"] < last_full
    }
    surveyed = {e["visit_id"] for e in sample if e["event_type"] == "survey"} & visits
    assert len(visits) > 10_000
    # SE of a share near 0.25 on >10k visits is < 0.005; dealer response rates
    # vary around the target, hence the wider band.
    assert 0.22 < len(surveyed) / len(visits) < 0.28


def test_surveys_come_one_to_three_days_after_their_visit(sample: list[Event]) -> None:
    delivered = {e["visit_id"]: e for e in sample if e["event_type"] == "visit"}
    surveys = [e for e in sample if e["event_type"] == "survey" and e["visit_id"] is not None]
    assert surveys
    for survey in surveys:
        visit = delivered[survey["visit_id"]]
        assert visit["dealer_id"] == survey["dealer_id"]
        assert visit["customer_ref"] == survey["customer_ref"]
        lag = date.fromisoformat(survey["occurred_at"][:10]) - date.fromisoformat(
            visit["delivered_at"][:10]
        )
        assert timedelta(days=1) <= lag <= timedelta(days=3)


def test_visit_fields_are_consistent(sample: list[Event]) -> None:
    visits = [e for e in sample if e["event_type"] == "visit"]
    seen: dict[str, Event] = {}
    comebacks = 0
    for v in visits:
        assert v["department"] == "service" and v["source"] == "dms"
        assert v["arrived_at"] <= v["greeted_at"] <= v["delivered_at"] == v["occurred_at"]
        assert "07:30:00" <= v["arrived_at"][11:] <= "17:00:00"
        assert v["estimate_amount"] >= 0 and v["invoice_amount"] >= 0
        if v["comeback_of"] is not None:
            comebacks += 1
            original = seen[v["comeback_of"]]
            assert original["dealer_id"] == v["dealer_id"]
            assert original["delivered_at"] <= v["arrived_at"]
        seen[v["visit_id"]] = v
    late = sum(v["delivered_at"] > v["promised_at"] for v in visits) / len(visits)
    assert 0.01 < comebacks / len(visits) < 0.06
    assert 0.03 < late < 0.3


def test_survey_answers_lie_on_their_scale(sample: list[Event]) -> None:
    surveys = [e for e in sample if e["event_type"] == "survey"]
    catalogue = {code for codes in SERVICE_FACTORS.values() for code in codes}
    sms = [s for s in surveys if s["channel"] == "sms"]
    assert 0.15 < len(sms) / len(surveys) < 0.25
    skipped = rated = 0
    for s in surveys:
        high = s["scale"]["max"]
        assert s["scale"] == {"min": 1, "max": 5 if s["channel"] == "sms" else 10}
        answers = [*s["ratings"].values(), *s["expectations"].values(), s["overall"]]
        answers += [v for v in (s["expectation"], s["perception"], s["return_intent"]) if v]
        assert all(isinstance(v, int) and 1 <= v <= high for v in answers)
        assert isinstance(s["recommend"], int) and 0 <= s["recommend"] <= 10
        assert set(s["expectations"]) <= set(s["ratings"])
        if s["department"] == "service":
            assert set(s["ratings"]) <= catalogue
            rated += len(s["ratings"])
            skipped += len(catalogue) - len(s["ratings"])
    assert 0.1 < skipped / (skipped + rated) < 0.2
    long_form = sum(s["expectation"] is not None for s in surveys) / len(surveys)
    assert 0.4 < long_form < 0.6
    assert any(s["department"] == "sales" for s in surveys)
    assert sum(s["department"] == "sales" for s in surveys) / len(surveys) < 0.15


def test_recommend_follows_overall(sample: list[Event]) -> None:
    pairs = [
        (x10(s["overall"], s["scale"]["max"]), float(s["recommend"]))
        for s in sample
        if s["event_type"] == "survey"
    ]
    overall, recommend = zip(*pairs, strict=True)
    assert statistics.correlation(overall, recommend) > 0.6


def test_attributes_of_one_factor_move_together(sample: list[Event]) -> None:
    # Within a response, two service_quality items agree more than items of
    # different factors (response-level factor effect on top of the mood).
    same, across = [], []
    for s in sample:
        if s["event_type"] != "survey" or s["scale"]["max"] != 10:
            continue
        r = s["ratings"]
        if {"work_quality", "diagnosis_correct", "amenities"} <= set(r):
            same.append((r["work_quality"], r["diagnosis_correct"]))
            across.append((r["work_quality"], r["amenities"]))
    corr_same = statistics.correlation(*zip(*same, strict=True))
    corr_across = statistics.correlation(*zip(*across, strict=True))
    assert corr_same > corr_across > 0.2


def test_dealers_differ(sample: list[Event]) -> None:
    per_dealer: dict[str, list[float]] = defaultdict(list)
    for s in sample:
        if s["event_type"] == "survey" and s["department"] == "service":
            per_dealer[s["dealer_id"]].append(x10(s["overall"], s["scale"]["max"]))
    means = [statistics.mean(v) for v in per_dealer.values() if len(v) >= 30]
    assert len(means) >= 25
    # With >= 30 responses each, noise alone gives a spread of dealer means of
    # about 1.3/sqrt(30) = 0.25; dealer quality effects make it clearly wider.
    assert statistics.stdev(means) > 0.35
    assert max(means) - min(means) > 1.0


def _mean_rating_x10(surveys: list[Event]) -> float:
    return statistics.mean(
        x10(v, s["scale"]["max"]) for s in surveys for v in s["ratings"].values()
    )


def test_drop_lowers_only_that_dealer_after_its_start() -> None:
    args: dict[str, Any] = {"end": END, "seed": 5, "visits_per_dealer_day": 15.0}
    base = list(simulate(4, DAYS, **args))
    dropped = list(simulate(4, DAYS, drops=[Drop("D002", DROP_START, 100.0)], **args))

    # Apart from complaints, the same events in the same order; only D002's
    # answers, flags and comments from the drop on differ.
    base_steady = [e for e in base if e["event_type"] != "complaint"]
    dropped_steady = [e for e in dropped if e["event_type"] != "complaint"]
    assert [e["event_id"] for e in base_steady] == [e["event_id"] for e in dropped_steady]
    changed = [(a, b) for a, b in zip(base_steady, dropped_steady, strict=True) if a != b]
    assert {a["event_type"] for a, _ in changed} == {"survey", "call", "mystery_shop"}
    for a, b in changed:
        assert a["dealer_id"] == "D002"
        assert a["occurred_at"] >= DROP_START.isoformat()
        assert a.get("visit_id") == b.get("visit_id") and a["customer_ref"] == b["customer_ref"]
        if a["event_type"] == "call":
            # Reached calls only: issues appear (never vanish), ratings only fall.
            assert a["outcome"] == b["outcome"] == "reached"
            assert b["issue_reported"] >= a["issue_reported"]
            assert all(b["ratings"][code] <= value for code, value in a["ratings"].items())
            assert a["overall"] is None or b["overall"] <= a["overall"]
        elif a["event_type"] == "mystery_shop":
            pairs = zip(a["items"], b["items"], strict=True)
            results = {(x["result"], y["result"]) for x, y in pairs}
            assert results <= {("pass", "pass"), ("fail", "fail"), ("na", "na"), ("pass", "fail")}
            assert ("pass", "fail") in results

    # Complaints: the other dealers' and D002's earlier ones are unchanged, and
    # D002's customers complain clearly more often after the start.
    def opened(events: list[Event], dealer: str) -> list[Event]:
        return [
            e
            for e in events
            if e["event_type"] == "complaint"
            and e["status"] == "opened"
            and e["dealer_id"] == dealer
        ]

    for dealer in ("D001", "D003", "D004"):
        assert opened(base, dealer) == opened(dropped, dealer)
    cut = DROP_START.isoformat()
    assert [e for e in opened(base, "D002") if e["occurred_at"] < cut] == [
        e for e in opened(dropped, "D002") if e["occurred_at"] < cut
    ]
    before_n = sum(e["occurred_at"] >= cut for e in opened(base, "D002"))
    after_n = sum(e["occurred_at"] >= cut for e in opened(dropped, "D002"))
    assert before_n >= 5 and after_n > 2 * before_n  # 13 -> 41 for this seed

    # Paired: the latent score moves by exactly 1.0 on 1-10; after rounding a
    # 1-10 rating falls by 0 or 1 (0 only when clipped at the top), a 1-5
    # rating by 0 or 2.25 on 1-10 with mean 1.0. So the mean fall is 1.0
    # minus the share clipped at the top (a few %, up to ~12% for a strong
    # dealer), plus sampling noise of the 1-5 part.
    after = [
        (a, b)
        for a, b in zip(base_steady, dropped_steady, strict=True)
        if a["dealer_id"] == "D002"
        and a["event_type"] == "survey"
        and a["occurred_at"] >= DROP_START.isoformat()
    ]
    assert len(after) > 200
    falls = [
        x10(a["ratings"][code], a["scale"]["max"]) - x10(b["ratings"][code], b["scale"]["max"])
        for a, b in after
        for code in a["ratings"]
    ]
    assert all(f >= 0 for f in falls)
    assert 0.8 < statistics.mean(falls) < 1.05
    overall_falls = [
        x10(a["overall"], a["scale"]["max"]) - x10(b["overall"], b["scale"]["max"])
        for a, b in after
    ]
    assert 0.75 < statistics.mean(overall_falls) < 1.1
    assert 0.75 < statistics.mean(a["recommend"] - b["recommend"] for a, b in after) < 1.05

    # Unpaired, as a dashboard sees it: D002 before vs after its start falls by
    # about 1.0 (SE of the difference ~0.1), the other dealers do not move.
    def before_after(events: list[Event], dealer: str) -> tuple[float, float]:
        surveys = [
            e
            for e in events
            if e["event_type"] == "survey"
            and e["dealer_id"] == dealer
            and e["department"] == "service"
        ]
        cut = DROP_START.isoformat()
        return (
            _mean_rating_x10([s for s in surveys if s["occurred_at"] < cut]),
            _mean_rating_x10([s for s in surveys if s["occurred_at"] >= cut]),
        )

    before, after_mean = before_after(dropped, "D002")
    assert 0.6 < before - after_mean < 1.4
    for dealer in ("D001", "D003", "D004"):
        before, after_mean = before_after(dropped, dealer)
        assert abs(before - after_mean) < 0.4


def test_drop_for_unknown_dealer_is_rejected() -> None:
    with pytest.raises(ValueError, match="D099"):
        simulate(3, 5, end=END, drops=[Drop("D099", END, 50.0)])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_dealers": 0, "days": 5},
        {"n_dealers": 2, "days": 0},
        {"n_dealers": 2, "days": 5, "survey_share": 1.5},
        {"n_dealers": 2, "days": 5, "visits_per_dealer_day": -1.0},
        {"n_dealers": 2, "days": 5, "call_share": 1.5},
        {"n_dealers": 2, "days": 5, "call_share": -0.1},
    ],
)
def test_simulate_rejects_bad_arguments_immediately(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        simulate(**kwargs)


def test_no_sales_surveys_when_disabled() -> None:
    events = list(simulate(5, 10, end=END, seed=2, sales_surveys_per_dealer_day=0.0))
    surveys = [e for e in events if e["event_type"] == "survey"]
    assert surveys and all(e["department"] == "service" for e in surveys)
    # Sales complaints and sales audits are their own switches.
    service_only = simulate(
        5,
        10,
        end=END,
        seed=2,
        sales_surveys_per_dealer_day=0.0,
        complaints=False,
        mystery_shops=False,
    )
    assert all(e["department"] == "service" for e in service_only)


def test_write_jsonl_to_path_binary_and_text_streams(tmp_path: Path) -> None:
    events = list(simulate(2, 5, end=END, seed=9))
    expected = b"".join(orjson.dumps(e) + b"\n" for e in events)
    path = tmp_path / "events.jsonl"
    assert write_jsonl(iter(events), path) == len(events)
    assert path.read_bytes() == expected
    assert write_jsonl(events, str(path)) == len(events)
    assert path.read_bytes() == expected
    binary, text = io.BytesIO(), io.StringIO()
    assert write_jsonl(events, binary) == len(events)
    assert binary.getvalue() == expected
    assert write_jsonl(events, text) == len(events)
    assert text.getvalue().encode() == expected


def test_every_event_passes_the_schema(sample: list[Event]) -> None:
    assert {e["event_type"] for e in sample} == {
        "visit",
        "survey",
        "call",
        "complaint",
        "mystery_shop",
    }
    now = datetime.combine(END, datetime.min.time(), UTC) + timedelta(days=1)
    for event in sample:
        parse_event(orjson.dumps(event), now=now)
    for event in simulate(3, 3, seed=1):  # default end: validated against the real clock
        parse_event(orjson.dumps(event))


# --- calls, complaints, mystery shops -------------------------------------------

TYPES = ("visit", "survey", "call", "complaint", "mystery_shop")
ALL_CLEAR = (END - timedelta(days=6)).isoformat()  # later visits' follow-ups may fall past END


def _ts(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def _by_type(events: list[Event], event_type: str) -> list[Event]:
    return [e for e in events if e["event_type"] == event_type]


def test_all_five_types_with_plausible_shares(sample: list[Event]) -> None:
    visits = {v["visit_id"] for v in _by_type(sample, "visit") if v["occurred_at"] < ALL_CLEAR}
    calls = [c for c in _by_type(sample, "call") if c["visit_id"] in visits]
    called = {c["visit_id"] for c in calls}
    # Observed for this sample: 0.67 of visits get a call, 0.79 calls per visit.
    assert 0.6 < len(called) / len(visits) < 0.78
    assert 0.65 < len(calls) / len(visits) < 0.95
    outcomes = Counter(c["outcome"] for c in _by_type(sample, "call"))
    n_calls = sum(outcomes.values())
    assert 0.6 < outcomes["reached"] / n_calls < 0.7
    assert 0.16 < outcomes["no_answer"] / n_calls < 0.24
    assert all(outcomes[o] > 0 for o in ("refused", "wrong_number", "callback_requested"))
    # Complaints: about 2.6 per 100 visits here.
    opened = [c for c in _by_type(sample, "complaint") if c["status"] == "opened"]
    per_100 = 100 * sum(c["visit_id"] in visits for c in opened) / len(visits)
    assert 1.0 < per_100 < 6.0
    assert 0 < sum(c["department"] == "sales" for c in opened) < 0.2 * len(opened)
    # One audit per dealer and calendar month (the range starts on 2 April).
    audits = Counter(
        (a["dealer_id"], a["occurred_at"][:7]) for a in _by_type(sample, "mystery_shop")
    )
    assert set(audits.values()) == {1}
    assert len(audits) == 30 * 3
    # Mostly after-sales.
    for event_type in ("call", "complaint", "mystery_shop"):
        events = _by_type(sample, event_type)
        assert sum(e["department"] == "service" for e in events) > 0.6 * len(events)


def test_calls_follow_their_visit(sample: list[Event]) -> None:
    visits = {v["visit_id"]: v for v in _by_type(sample, "visit")}
    attempts: dict[str, list[Event]] = defaultdict(list)
    for call in _by_type(sample, "call"):
        visit = visits[call["visit_id"]]
        assert (call["dealer_id"], call["customer_ref"]) == (
            visit["dealer_id"],
            visit["customer_ref"],
        )
        assert call["source"] == "call_centre" and call["department"] == "service"
        assert call["occurred_at"] > visit["delivered_at"]
        assert "09:00:00" <= call["occurred_at"][11:] < "20:00:00"
        assert isinstance(call["duration_s"], int) and call["duration_s"] >= 0
        attempts[call["visit_id"]].append(call)
    first_lags: Counter[int] = Counter()
    for visit_id, calls in attempts.items():
        assert len(calls) <= 3
        # Only a missed call or a requested callback is followed by another attempt.
        assert all(c["outcome"] in ("no_answer", "callback_requested") for c in calls[:-1])
        delivered = date.fromisoformat(visits[visit_id]["delivered_at"][:10])
        first_lags[(date.fromisoformat(calls[0]["occurred_at"][:10]) - delivered).days] += 1
    assert set(first_lags) == {1, 2, 3, 4}
    assert first_lags[1] + first_lags[2] + first_lags[3] > 0.8 * sum(first_lags.values())


def test_ratings_only_on_reached_calls(sample: list[Event]) -> None:
    catalogue = {code for codes in SERVICE_FACTORS.values() for code in codes}
    reached = rated = issues = 0
    for call in _by_type(sample, "call"):
        if call["outcome"] != "reached":
            assert call["ratings"] == {} and call["overall"] is None and "scale" not in call
            assert not call["issue_reported"] and not call["satisfaction_confirmed"]
            continue
        reached += 1
        issues += call["issue_reported"]
        assert not (call["issue_reported"] and call["satisfaction_confirmed"])
        if call["ratings"]:
            rated += 1
            assert call["scale"] == {"min": 1, "max": 10}
            assert 2 <= len(call["ratings"]) <= 4 and set(call["ratings"]) <= catalogue
            answers = [*call["ratings"].values(), call["overall"]]
            assert all(isinstance(v, int) and 1 <= v <= 10 for v in answers)
        else:
            assert call["overall"] is None and "scale" not in call
    assert 0.25 < rated / reached < 0.35
    assert 0.05 < issues / reached < 0.2  # 0.10 here


def test_unhappy_visits_report_issues_and_complain(sample: list[Event]) -> None:
    # The survey, the calls and the complaint of one visit follow the same experience.
    surveys = {
        s["visit_id"]: x10(s["overall"], s["scale"]["max"])
        for s in _by_type(sample, "survey")
        if s["visit_id"] is not None
    }
    complained = {c["visit_id"] for c in _by_type(sample, "complaint") if c["visit_id"]}
    with_complaint = [v for k, v in surveys.items() if k in complained]
    without = [v for k, v in surveys.items() if k not in complained]
    assert len(with_complaint) > 50
    assert statistics.mean(without) - statistics.mean(with_complaint) > 0.8  # 8.4 vs 7.0

    comebacks = {v["visit_id"] for v in _by_type(sample, "visit") if v["comeback_of"]}
    reached = [c for c in _by_type(sample, "call") if c["outcome"] == "reached"]
    issue_rate = {
        flag: statistics.mean(
            c["issue_reported"] for c in reached if (c["visit_id"] in comebacks) == flag
        )
        for flag in (True, False)
    }
    assert issue_rate[True] > 2 * issue_rate[False]
    visits = [v for v in _by_type(sample, "visit") if v["occurred_at"] < ALL_CLEAR]
    rate = {
        flag: statistics.mean(
            v["visit_id"] in complained for v in visits if bool(v["comeback_of"]) == flag
        )
        for flag in (True, False)
    }
    assert rate[True] > 2 * rate[False]


def test_complaint_lifecycles_are_ordered(sample: list[Event]) -> None:
    visits = {v["visit_id"]: v for v in _by_type(sample, "visit")}
    lifecycles: dict[str, list[Event]] = defaultdict(list)
    for event in _by_type(sample, "complaint"):
        lifecycles[event["complaint_id"]].append(event)
    allowed = ["opened", "responded", "resolved", "closed", "reopened", "resolved", "closed"]
    first_response_h: list[float] = []
    first_close_satisfied: list[bool] = []
    reopened = still_open = 0
    for events in lifecycles.values():
        statuses = [e["status"] for e in events]
        # A prefix of the one allowed path; the range may end anywhere on it.
        assert statuses == allowed[: len(statuses)]
        stamps = [_ts(e["occurred_at"]) for e in events]
        assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
        for field in (
            "dealer_id",
            "customer_ref",
            "department",
            "category",
            "severity",
            "visit_id",
        ):
            assert len({e[field] for e in events}) == 1
        amounts = [e["compensation_amount"] for e in events]
        assert amounts == sorted(amounts) and amounts[0] == 0.0
        for e in events:
            assert (e["satisfied_after"] is not None) == (e["status"] == "closed")
            assert e["source"] in ("dms", "web") and 1 <= e["severity"] <= 4
        opened = events[0]
        if opened["visit_id"] is not None:
            visit = visits[opened["visit_id"]]
            assert opened["occurred_at"] > visit["delivered_at"]
            lag = date.fromisoformat(opened["occurred_at"][:10]) - date.fromisoformat(
                visit["delivered_at"][:10]
            )
            assert timedelta(0) <= lag <= timedelta(days=3)
        if len(events) > 1:
            first_response_h.append((stamps[1] - stamps[0]).total_seconds() / 3600)
        if len(events) > 3:
            first_close_satisfied.append(events[3]["satisfied_after"])
        reopened += "reopened" in statuses
        still_open += "closed" not in statuses
    # Responses mostly within a day (92% here), some late; recovery ~70%.
    assert 0.75 < sum(h <= 24 for h in first_response_h) / len(first_response_h) < 0.99
    assert 0.6 < statistics.mean(first_close_satisfied) < 0.85
    assert 0 < reopened < 0.15 * len(lifecycles)
    assert still_open > 0


def test_audits_are_weighted_checklists(sample: list[Event]) -> None:
    audits = _by_type(sample, "mystery_shop")
    items = [i for a in audits for i in a["items"]]
    for audit in audits:
        assert audit["source"] == "auditor" and audit["pass_mark"] == MYSTERY_SHOP_PASS_MARK
        assert _ts(audit["occurred_at"]).weekday() < 5
        codes = [i["code"] for i in audit["items"]]
        assert len(codes) == len(set(codes))
        assert 20 <= len(codes) <= 40 and 4 <= len({i["section"] for i in audit["items"]}) <= 6
        assert any(i["mandatory"] for i in audit["items"])
        assert len(audit["auditor_ref"]) == 24 and audit["auditor_ref"] != audit["customer_ref"]
        expected_department = (
            "service" if audit["scenario"] in ("service_visit", "phone_inquiry") else "sales"
        )
        assert audit["department"] == expected_department
    assert len({a["audit_id"] for a in audits}) == len(audits)
    assert all(i["weight"] > 0 and i["result"] in ("pass", "fail", "na") for i in items)
    assert 0.02 < sum(i["result"] == "na" for i in items) / len(items) < 0.08
    assert len({a["scenario"] for a in audits}) >= 4

    def score(audit: Event) -> float:
        passed = sum(i["weight"] for i in audit["items"] if i["result"] == "pass")
        failed = sum(i["weight"] for i in audit["items"] if i["result"] == "fail")
        return float(100 * passed / (passed + failed))

    scores = [score(a) for a in audits]
    assert 78 < statistics.mean(scores) < 92  # 85.8 here
    assert 0.05 < sum(s < MYSTERY_SHOP_PASS_MARK for s in scores) / len(scores) < 0.5
    # Audits follow the dealer's quality, as the surveys do.
    survey_mean: dict[str, list[float]] = defaultdict(list)
    for s in _by_type(sample, "survey"):
        survey_mean[s["dealer_id"]].append(x10(s["overall"], s["scale"]["max"]))
    audit_mean: dict[str, list[float]] = defaultdict(list)
    for audit, value in zip(audits, scores, strict=True):
        audit_mean[audit["dealer_id"]].append(value)
    dealers = sorted(audit_mean)
    assert (
        statistics.correlation(
            [statistics.mean(survey_mean[d]) for d in dealers],
            [statistics.mean(audit_mean[d]) for d in dealers],
        )
        > 0.3
    )


def test_switching_types_off_leaves_the_others_unchanged() -> None:
    full = list(simulate(4, 20, end=END, seed=8))
    assert {e["event_type"] for e in full} == set(TYPES)
    only = list(
        simulate(4, 20, end=END, seed=8, call_share=0.0, complaints=False, mystery_shops=False)
    )
    assert only == [e for e in full if e["event_type"] in ("visit", "survey")]
    no_complaints = list(simulate(4, 20, end=END, seed=8, complaints=False))
    assert no_complaints == [e for e in full if e["event_type"] != "complaint"]


def test_a_dealers_events_do_not_depend_on_the_network_size() -> None:
    small = [e for e in simulate(2, 15, end=END, seed=4) if e["dealer_id"] == "D002"]
    large = [e for e in simulate(6, 15, end=END, seed=4) if e["dealer_id"] == "D002"]
    assert small == large and {e["event_type"] for e in small} == set(TYPES)


def test_audit_months_at_the_edges_of_the_range() -> None:
    # 2024-06-29 and 30 are a weekend: a two-day range has no audit.
    quiet: dict[str, Any] = {"call_share": 0.0, "complaints": False}
    assert not _by_type(list(simulate(3, 2, end=END, seed=1, **quiet)), "mystery_shop")
    # From Sunday 2024-05-26: May's audit falls on one of its last five weekdays.
    audits = _by_type(list(simulate(3, 36, end=END, seed=1, **quiet)), "mystery_shop")
    months = Counter((a["dealer_id"], a["occurred_at"][:7]) for a in audits)
    assert months == {(d, m): 1 for d in dealer_ids(3) for m in ("2024-05", "2024-06")}
    assert all(a["occurred_at"] >= "2024-05-27" for a in audits)


def test_simulated_registry_matches_the_simulated_dealers(tmp_path: Path) -> None:
    registry = simulated_registry(40, seed=3)
    assert registry == simulated_registry(40, seed=3)
    assert registry != simulated_registry(40, seed=4)
    assert [d.dealer_id for d in registry] == dealer_ids(40)
    regions = Counter(d.region for d in registry)
    assert set(regions) == {"North", "East", "South", "West", "Central"}
    assert set(regions.values()) == {8}
    assert 2 <= len({d.brand for d in registry}) <= 3
    assert len({d.name for d in registry}) == 40
    assert any(not d.name.isascii() for d in registry)
    groups = Counter(d.group for d in registry)
    assert 3 <= len(groups) <= 12
    # Written and read back as the registry file the pipeline loads.
    path = tmp_path / "dealers.csv"
    assert write_registry(registry, path) == 40
    assert list(load_registry(path).values()) == registry

    assert {d.region for d in simulated_registry(1)} == {"North"}
    big = simulated_registry(300)
    assert len({d.region for d in big}) == 38 and max(Counter(d.region for d in big).values()) == 8
