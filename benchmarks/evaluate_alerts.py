"""Measure the drop alerts on simulated dealers; the figures behind docs/alerts.md.

Issue 4 ("Measured quality"). Simulates a dealer network (pipeline.simulator) for
``--years-history`` + ``--years-monitored`` years, once without any drop and once per
drop size, where every dealer's scores fall by that many CSI points from the first day
of the monitored period on (a dealer's events do not depend on the other dealers, so
this is, per dealer, exactly a single-drop run). Each run's surveys and calls are
validated with ``schemas.parse_event`` and fed, in event-time order, to
``pipeline.alerts.AlertEngine`` with a ``DictStore``: the code the stream and
``csi alerts replay`` run. It reports, for the monitored period:

- false alarms: drop alerts (kind "drop", status "open", scope "dealer") opened in the
  run without a drop, per dealer-year; all metrics together and per metric;
- detection delay per drop size: per dealer, the first drop alert opened at or after
  the drop start (any metric, and the CSI chart alone), in responses (the dealer's
  events that feed the drop charts, from the drop start up to and including the
  detecting one) and in days (detection date - start date). The share detected, and
  the median and 90th percentile (nearest rank) with undetected dealers counted as
  infinitely late: ">N" when the percentile falls on a miss (N: the fewest responses,
  or days, a missed dealer was watched for);
- the same for a naive rule: a dealer's 30-day service CSI (the mean of per-response
  CSI over the 30 days ending that day) more than 30 points below the 30 days before,
  evaluated on each day with responses when both windows hold at least 10; an alert is
  a day on which the rule becomes true (it was false on the previous evaluated day).

To keep the run short: complaints and mystery shops are switched off in the simulation
(they touch no drop chart); only responses are fed (visits and calls without ratings
reach no drop chart, only the case timers); every hot case is closed by a case action as
soon as it opens, as a dealer working its cases would (open cases pile up otherwise, and
every later event re-reads all of them); and the history period, the same in every
scenario, is fed once (split over the processes by dealer) and each scenario's monitored
period continues from a copy of that state. None of this changes a drop alert: on 8
dealers the alerts equal those of feeding every simulated event of each full run.

Target (issue 4): a 50-point CSI drop detected within 40 responses (median) at no more
than one false alarm per dealer-year. The output ends with two lines for CI::

    BENCH alerts_delay_50 <median responses> responses target 40 ok|short
    BENCH alerts_false_alarms <rate> per_dealer_year target 1 ok|short

Usage::

    .venv/bin/python benchmarks/evaluate_alerts.py [--dealers 120] [--years-history 1]
        [--years-monitored 1] [--sizes 30,50,80] [--seed 11] [--jobs N] [--quick]
        [--settings alerts.toml]

``--quick`` is a 30-dealer smoke run; ``--settings`` takes a CSI_ALERTS TOML file of
AlertSettings overrides. ``--jobs`` processes (default: all cores) share the work; the
default run takes 4-5 minutes on 2 cores, ``--quick`` about 1.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import pickle
import platform
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from pipeline.alerts import (
    DROP_METRICS,
    Alert,
    AlertEngine,
    AlertSettings,
    Case,
    drop_inputs,
    load_alert_settings,
)
from pipeline.catalogue import load_catalogue
from pipeline.metrics import response_csi
from pipeline.simulator import Drop, dealer_ids, simulate
from pipeline.stream import DictStore
from schemas import CallEvent, SurveyEvent, parse_event
from schemas.cases import CaseAction

END = date(2025, 12, 31)
"""Last simulated day (any fixed day: the simulated network has no calendar trend)."""
YEAR_DAYS = 365
TARGET_SIZE = 50
TARGET_DELAY = 40
TARGET_FALSE_ALARMS = 1.0
NAIVE_WINDOW_DAYS = 30
NAIVE_FALL = 30.0
NAIVE_MIN_RESPONSES = 10
FLUSH_EVERY = 1000
OTHER_SETTINGS = (
    "hot_bottom_points", "case_contact_hours", "case_resolve_hours",
    "sla_first_response_hours", "sla_resolution_hours", "mystery_pass_mark",
)  # fmt: skip
"""AlertSettings that play no part in drop alerts (not printed)."""
METRIC_SHORT = {"csi": "csi", "nps": "nps", "satisfaction_rate": "sat"}
_CASE_NAMESPACE = uuid.UUID("5b0c3c52-6f0e-4d3a-9d59-2f1e0a7c4e11")


# --- one scenario (runs in a worker process) ---------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """One simulated run: every dealer drops by `size` points at `monitor_start` (0: none)."""

    size: float
    dealers: int
    years_history: int
    years_monitored: int
    seed: int
    settings: AlertSettings

    @property
    def label(self) -> str:
        return "no drop" if self.size == 0 else f"drop {self.size:g}"

    @property
    def days(self) -> int:
        return YEAR_DAYS * (self.years_history + self.years_monitored)

    @property
    def start(self) -> date:
        return END - timedelta(days=self.days - 1)

    @property
    def monitor_start(self) -> date:
        return END - timedelta(days=YEAR_DAYS * self.years_monitored - 1)


@dataclass(frozen=True)
class DropAlert:
    """A drop alert opened in the monitored period, and how long after its start."""

    department: str
    metric: str
    responses: int
    days: int


@dataclass(frozen=True)
class DealerResult:
    dealer_id: str
    responses: int
    """Responses (events feeding the drop charts) in the monitored period."""
    alerts: tuple[DropAlert, ...]
    """Pipeline drop alerts opened in the monitored period, in order."""
    naive: tuple[tuple[int, int], ...]
    """Naive-rule alerts in the monitored period: (responses, days) after its start."""
    open_at_start: bool
    """A drop alert (opened in the history period) was still open when the drop began."""


@dataclass(frozen=True)
class ScenarioResult:
    scenario: Scenario
    dealers: tuple[DealerResult, ...]
    events: int
    seconds: float


@dataclass
class _Tracker:
    """One dealer's running counts: per simulated day, and its drop alerts."""

    days: int
    csi_sum: list[float] = field(init=False)
    csi_n: list[int] = field(init=False)
    responses_per_day: list[int] = field(init=False)
    responses: int = 0
    alerts: list[DropAlert] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.csi_sum = [0.0] * self.days
        self.csi_n = [0] * self.days
        self.responses_per_day = [0] * self.days


def _close_case(engine: AlertEngine, case: Case) -> None:
    """Close a freshly opened case at once (a dealer working its cases)."""
    action = CaseAction(
        action_id=uuid.uuid5(_CASE_NAMESPACE, case.case_id),
        case_id=case.case_id,
        dealer_id=case.dealer_id,
        action="close",
        occurred_at=case.opened_at,
        by="evaluate_alerts",
        reason="no_action_needed",
        comment="closed at once by benchmarks/evaluate_alerts.py",
    )
    engine.on_case_action(action, 0)


def naive_onsets(tracker: _Tracker, monitor_index: int) -> list[tuple[int, int]]:
    """Days the naive rule starts firing in the monitored period: (responses, days) after
    the period's start, the day's responses included."""
    days = tracker.days
    sums, counts = [0.0] * (days + 1), [0] * (days + 1)
    for d in range(days):
        sums[d + 1] = sums[d] + tracker.csi_sum[d]
        counts[d + 1] = counts[d] + tracker.csi_n[d]
    w = NAIVE_WINDOW_DAYS
    onsets: list[tuple[int, int]] = []
    was_true = False
    responses = 0
    for d in range(days):
        if d >= monitor_index:
            responses += tracker.responses_per_day[d]
        if tracker.csi_n[d] == 0 or d < 2 * w - 1:
            continue
        n_now = counts[d + 1] - counts[d + 1 - w]
        n_before = counts[d + 1 - w] - counts[d + 1 - 2 * w]
        if n_now < NAIVE_MIN_RESPONSES or n_before < NAIVE_MIN_RESPONSES:
            continue
        now = (sums[d + 1] - sums[d + 1 - w]) / n_now
        before = (sums[d + 1 - w] - sums[d + 1 - 2 * w]) / n_before
        is_true = now < before - NAIVE_FALL
        if is_true and not was_true and d >= monitor_index:
            onsets.append((responses, d - monitor_index))
        was_true = is_true
    return onsets


class _Feeder:
    """Feeds one scenario's responses to an AlertEngine and keeps the dealers' counts."""

    def __init__(self, scenario: Scenario, store: DictStore, trackers: dict[str, _Tracker]) -> None:
        self.scenario = scenario
        self.catalogue = load_catalogue()
        self.engine = AlertEngine(
            store, self.catalogue, scenario.settings, lambda dealer: ("unknown", "unknown")
        )
        self.trackers = trackers
        self.now = datetime.combine(END + timedelta(days=2), datetime.min.time(), UTC)
        self.fed = 0

    def events(self) -> Iterator[dict[str, Any]]:
        """The scenario's simulated events that may be responses, in event-time order."""
        ids = dealer_ids(self.scenario.dealers)
        start, size = self.scenario.monitor_start, self.scenario.size
        drops = [Drop(d, start, size) for d in ids] if size else []
        events = simulate(
            self.scenario.dealers, self.scenario.days, end=END, seed=self.scenario.seed,
            drops=drops, complaints=False, mystery_shops=False,
        )  # fmt: skip
        return (raw for raw in events if _may_respond(raw))

    def feed(self, raw: dict[str, Any]) -> None:
        tracker = self.trackers.get(raw["dealer_id"])
        if tracker is None:
            return  # another process's dealer
        catalogue, monitor_start = self.catalogue, self.scenario.monitor_start
        event = parse_event(orjson.dumps(raw), now=self.now)
        assert isinstance(event, SurveyEvent | CallEvent)
        if not drop_inputs(event, catalogue):
            return  # not a response: it reaches no drop chart
        day = event.occurred_at.astimezone(UTC).date()
        index = (day - self.scenario.start).days
        tracker.responses_per_day[index] += 1
        if day >= monitor_start:
            tracker.responses += 1
        if event.department == "service" and (
            isinstance(event, SurveyEvent) or event.carries_ratings
        ):
            score = response_csi(event.scale, event.ratings, catalogue)
            if score is not None:
                tracker.csi_sum[index] += score
                tracker.csi_n[index] += 1
        for record in self.engine.on_event(event, 0):
            if isinstance(record, Case):
                if record.change == "opened":
                    _close_case(self.engine, record)
            elif _counts(record, monitor_start):
                days = (record.detected_at.date() - monitor_start).days
                tracker.alerts.append(
                    DropAlert(record.department, record.metric, tracker.responses, days)
                )
        self.fed += 1
        if self.fed % FLUSH_EVERY == 0:
            self.engine.flush()


@dataclass(frozen=True)
class History:
    """The engine's state and the dealers' counts at the end of the history period (the
    same in every scenario: a drop changes nothing before it starts), pickled."""

    state: bytes
    fed: int
    seconds: float


def run_history(task: tuple[Scenario, tuple[str, ...]]) -> History:
    """Feed the history period of some dealers (all dealers are simulated, those fed)."""
    began = time.perf_counter()
    scenario, dealers = task
    store = DictStore()
    feeder = _Feeder(scenario, store, {d: _Tracker(scenario.days) for d in dealers})
    boundary = f"{scenario.monitor_start.isoformat()}T00:00:00Z"  # the simulator's format
    for raw in feeder.events():
        if raw["occurred_at"] >= boundary:
            break
        feeder.feed(raw)
    feeder.engine.flush()
    state = pickle.dumps((store.data, store.partitions, feeder.trackers))
    return History(state, feeder.fed, time.perf_counter() - began)


def run_scenario(task: tuple[Scenario, Sequence[History]]) -> ScenarioResult:
    """Simulate one scenario and feed its monitored period through the alert engine,
    starting from the engine's state after the history period."""
    began = time.perf_counter()
    scenario, histories = task
    store = DictStore()
    trackers: dict[str, _Tracker] = {}
    for history in histories:
        data, partitions, tracked = pickle.loads(history.state)
        store.data.update(data)
        store.partitions.update(partitions)
        trackers.update(tracked)
    open_at_start = {
        key.split("|")[2]
        for key, value in store.data.items()
        if key.startswith("drops|dealer|") and value.get("open")
    }
    feeder = _Feeder(scenario, store, trackers)
    boundary = f"{scenario.monitor_start.isoformat()}T00:00:00Z"
    for raw in feeder.events():
        if raw["occurred_at"] >= boundary:
            feeder.feed(raw)
    feeder.engine.flush()
    monitor_index = (scenario.monitor_start - scenario.start).days
    dealers = tuple(
        DealerResult(d, trackers[d].responses, tuple(trackers[d].alerts),
                     tuple(naive_onsets(trackers[d], monitor_index)), d in open_at_start)
        for d in dealer_ids(scenario.dealers)
    )  # fmt: skip
    return ScenarioResult(scenario, dealers, feeder.fed, time.perf_counter() - began)


def _may_respond(raw: dict[str, Any]) -> bool:
    """Whether a simulated event can be a response (a survey, a call with ratings)."""
    kind = raw["event_type"]
    return kind == "survey" or (
        kind == "call" and (bool(raw.get("ratings")) or raw.get("overall") is not None)
    )


def _counts(record: Alert, monitor_start: date) -> bool:
    return (
        record.kind == "drop"
        and record.status == "open"
        and record.scope == "dealer"
        and record.detected_at.date() >= monitor_start
    )


# --- summaries ---------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (inf stands for a miss); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)), 1) - 1]


@dataclass(frozen=True)
class Delays:
    """Detection delays of one method in one drop scenario."""

    responses: list[float]
    days: list[float]
    missed_responses: int | None
    """The fewest responses a missed dealer was watched for (None: nothing missed)."""
    monitored_days: int

    @property
    def detected(self) -> float:
        return sum(math.isfinite(x) for x in self.days) / len(self.days) if self.days else 0.0

    def median_responses(self) -> float:
        return percentile(self.responses, 0.5)

    def text(self, q: float) -> str:
        r, d = percentile(self.responses, q), percentile(self.days, q)
        r_text = f"{r:.0f}" if math.isfinite(r) else f">{self.missed_responses}"
        d_text = f"{d:.0f}" if math.isfinite(d) else f">{self.monitored_days - 1}"
        return f"{r_text} / {d_text}"


def delays(
    dealers: Sequence[DealerResult], firsts: Sequence[tuple[int, int] | None], days: int
) -> Delays:
    responses = [float(f[0]) if f else math.inf for f in firsts]
    in_days = [float(f[1]) if f else math.inf for f in firsts]
    missed = [d.responses for d, f in zip(dealers, firsts, strict=True) if f is None]
    return Delays(responses, in_days, min(missed) if missed else None, days)


def pipeline_delays(result: ScenarioResult, metric: str | None = None) -> Delays:
    firsts: list[tuple[int, int] | None] = []
    for dealer in result.dealers:
        hit = next((a for a in dealer.alerts if metric is None or a.metric == metric), None)
        firsts.append((hit.responses, hit.days) if hit else None)
    days = YEAR_DAYS * result.scenario.years_monitored
    return delays(result.dealers, firsts, days)


def naive_delays(result: ScenarioResult) -> Delays:
    firsts = [d.naive[0] if d.naive else None for d in result.dealers]
    return delays(result.dealers, firsts, YEAR_DAYS * result.scenario.years_monitored)


@dataclass(frozen=True)
class FalseAlarms:
    total: float
    per_metric: dict[str, float]
    sales_share: float
    naive: float


def false_alarms(result: ScenarioResult) -> FalseAlarms:
    dealer_years = len(result.dealers) * result.scenario.years_monitored
    alerts = [a for d in result.dealers for a in d.alerts]
    per_metric = {m: sum(a.metric == m for a in alerts) / dealer_years for m in DROP_METRICS}
    sales = sum(a.department == "sales" for a in alerts)
    return FalseAlarms(
        total=len(alerts) / dealer_years,
        per_metric=per_metric,
        sales_share=sales / len(alerts) if alerts else 0.0,
        naive=sum(len(d.naive) for d in result.dealers) / dealer_years,
    )


HEADER = (
    f"{'scenario':<10}{'method':<15}{'false alarms/dealer-yr':<36}{'detected':>9}"
    f"   {'median delay (resp / days)':<29}{'p90 delay (resp / days)'}"
)


def _row(scenario: str, method: str, alarms: str = "", found: Delays | None = None) -> str:
    line = f"{scenario:<10}{method:<15}{alarms:<36}"
    if found is not None:
        line += f"{found.detected:>9.0%}   {found.text(0.5):<29}{found.text(0.9)}"
    return line.rstrip()


def render(results: Sequence[ScenarioResult]) -> list[str]:
    lines = [HEADER, "-" * len(HEADER)]
    for result in results:
        label = result.scenario.label
        if result.scenario.size == 0:
            fa = false_alarms(result)
            parts = ", ".join(f"{METRIC_SHORT[m]} {v:.2f}" for m, v in fa.per_metric.items())
            lines.append(_row(label, "pipeline", f"{fa.total:.2f} ({parts})"))
            lines.append(_row(label, "naive", f"{fa.naive:.2f}"))
            continue
        lines.append(_row(label, "pipeline", found=pipeline_delays(result)))
        lines.append(_row(label, "pipeline csi", found=pipeline_delays(result, "csi")))
        lines.append(_row(label, "naive", found=naive_delays(result)))
    return lines


# --- main --------------------------------------------------------------------------------


def _sizes(text: str) -> list[float]:
    sizes = sorted({float(s) for s in text.split(",") if s.strip()})
    if any(s <= 0 or not math.isfinite(s) for s in sizes):
        raise argparse.ArgumentTypeError("sizes must be positive CSI points, e.g. 30,50,80")
    return sizes


def _say(text: str, indent: str = "") -> None:
    """Print a note wrapped to 100 columns."""
    print(textwrap.fill(text, 100, initial_indent=indent, subsequent_indent=indent or "  "))


def run(scenarios: Sequence[Scenario], jobs: int) -> tuple[list[ScenarioResult], list[History]]:
    """Run the scenarios (all alike but for the drop size): results in input order, and
    the history period's parts.

    The history period is fed once, split over `jobs` processes by dealer; then each
    scenario's monitored period runs in its own process from that state."""
    first = scenarios[0]
    ids = dealer_ids(first.dealers)
    chunks = [tuple(ids[k::jobs]) for k in range(min(jobs, len(ids)))]
    if jobs <= 1:
        histories = [run_history((first, tuple(ids)))]
        results = [run_scenario((s, histories)) for s in scenarios]
    else:
        with multiprocessing.Pool(jobs) as pool:
            histories = pool.map(run_history, [(first, c) for c in chunks], chunksize=1)
            tasks = [(s, histories) for s in scenarios]
            results = pool.map(run_scenario, tasks, chunksize=1)
    return results, histories


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dealers", type=int, default=120)
    parser.add_argument("--years-history", type=int, default=1)
    parser.add_argument("--years-monitored", type=int, default=1)
    parser.add_argument("--sizes", type=_sizes, default=_sizes("30,50,80"))
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="a 30-dealer smoke run")
    parser.add_argument("--settings", type=Path, help="a TOML file of AlertSettings overrides")
    args = parser.parse_args(argv)
    dealers = 30 if args.quick else int(args.dealers)
    if dealers < 1 or args.years_history < 1 or args.years_monitored < 1:
        parser.error("--dealers, --years-history and --years-monitored must be >= 1")
    sizes: list[float] = list(args.sizes)
    if TARGET_SIZE not in sizes:
        sizes = sorted([*sizes, float(TARGET_SIZE)])  # the target is stated for 50 points
    settings = load_alert_settings(args.settings)

    began = time.perf_counter()
    scenarios = [
        Scenario(size, dealers, args.years_history, args.years_monitored, args.seed, settings)
        for size in [0.0, *sizes]
    ]
    print(
        f"running {len(scenarios)} scenarios x {dealers} dealers on {args.jobs} processes ...",
        file=sys.stderr,
        flush=True,
    )
    results, histories = run(scenarios, max(int(args.jobs), 1))
    elapsed = time.perf_counter() - began

    base = results[0]
    monitor_start = base.scenario.monitor_start
    per_year = sorted(d.responses / args.years_monitored for d in base.dealers)
    _say(
        f"evaluate_alerts {time.strftime('%Y-%m-%d %H:%M')} | {platform.machine()}, "
        f"{os.cpu_count()} cores | {dealers} dealers, seed {args.seed}, "
        f"{args.years_history} year(s) history + {args.years_monitored} monitored "
        f"({monitor_start} to {END}); drops start {monitor_start} for every dealer; "
        f"responses per dealer-year (monitored, no drop): median "
        f"{percentile(per_year, 0.5):.0f}, min {per_year[0]:.0f}, max {per_year[-1]:.0f}; "
        "simulated without complaints and mystery shops"
    )
    print()
    for line in render(results):
        print(line)
    print()
    fa = false_alarms(base)
    _say(
        "pipeline: drop alerts (dealer scope) of all three metrics; 'pipeline csi': the CSI "
        f"chart alone. {fa.sales_share:.0%} of the false alarms are in the sales department."
    )
    _say(
        f"naive: 30-day service CSI more than {NAIVE_FALL:g} points below the 30 days before "
        f"(at least {NAIVE_MIN_RESPONSES} responses in each)."
    )
    _say(
        "Delays: responses (every event feeding the drop charts) / days after the drop "
        "start; nearest-rank percentiles, misses count as never (>N: on a miss)."
    )
    already = [d.dealer_id for d in base.dealers if d.open_at_start]
    if already:
        _say(
            f"{len(already)} dealer(s) ({', '.join(already)}) had a drop alert from the history "
            "period still open when the drops began; only a later alert counts as detection."
        )
    drop_settings = [f.name for f in fields(settings) if f.name not in OTHER_SETTINGS]
    _say(
        "settings (AlertSettings): "
        + " ".join(f"{name}={getattr(settings, name)}" for name in drop_settings)
    )
    history_cpu = sum(h.seconds for h in histories)
    cpu = sum(r.seconds for r in results)
    _say(
        f"runtime {elapsed:.0f} s wall on {args.jobs} processes (history once: "
        f"{history_cpu:.0f} s CPU, {sum(h.fed for h in histories):,} responses; scenarios: "
        f"{cpu:.0f} s CPU, {sum(r.events for r in results):,} responses fed to the engine)"
    )

    target = next(r for r in results if r.scenario.size == TARGET_SIZE)
    median = pipeline_delays(target).median_responses()
    median_text = f"{median:.0f}" if math.isfinite(median) else "inf"
    delay_ok = median <= TARGET_DELAY
    alarms_ok = fa.total <= TARGET_FALSE_ALARMS
    print(
        f"BENCH alerts_delay_{TARGET_SIZE} {median_text} responses target {TARGET_DELAY} "
        f"{'ok' if delay_ok else 'short'}"
    )
    print(
        f"BENCH alerts_false_alarms {fa.total:.2f} per_dealer_year target "
        f"{TARGET_FALSE_ALARMS:g} {'ok' if alarms_ok else 'short'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
