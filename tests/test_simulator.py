"""The simulator: determinism, order, realism knobs, drops and schema validity."""

from __future__ import annotations

import io
import statistics
import time
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.simulator import (
    SERVICE_FACTORS,
    Drop,
    dealer_ids,
    parse_drop,
    simulate,
    write_jsonl,
)

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
    # ~30k events: big enough for the share and dealer-spread checks below.
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

    # Same stream apart from D002's survey answers from the drop on.
    assert [e["event_id"] for e in base] == [e["event_id"] for e in dropped]
    changed = [(a, b) for a, b in zip(base, dropped, strict=True) if a != b]
    assert changed
    for a, _ in changed:
        assert a["dealer_id"] == "D002" and a["event_type"] == "survey"
        assert a["occurred_at"] >= DROP_START.isoformat()

    # Paired: the latent score moves by exactly 1.0 on 1-10; after rounding a
    # 1-10 rating falls by 0 or 1 (0 only when clipped at the top), a 1-5
    # rating by 0 or 2.25 on 1-10 with mean 1.0. So the mean fall is 1.0
    # minus the share clipped at the top (a few %, up to ~12% for a strong
    # dealer), plus sampling noise of the 1-5 part.
    after = [
        (a, b)
        for a, b in zip(base, dropped, strict=True)
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
    ],
)
def test_simulate_rejects_bad_arguments_immediately(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        simulate(**kwargs)


def test_no_sales_surveys_when_disabled() -> None:
    events = list(simulate(5, 10, end=END, seed=2, sales_surveys_per_dealer_day=0.0))
    assert events and all(e["department"] == "service" for e in events)


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
    schemas = pytest.importorskip("schemas", reason="schemas package not available")
    parse_event = getattr(schemas, "parse_event", None)
    if parse_event is None:
        pytest.skip("schemas.parse_event not written yet")
    now = datetime.combine(END, datetime.min.time(), UTC) + timedelta(days=1)
    for event in sample:
        parse_event(orjson.dumps(event), now=now)
    for event in simulate(3, 3, seed=1):  # default end: validated against the real clock
        parse_event(orjson.dumps(event))
