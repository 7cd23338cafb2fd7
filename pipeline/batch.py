"""Batch recompute: the stream's own code over a file of events.

Each JSON line becomes the record the producer would have sent (topic from
its `event_type`, key its `dealer_id`) and goes through the same
`DealerProcessor` and `RollupProcessor` as in the worker, with dicts for
state, so `csi metrics` gives exactly the stream's figures — validation,
dedup by event_id, lateness and roll-ups included.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from functools import partial
from typing import Any

import orjson

from pipeline.alerts import Alert, AlertSettings, Case
from pipeline.catalogue import Catalogue
from pipeline.metrics import Bucket, Figures, figures, window_start
from pipeline.registry import DealerRegistry
from pipeline.stream import (
    DEFAULT_LATENESS_DAYS,
    BatchOutput,
    DeadLetter,
    DealerProcessor,
    DictStore,
    RawRecord,
    RollupProcessor,
    backlog_index_key,
    dealer_bucket_key,
    scope_bucket_key,
    window_bucket,
)
from pipeline.topics import CASE_ACTIONS, EVENT_TOPICS
from pipeline.warehouse import SinkSet, Warehouse, alert_row, case_row

CHUNK = 10_000
"""Records per processor call: big enough to amortise, small enough to stream."""


def record_for_line(line_number: int, line: bytes) -> RawRecord:
    """The Kafka record the producer would send for this line. A line that is
    not a JSON object with a known `event_type` still becomes a record (on no
    topic), so the processor rejects it with its usual reason."""
    topic, key = "", None
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        spec = EVENT_TOPICS.get(str(data.get("event_type")))
        if spec is None and "action_id" in data and "case_id" in data:
            spec = CASE_ACTIONS  # a case action, replayed with the events
        topic = spec.name if spec else ""
        dealer = data.get("dealer_id")
        key = dealer.encode("utf-8") if isinstance(dealer, str) else None
    return RawRecord(topic, 0, line_number, key, line)


@dataclass
class BatchState:
    dealers: DictStore = field(default_factory=DictStore)
    rollups: DictStore = field(default_factory=DictStore)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    cases: list[Case] = field(default_factory=list)
    events: int = 0

    def fold(self, out: BatchOutput, rollup_alerts: Iterable[Alert]) -> None:
        """Keep what one chunk produced."""
        self.events += len(out.event_rows)
        self.dead_letters += out.dead_letters
        self.alerts += [*out.alerts, *rollup_alerts]
        self.cases += out.cases


def _records(lines: Iterable[bytes], *, event_time_order: bool = False) -> Iterator[RawRecord]:
    """A record per non-blank line (line numbers become offsets), in file order
    (streamed) or in event-time order (the file held in memory to sort it;
    unreadable lines first, so they become dead letters with their line numbers)."""
    numbered: Iterable[tuple[int, bytes]] = (
        (n, line) for n, line in enumerate(lines, start=1) if line.strip()
    )
    if event_time_order:
        numbered = sorted(numbered, key=lambda item: (_occurred_at(item[1]), item[0]))
    return (record_for_line(n, line) for n, line in numbered)


def run_batch(
    lines: Iterable[bytes],
    catalogue: Catalogue,
    *,
    registry: DealerRegistry | None = None,
    lateness_days: int = DEFAULT_LATENESS_DAYS,
    alert_settings: AlertSettings | None = None,
) -> BatchState:
    """Fold every line (1-based line numbers become record offsets)."""
    return run_records(
        _records(lines), catalogue, registry=registry, lateness_days=lateness_days,
        alert_settings=alert_settings,
    )  # fmt: skip


def run_records(
    records: Iterable[RawRecord],
    catalogue: Catalogue,
    *,
    registry: DealerRegistry | None = None,
    lateness_days: int = DEFAULT_LATENESS_DAYS,
    alert_settings: AlertSettings | None = None,
) -> BatchState:
    """The stream's processors over records, in the order given."""
    state = BatchState()
    dealer = DealerProcessor(
        state.dealers, catalogue, registry=registry, lateness_days=lateness_days,
        emit_snapshots=False, alert_settings=alert_settings,
    )  # fmt: skip
    rollup = RollupProcessor(
        state.rollups, catalogue, emit_snapshots=False, alert_settings=alert_settings
    )
    for chunk in _chunks(records):
        out = dealer.process(chunk)
        state.fold(out, rollup.process([(0, update) for update in out.rollups]).alerts)
    return state


def load_warehouse(
    lines: Iterable[bytes],
    warehouse: Warehouse,
    catalogue: Catalogue,
    *,
    registry: DealerRegistry | None = None,
    lateness_days: int = DEFAULT_LATENESS_DAYS,
    alert_settings: AlertSettings | None = None,
) -> BatchState:
    """`csi load`: the worker's processors over a file, straight into the
    warehouse — events, dead letters, every snapshot, alerts and cases, with
    the same rows the worker's sinks write (a backfill, a demo, a test fixture
    for dashboards), in event-time order like `csi alerts replay`."""
    state = BatchState()
    # snapshots are coalesced over the whole file: every changed window is
    # built once, from the final buckets, when the file is done
    dealer = DealerProcessor(
        state.dealers, catalogue, registry=registry, lateness_days=lateness_days,
        alert_settings=alert_settings, snapshot_interval_s=math.inf,
    )  # fmt: skip
    rollup = RollupProcessor(
        state.rollups, catalogue, alert_settings=alert_settings, snapshot_interval_s=math.inf
    )
    sinks = SinkSet(warehouse, max_rows=100_000, max_age_s=3600.0)
    for chunk in _chunks(_records(lines, event_time_order=True)):
        started = time.monotonic()
        out = dealer.process(chunk)
        rolled = rollup.process([(0, update) for update in out.rollups])
        state.fold(out, rolled.alerts)
        sinks.events.add(out.event_rows)
        sinks.dead_letters.add(d.to_row() for d in out.dead_letters)
        sinks.metric_snapshots.add(s.to_row() for s in [*out.snapshots, *rolled.snapshots])
        sinks.alerts.add(alert_row(a) for a in [*out.alerts, *rolled.alerts])
        sinks.cases.add(case_row(c) for c in out.cases)
        # the batch's own health rows, as the worker writes them
        at, elapsed = datetime.now(UTC), max(time.monotonic() - started, 1e-3)
        kinds = Counter(str(row[1]) for row in out.event_rows)
        kinds["dead_letter"] = len(out.dead_letters)
        sinks.pipeline_health.add(
            [(at, "csi-load", "events_per_s", k, n / elapsed) for k, n in sorted(kinds.items())]
            + sinks.health_rows(at, "csi-load")
        )
        sinks.flush_due()
    sinks.metric_snapshots.add(s.to_row() for s in dealer.flush_snapshots())
    sinks.metric_snapshots.add(s.to_row() for s in rollup.flush_snapshots())
    sinks.flush_all()
    return state


def _occurred_at(line: bytes) -> str:
    """A line's `occurred_at` as a UTC ISO text that sorts by time ("" when unreadable)."""
    try:
        data = orjson.loads(line)
        moment = datetime.fromisoformat(data["occurred_at"].replace("Z", "+00:00"))
        return moment.astimezone(UTC).isoformat() if moment.tzinfo else ""
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError):
        return ""


def replay_alerts(
    lines: Iterable[bytes],
    catalogue: Catalogue,
    *,
    registry: DealerRegistry | None = None,
    lateness_days: int = DEFAULT_LATENESS_DAYS,
    alert_settings: AlertSettings | None = None,
) -> BatchState:
    """`csi alerts replay`: the stream's detectors over a file (events and case
    actions) in event-time order."""
    return run_records(
        _records(lines, event_time_order=True), catalogue, registry=registry,
        lateness_days=lateness_days, alert_settings=alert_settings,
    )  # fmt: skip


def _chunks(records: Iterable[RawRecord]) -> Iterator[list[RawRecord]]:
    chunk: list[RawRecord] = []
    for record in records:
        chunk.append(record)
        if len(chunk) >= CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def window_figures(
    state: BatchState,
    catalogue: Catalogue,
    scope: str,
    key: str,
    department: str,
    window: str,
    window_end: date,
) -> Figures:
    """The figures of one unit and window, from the batch state."""
    if scope == "dealer":
        store, bucket_key = state.dealers, partial(dealer_bucket_key, key, department)
    else:
        store, bucket_key = state.rollups, partial(scope_bucket_key, scope, key, department)

    def bucket(day: date) -> Bucket:
        stored = store.get(bucket_key(day))
        return Bucket.from_dict(stored["stats"]) if stored else Bucket()

    index_key = backlog_index_key(scope, key, department)
    return figures(window_bucket(store, index_key, window, window_end, bucket), catalogue)


def unit_keys(state: BatchState, scope: str) -> list[str]:
    """Every unit of a scope that has any data."""
    if scope == "dealer":
        return sorted({k.split("|")[1] for k in state.dealers.data if k.startswith("dealer|")})
    prefix = scope + "|"
    return sorted({k.split("|")[1] for k in state.rollups.data if k.startswith(prefix)})


def metrics_report(
    state: BatchState,
    catalogue: Catalogue,
    *,
    scope: str,
    window: str,
    as_of: date,
    department: str = "service",
) -> list[dict[str, Any]]:
    """One JSON-ready object per unit of the scope, as `csi metrics` prints."""
    report = []
    for key in unit_keys(state, scope):
        result = window_figures(state, catalogue, scope, key, department, window, as_of)
        report.append(
            {
                "scope": scope,
                "key": key,
                "department": department,
                "window": window,
                "window_start": window_start(window, as_of).isoformat(),
                "window_end": as_of.isoformat(),
                **asdict(result),
            }
        )
    return report
