"""The stream's per-batch processing, broker-free (a dict stands in for the
Faust table, as Bytewax-style test helpers do); figures worked by hand."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, date, datetime
from typing import Any

import orjson
import pytest

from pipeline.catalogue import load_catalogue
from pipeline.stream import DealerProcessor, DictStore, RawRecord, RollupProcessor
from pipeline.topics import EVENT_TOPICS

CATALOGUE = load_catalogue()
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
SURVEY_TOPIC = EVENT_TOPICS["survey"].name
VISIT_TOPIC = EVENT_TOPICS["visit"].name


def envelope(event_type: str, dealer: str, day: str, **body: Any) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": event_type,
        "schema_version": 1,
        "dealer_id": dealer,
        "department": "service",
        "occurred_at": f"{day}T10:00:00Z",
        "customer_ref": "c0ffee00c0ffee00",
        "source": "survey_vendor" if event_type == "survey" else "dms",
        **body,
    }


def survey(dealer: str, day: str, ratings: dict[str, int], recommend: int) -> dict[str, Any]:
    return envelope(
        "survey", dealer, day, channel="web", scale={"min": 1, "max": 10},
        ratings=ratings, overall=8, recommend=recommend,
    )  # fmt: skip


def visit(dealer: str, day: str) -> dict[str, Any]:
    return envelope(
        "visit", dealer, day, visit_id=str(uuid.uuid4()), appointment=True,
        arrived_at=f"{day}T09:00:00Z", greeted_at=None, promised_at=None,
        delivered_at=None, estimate_amount=None, invoice_amount=None, comeback_of=None,
    )  # fmt: skip


class Feed:
    """Numbers records like a Kafka partition would."""

    def __init__(self) -> None:
        self.offset = 0

    def __call__(self, event: dict[str, Any], partition: int = 0, **overrides: Any) -> RawRecord:
        self.offset += 1
        topic = EVENT_TOPICS[event["event_type"]].name
        fields = {"topic": topic, "partition": partition, "offset": self.offset,
                  "key": event["dealer_id"].encode(), "value": orjson.dumps(event)}  # fmt: skip
        fields.update(overrides)
        return RawRecord(**fields)


@pytest.fixture
def processor() -> DealerProcessor:
    return DealerProcessor(DictStore(), CATALOGUE, clock=lambda: NOW)


def by_window(snapshots: list[Any], window: str, end: date) -> Any:
    """The figures of the one snapshot of this window and end date."""
    [match] = [s for s in snapshots if s.window == window and s.window_end == end]
    return match.figures


def test_batch_gives_hand_computed_csi_and_nps(processor: DealerProcessor) -> None:
    feed = Feed()
    # D001 on 18 Nov: quality 9 and 7 → 800; facility 6 → 600
    # CSI = (32·800 + 15·600)/47 = 34600/47; NPS: one promoter (10), one detractor (5) → 0
    records = [
        feed(survey("D001", "2026-11-18", {"work_quality": 9, "waiting_clean": 6}, 10), 2),
        feed(survey("D001", "2026-11-18", {"value_for_money": 7}, 5), 2),
        feed(visit("D001", "2026-11-18"), 2),
        feed(visit("D001", "2026-11-19"), 2),
    ]
    out = processor.process(records)
    assert len(out.event_rows) == 4 and not out.dead_letters
    day = by_window(out.snapshots, "day", date(2026, 11, 18))
    assert day.csi == pytest.approx(34600 / 47, abs=1e-9)
    assert day.factors == {"service_quality": 800.0, "service_facility": 600.0}
    assert (day.n_responses, day.n_visits, day.nps, day.nps_n) == (2, 1, 0.0, 2)
    # the 30-day window ending 19 Nov holds both days: same ratings, 2 visits
    [rolling_snapshot] = [
        s for s in out.snapshots if s.window == "30d" and s.window_end == date(2026, 11, 19)
    ]
    assert rolling_snapshot.window_start == date(2026, 10, 21)
    rolling = rolling_snapshot.figures
    assert rolling.csi == pytest.approx(34600 / 47, abs=1e-9)
    assert rolling.n_visits == 2
    assert by_window(out.snapshots, "day", date(2026, 11, 19)).csi is None  # no ratings that day
    # the changelog goes to the partition the dealer's events came from
    assert set(processor.store.partitions.values()) == {2}  # type: ignore[attr-defined]
    # one roll-up update per changed dealer-day and scope, with absolute values
    assert sorted((u.scope, u.key, u.day.day) for u in out.rollups) == [
        ("brand", "unknown", 18), ("brand", "unknown", 19), ("network", "network", 18),
        ("network", "network", 19), ("region", "unknown", 18), ("region", "unknown", 19),
    ]  # fmt: skip


def test_replayed_event_counts_once(processor: DealerProcessor) -> None:
    feed = Feed()
    answer = survey("D002", "2026-11-18", {"work_quality": 10}, 9)
    first = processor.process([feed(answer)])
    out = processor.process([feed(answer), feed(answer)])
    assert out.duplicates == 2
    # counted once; its row and windows go out again, unchanged (a worker killed
    # before its sinks flushed must not leave them missing from the warehouse)
    assert [r[0] for r in out.event_rows] == [uuid.UUID(answer["event_id"])] * 2
    assert sorted((s.window, s.window_end, repr(s.figures)) for s in out.snapshots) == sorted(
        (s.window, s.window_end, repr(s.figures)) for s in first.snapshots
    )
    again = processor.process([feed(survey("D002", "2026-11-18", {"work_quality": 5}, 9))])
    # 10 and 5 → mean 7.5 → 750: the replays did not count
    assert by_window(again.snapshots, "day", date(2026, 11, 18)).csi == pytest.approx(750.0)


def test_late_event_re_emits_the_windows_that_contain_it(processor: DealerProcessor) -> None:
    feed = Feed()
    processor.process([feed(survey("D003", "2026-11-19", {"work_quality": 8}, 9))])
    out = processor.process([feed(survey("D003", "2026-11-17", {"work_quality": 6}, 9))])
    ends = sorted(s.window_end for s in out.snapshots if s.window == "30d")
    # windows ending 17, 18 and 19 Nov contain the 17th; none beyond the newest day (19th)
    assert ends == [date(2026, 11, 17), date(2026, 11, 18), date(2026, 11, 19)]
    assert by_window(out.snapshots, "30d", date(2026, 11, 19)).csi == pytest.approx(700.0)
    assert by_window(out.snapshots, "30d", date(2026, 11, 17)).csi == pytest.approx(600.0)


def test_malformed_input_is_dead_lettered_with_bytes_and_reason(
    processor: DealerProcessor,
) -> None:
    feed = Feed()
    good = survey("D004", "2026-11-18", {"work_quality": 8}, 9)
    off_scale = survey("D004", "2026-11-18", {"work_quality": 11}, 9)
    wrong_key = survey("D004", "2026-11-18", {"work_quality": 8}, 9)
    wrong_topic = visit("D004", "2026-11-18")
    records = [
        feed(good),
        feed(off_scale),
        feed(wrong_key, key=b"D999"),
        feed(wrong_topic, topic=SURVEY_TOPIC),
        RawRecord(SURVEY_TOPIC, 1, 99, b"D004", b"\xff\xfe{not json"),
    ]
    out = processor.process(records)
    assert len(out.event_rows) == 1
    reasons = [dl.reason for dl in out.dead_letters]
    assert len(reasons) == 4
    assert "ratings.work_quality" in reasons[0]
    assert "must equal dealer_id" in reasons[1]
    assert "arrived on topic" in reasons[2]
    assert reasons[3]
    last = out.dead_letters[3]
    assert last.dead_letter_id == f"{SURVEY_TOPIC}:1:99"
    row = last.to_row()
    assert base64.b64decode(row[7]) == b"\xff\xfe{not json"  # original bytes kept exactly
    assert out.snapshots[0].figures.n_responses == 1


def test_too_late_event_is_a_dead_letter(processor: DealerProcessor) -> None:
    feed = Feed()
    processor.process([feed(survey("D005", "2026-11-19", {"work_quality": 8}, 9))])
    within = survey("D005", "2026-10-15", {"work_quality": 6}, 9)  # 35 days before: counts
    beyond = survey("D005", "2026-10-14", {"work_quality": 6}, 9)  # 36 days: too late
    out = processor.process([feed(within), feed(beyond)])
    assert len(out.event_rows) == 1
    [dead] = out.dead_letters
    assert "too late" in dead.reason and "2026-10-14" in dead.reason


def test_rollups_are_sums_of_dealers_and_replays_change_nothing() -> None:
    dealers = DealerProcessor(DictStore(), CATALOGUE, clock=lambda: NOW)
    rollups = RollupProcessor(DictStore(), CATALOGUE, clock=lambda: NOW)
    feed = Feed()
    # D006 quality 10 twice (1000), D007 quality 7 once (700): network pools
    # the three ratings: (10 + 10 + 7)/3 = 9 → 900
    out = dealers.process(
        [
            feed(survey("D006", "2026-11-18", {"work_quality": 10}, 10)),
            feed(survey("D006", "2026-11-18", {"work_quality": 10}, 10)),
            feed(survey("D007", "2026-11-18", {"work_quality": 7}, 3)),
        ]
    )
    updates = [(0, u) for u in out.rollups]
    snapshots = rollups.process(updates).snapshots
    network = [s for s in snapshots if s.scope == "network" and s.window == "day"]
    assert network[0].figures.csi == pytest.approx(900.0)
    assert network[0].figures.nps == pytest.approx(100 / 3)  # 2 promoters, 1 detractor
    again = rollups.process(updates).snapshots  # a replayed update: absolute values, no change
    network_again = [s for s in again if s.scope == "network" and s.window == "day"]
    assert network_again[0].figures == network[0].figures


def call(dealer: str, at: str, visit_id: str, outcome: str = "reached") -> dict[str, Any]:
    return envelope(
        "call", dealer, at[:10], visit_id=visit_id, outcome=outcome,
        occurred_at=at, source="call_centre",
    )  # fmt: skip


def delivered_visit(dealer: str, day: str, visit_id: str, **body: Any) -> dict[str, Any]:
    event = visit(dealer, day)
    return {
        **event, "visit_id": visit_id, "delivered_at": f"{day}T10:00:00Z",
        "occurred_at": f"{day}T10:00:00Z", **body,
    }  # fmt: skip


@pytest.mark.parametrize("call_first", [False, True])
def test_follow_up_rate_does_not_depend_on_topic_order(call_first: bool) -> None:
    # 2 visits on 10 Nov delivered 10:00; V1 reached 2 days later (followed up),
    # V2 reached 4 days later (too late) → follow-up rate 1/2 = 50 %
    processor = DealerProcessor(DictStore(), CATALOGUE, clock=lambda: NOW)
    feed = Feed()
    visits = [
        feed(delivered_visit("D010", "2026-11-10", "V1")),
        feed(delivered_visit("D010", "2026-11-10", "V2")),
    ]
    calls = [
        feed(call("D010", "2026-11-12T09:00:00Z", "V1")),
        feed(call("D010", "2026-11-14T11:00:00Z", "V2")),
        feed(call("D010", "2026-11-11T09:00:00Z", "V2", outcome="no_answer")),
    ]
    first, second = (calls, visits) if call_first else (visits, calls)
    processor.process(first)
    out = processor.process(second)
    result = by_window(out.snapshots, "day", date(2026, 11, 10))
    assert result.follow_up_rate == 50.0
    assert result.contact_rate is None  # the calls' own day is 11–14 Nov, not 10 Nov


def test_comeback_within_30_days_breaks_fixed_first_time(processor: DealerProcessor) -> None:
    feed = Feed()
    processor.process(
        [
            feed(delivered_visit("D011", "2026-10-20", "V1")),
            feed(delivered_visit("D011", "2026-10-20", "V2")),
            feed(delivered_visit("D011", "2026-10-20", "V3")),
            feed(delivered_visit("D011", "2026-10-20", "V4")),
        ]
    )
    # V1 comes back after 15 days: 3 of 4 visits of 20 Oct fixed first time = 75 %
    out = processor.process(
        [
            feed(
                delivered_visit(
                    "D011", "2026-11-04", "V5", comeback_of="V1",
                    arrived_at="2026-11-04T09:00:00Z",
                )
            )
        ]
    )  # fmt: skip
    assert by_window(out.snapshots, "day", date(2026, 10, 20)).fixed_first_time == 75.0
    assert by_window(out.snapshots, "day", date(2026, 11, 4)).comeback_rate == 100.0


def complaint(
    dealer: str, at: str, complaint_id: str, status: str, severity: int
) -> dict[str, Any]:
    return envelope(
        "complaint", dealer, at[:10], complaint_id=complaint_id, status=status,
        category="waiting_time", severity=severity, occurred_at=at, source="dms",
    )  # fmt: skip


def test_complaint_response_and_resolution_times(processor: DealerProcessor) -> None:
    feed = Feed()
    # opened 10 Nov 08:00; C1 (severity 4, due 4 h / 48 h) responded after 2 h,
    # resolved after 50 h (past due); C2 (severity 1, due 48 h / 360 h) responded
    # after 30 h, closed without a separate "resolved" after 100 h.
    events = [
        complaint("D012", "2026-11-10T08:00:00Z", "C1", "opened", 4),
        complaint("D012", "2026-11-10T08:00:00Z", "C2", "opened", 1),
        complaint("D012", "2026-11-10T10:00:00Z", "C1", "responded", 4),
        complaint("D012", "2026-11-11T14:00:00Z", "C2", "responded", 1),
        complaint("D012", "2026-11-12T10:00:00Z", "C1", "resolved", 4),
        complaint("D012", "2026-11-14T12:00:00Z", "C2", "closed", 1),
    ]
    out = processor.process([feed(e) for e in events])
    result = by_window(out.snapshots, "day", date(2026, 11, 10))
    assert result.complaints_opened == 2
    # first responses 2 h and 30 h: nearest-rank p50 = 2 h, p90 = 30 h
    assert (result.first_response_p50_h, result.first_response_p90_h) == (2.0, 30.0)
    assert result.first_response_past_sla == 0.0
    # resolutions 50 h (past the 48 h due) and 100 h (within 360 h): 1 of 2 past SLA
    assert (result.resolution_p50_h, result.resolution_p90_h) == (50.0, 100.0)
    assert result.resolution_past_sla == 50.0


def test_loyalty_matrix_links_a_customers_sales_and_service_answers(
    processor: DealerProcessor,
) -> None:
    feed = Feed()

    def answer(customer: str, department: str, overall: int, intent: int | None) -> RawRecord:
        event = survey("D013", "2026-11-10", {}, 9)
        event.update(
            customer_ref=customer, department=department, overall=overall, return_intent=intent
        )
        return feed(event)

    out = processor.process(
        [
            answer("customerxx01", "sales", 9, None),  # X: satisfied with the sale
            answer("customerxx01", "service", 9, 10),  # X: satisfied, intent top-2 → high
            answer("customeryy02", "service", 4, 5),  # Y: no sales survey; (4−1)/9 < 0.5
            answer("customerzz03", "service", 8, 8),  # Z: no sales survey; satisfied, not top-2
        ]
    )
    service = [s for s in out.snapshots if s.department == "service"]
    result = by_window(service, "day", date(2026, 11, 10))
    assert result.loyalty_n == {
        "satisfied|satisfied": 1,
        "none|dissatisfied": 1,
        "none|satisfied": 1,
    }
    assert result.loyalty_matrix == {
        "satisfied|satisfied": 100.0,
        "none|dissatisfied": 0.0,
        "none|satisfied": 0.0,
    }


def test_open_complaint_backlog_is_cumulative(processor: DealerProcessor) -> None:
    feed = Feed()
    # C1 opened 1 Nov, closed 5 Nov; C2 opened 3 Nov, closed 4 Nov, reopened 6 Nov.
    # Open at the end of: 2 Nov → 1, 3 Nov → 2, 4 Nov → 1, 5 Nov → 0, 6 Nov → 1
    events = [
        complaint("D014", "2026-11-01T09:00:00Z", "C1", "opened", 2),
        complaint("D014", "2026-11-03T09:00:00Z", "C2", "opened", 2),
        complaint("D014", "2026-11-04T09:00:00Z", "C2", "closed", 2),
        complaint("D014", "2026-11-05T09:00:00Z", "C1", "closed", 2),
        complaint("D014", "2026-11-06T09:00:00Z", "C2", "reopened", 2),
    ]
    outs = [processor.process([feed(e)]) for e in events]
    backlog = {
        s.window_end.day: s.figures.complaints_backlog
        for out in outs
        for s in out.snapshots
        if s.window == "day"
    }
    # 2 Nov is re-emitted when C1's closing re-opens the windows after 1 Nov
    assert backlog == {1: 1, 2: 1, 3: 2, 4: 1, 5: 0, 6: 1}
    # a window that starts after earlier changes carries them in:
    # the 7-day window ending 6 Nov and the day window of 6 Nov both say 1
    last = outs[-1].snapshots
    assert by_window(last, "7d", date(2026, 11, 6)).complaints_backlog == 1
    assert by_window(last, "day", date(2026, 11, 6)).complaints_backlog == 1
    # a closing for a complaint never seen opened does not go negative
    out = processor.process([feed(complaint("D015", "2026-11-06T09:00:00Z", "C9", "closed", 2))])
    assert by_window(out.snapshots, "day", date(2026, 11, 6)).complaints_backlog is None


def test_final_snapshots_do_not_depend_on_how_topics_interleave() -> None:
    """Kafka orders records per topic only. Feed the simulator's events one
    topic after another (the worst interleaving), keep the last snapshot of
    every unit and window, and compare with the batch over the file order."""
    from dataclasses import asdict

    from pipeline.batch import run_batch, window_figures
    from pipeline.registry import DealerRegistry
    from pipeline.simulator import simulate, simulated_registry

    events = list(simulate(3, 40, end=date(2026, 11, 20), seed=5))
    registry = DealerRegistry(simulated_registry(3, seed=5))
    dealers = DealerProcessor(DictStore(), CATALOGUE, registry=registry, clock=lambda: NOW)
    rollups = RollupProcessor(DictStore(), CATALOGUE, clock=lambda: NOW)
    by_topic = sorted(events, key=lambda e: list(EVENT_TOPICS).index(e["event_type"]))
    feed = Feed()
    final: dict[tuple[str, str, str, str, date], Any] = {}
    for start in range(0, len(by_topic), 500):
        out = dealers.process([feed(e) for e in by_topic[start : start + 500]])
        snapshots = out.snapshots + rollups.process([(0, u) for u in out.rollups]).snapshots
        for snap in snapshots:
            final[(snap.scope, snap.key, snap.department, snap.window, snap.window_end)] = snap
    batch = run_batch([orjson.dumps(e) for e in events], CATALOGUE, registry=registry)
    for (scope, key, department, window, end), snap in final.items():
        expected = window_figures(batch, CATALOGUE, scope, key, department, window, end)
        for name, want in asdict(expected).items():
            got = getattr(snap.figures, name)
            where = f"{scope} {key} {department} {window} {end} {name}"
            if isinstance(want, float | dict):
                assert got == pytest.approx(want, abs=1e-9), where
            else:
                assert got == want, where


def region_watch_state(rollups: RollupProcessor, region: str) -> dict[str, Any]:
    stored = rollups.store.get(f"drops|region|{region}|service")
    assert stored is not None
    return stored


def assert_close(got: Any, want: Any, where: str = "") -> None:
    """Equal, floats to 1e-9 relative (sums taken in another order)."""
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for key in want:
            assert_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-9), where
    else:
        assert got == want, where


def test_a_lagging_partition_holds_its_regions_days_so_the_charts_match_a_replay() -> None:
    """A backlog read one dealer's partition at a time (D002's whole history,
    then D001's) feeds the region's charts the same days, with the same
    figures, as every dealer in event-time order, because a registered dealer
    not heard from yet holds the region's days for REGION_PATIENCE_S."""
    from pipeline.registry import DealerRegistry
    from pipeline.simulator import Drop, simulate, simulated_registry
    from pipeline.stream import REGION_PATIENCE_S

    registry = DealerRegistry(simulated_registry(2, seed=2))
    assert registry.region_of("D001") == registry.region_of("D002") == "North"
    events = [
        e
        for e in simulate(
            2, 60, end=date(2026, 11, 20), seed=2, survey_share=0.9, call_share=0.0,
            complaints=False, mystery_shops=False, sales_surveys_per_dealer_day=0.0,
            drops=[Drop("D002", date(2026, 10, 20), 90.0)],
        )
        if e["event_type"] == "survey"
    ]  # fmt: skip

    def run(order: list[dict[str, Any]], clock: list[datetime]) -> tuple[Any, list[Any]]:
        dealers = DealerProcessor(
            DictStore(), CATALOGUE, registry=registry, emit_snapshots=False, clock=lambda: NOW
        )
        rollups = RollupProcessor(
            DictStore(), CATALOGUE, registry=registry, emit_snapshots=False,
            member_patience_s=REGION_PATIENCE_S, clock=lambda: clock[0],
        )  # fmt: skip
        feed, alerts = Feed(), []
        for start in range(0, len(order), 50):
            out = dealers.process([feed(e) for e in order[start : start + 50]])
            alerts += rollups.process([(0, u) for u in out.rollups]).alerts
        return region_watch_state(rollups, "North"), alerts

    in_time_order = sorted(events, key=lambda e: e["occurred_at"])
    by_partition = sorted(events, key=lambda e: (e["dealer_id"] != "D002", e["occurred_at"]))
    expected_state, expected_alerts = run(in_time_order, [NOW])
    state, alerts = run(by_partition, [NOW])
    assert state["closed_through"] == expected_state["closed_through"] == "2026-11-16"
    assert_close(state["policies"], expected_state["policies"])  # sums in another order
    assert alerts == expected_alerts


def test_a_registered_dealer_never_heard_from_holds_a_region_only_for_the_patience() -> None:
    from pipeline.registry import Dealer, DealerRegistry

    registry = DealerRegistry(
        [Dealer("D001", "One", "North", "B", "G"), Dealer("D002", "Two", "North", "B", "G")]
    )
    dealers = DealerProcessor(DictStore(), CATALOGUE, registry=registry, clock=lambda: NOW)
    clock = [NOW]
    rollups = RollupProcessor(
        DictStore(), CATALOGUE, registry=registry, member_patience_s=300.0,
        clock=lambda: clock[0],
    )  # fmt: skip
    feed = Feed()

    def d002_day(day: str) -> None:
        out = dealers.process([feed(survey("D002", day, {"work_quality": 9}, 9))])
        rollups.process([(0, u) for u in out.rollups])

    for day in ("2026-11-01", "2026-11-02", "2026-11-03", "2026-11-04"):
        d002_day(day)
    # D001 (registered, silent) holds every day: nothing fed to the charts yet
    assert region_watch_state(rollups, "North")["closed_through"] == "2026-10-31"
    clock[0] = NOW.replace(minute=5, second=1)  # 301 s later: D001 no longer waited for
    d002_day("2026-11-05")
    assert region_watch_state(rollups, "North")["closed_through"] == "2026-11-03"
