"""What the stream does with one batch of records — broker-free.

`DealerProcessor.process()` validates raw Kafka records, folds valid events
into daily buckets of sufficient statistics per dealer and department held
in a `StateStore` (a Faust table in the worker, a dict in tests and in
batch), and returns the rows for the warehouse, the dead letters, the
dealer snapshots of every window the batch touched, and one roll-up update
per changed dealer-day and scope (region, brand, network).

`RollupProcessor.process()` folds those updates into the scopes' daily
buckets and returns their snapshots. An update carries the dealer-day
bucket's *absolute* value and the roll-up adds `new − old`, so a replayed
update changes nothing.

The Faust worker (`pipeline.worker`) is a thin adapter around both; the
batch path (`pipeline.batch`) runs the very same code over a file.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import Any, Protocol

from pipeline.alerts import (
    Alert,
    AlertEngine,
    AlertSettings,
    Case,
    DropWatch,
    Record,
    region_day_inputs,
    region_watch_days,
)
from pipeline.catalogue import Catalogue
from pipeline.metrics import (
    COMEBACK_DAYS,
    FOLLOW_UP_DAYS,
    WINDOWS,
    Bucket,
    Figures,
    affected_window_ends,
    figures,
    is_satisfied,
    is_top2,
    merged,
    window_days,
    window_start,
)
from pipeline.registry import UNKNOWN, DealerRegistry
from pipeline.topics import CASE_ACTIONS, EVENT_TOPICS
from pipeline.warehouse import METRIC_SNAPSHOTS_COLUMNS, dead_letter_row
from schemas import (
    AnyEvent,
    CallEvent,
    ComplaintEvent,
    InvalidEvent,
    SurveyEvent,
    VisitEvent,
    event_to_json,
    parse_event,
)
from schemas.cases import CaseAction, parse_case_action

TOPIC_EVENT_TYPE = {spec.name: event_type for event_type, spec in EVENT_TOPICS.items()}


@dataclass(frozen=True)
class RawRecord:
    """One Kafka record as consumed: where it came from and its exact bytes."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes


@dataclass(frozen=True)
class DeadLetter:
    """Rejected input, kept with its original bytes and a readable reason."""

    source_topic: str
    partition: int
    offset: int
    key: str
    reason: str
    raw: bytes
    received_at: datetime

    @property
    def dead_letter_id(self) -> str:
        return f"{self.source_topic}:{self.partition}:{self.offset}"

    def to_row(self) -> tuple[Any, ...]:
        return dead_letter_row(
            source_topic=self.source_topic,
            partition=self.partition,
            offset=self.offset,
            key=self.key,
            reason=self.reason,
            raw=self.raw,
            received_at=self.received_at,
        )

    @property
    def message_key(self) -> bytes:
        """The dead-letter topic's record key: the original key, cut short."""
        return self.key[:DEAD_LETTER_MESSAGE_KEY_CHARS].encode("utf-8")

    def to_message(self) -> dict[str, Any]:
        """The dead-letter topic's JSON value. It must fit in one record (Faust's
        max_request_size: 1 000 000 bytes; the broker's message.max.bytes), so it
        carries the first DEAD_LETTER_MESSAGE_RAW_BYTES of the bytes (`raw_bytes`
        says how many there were) and of the key; the warehouse row keeps them all."""
        raw = self.raw[:DEAD_LETTER_MESSAGE_RAW_BYTES]
        return {
            "dead_letter_id": self.dead_letter_id,
            "received_at": self.received_at.isoformat(),
            "source_topic": self.source_topic,
            "partition": self.partition,
            "offset": self.offset,
            "key": self.key[:DEAD_LETTER_MESSAGE_KEY_CHARS],
            "reason": self.reason,
            "raw_b64": base64.b64encode(raw).decode("ascii"),
            "raw_bytes": len(self.raw),
        }


DEAD_LETTER_MESSAGE_RAW_BYTES = 512 * 1024
"""base64 makes 683 KiB of it: a dead-letter message stays well under 1 000 000 bytes."""
DEAD_LETTER_MESSAGE_KEY_CHARS = 256


def _shown_key(key: str | None) -> str:
    """A message key for a reason: a key can be as big as the record."""
    text = repr(key)
    return text if len(text) <= 80 else text[:79] + "…"


@dataclass(frozen=True)
class Snapshot:
    """The figures of one unit and window, as of `window_end`."""

    scope: str
    key: str
    region: str
    brand: str
    department: str
    window: str
    window_start: date
    window_end: date
    figures: Figures
    computed_at: datetime
    version: int

    def flat(self) -> dict[str, Any]:
        values = {name: getattr(self, name) for name in SNAPSHOT_LABELS}
        # shallow on purpose: asdict() deep-copies every map, a third of the
        # stream's time in a profile
        values.update((name, getattr(self.figures, name)) for name in FIGURE_NAMES)
        return values

    def to_row(self) -> tuple[Any, ...]:
        values = self.flat()
        return tuple(values[column] for column in METRIC_SNAPSHOTS_COLUMNS)

    def to_message(self) -> dict[str, Any]:
        """The metrics topic's JSON value."""
        message = self.flat()
        for name in ("window_start", "window_end", "computed_at"):
            message[name] = message[name].isoformat()
        return message


SNAPSHOT_LABELS = tuple(f.name for f in fields(Snapshot) if f.name != "figures")
FIGURE_NAMES = tuple(f.name for f in fields(Figures))
"""Every column of a snapshot row that is not a figure."""


@dataclass(frozen=True)
class RollupUpdate:
    """A dealer-day bucket's new absolute value, for one roll-up scope."""

    scope: str  # region, brand, network
    key: str
    dealer_id: str
    department: str
    day: date
    stats: dict[str, float]

    @property
    def partition_key(self) -> str:
        return f"{self.scope}|{self.key}"

    def to_message(self) -> dict[str, Any]:
        return {**asdict(self), "day": self.day.isoformat()}

    @classmethod
    def from_message(cls, data: dict[str, Any]) -> RollupUpdate:
        return cls(
            data["scope"], data["key"], data["dealer_id"], data["department"],
            date.fromisoformat(data["day"]), {k: float(v) for k, v in data["stats"].items()},
        )  # fmt: skip


@dataclass
class BatchOutput:
    event_rows: list[tuple[Any, ...]] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)
    rollups: list[RollupUpdate] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    cases: list[Case] = field(default_factory=list)
    duplicates: int = 0

    def add_records(self, records: Iterable[Record]) -> None:
        for record in records:
            if isinstance(record, Alert):
                self.alerts.append(record)
            else:
                self.cases.append(record)


@dataclass
class RollupOutput:
    snapshots: list[Snapshot] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)


@dataclass
class StoredBucket:
    """A day's bucket as stored in the state table, with the ids of the events
    it counts: a replayed event has the same occurred_at, hence the same
    bucket, so checking these ids makes the stream count it once."""

    bucket: Bucket = field(default_factory=Bucket)
    event_ids: set[str] = field(default_factory=set)

    def to_dict(self) -> dict[str, Any]:
        return {"stats": self.bucket.to_dict(), "event_ids": sorted(self.event_ids)}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> StoredBucket:
        if not data:
            return cls()
        return cls(Bucket.from_dict(data["stats"]), set(data["event_ids"]))


class StateStore(Protocol):
    """Where the buckets live. `partition` is the source partition of the
    record that changed the key: the worker writes the changelog there so the
    state stays co-partitioned with the records that feed it."""

    def get(self, key: str) -> dict[str, Any] | None: ...

    def put(self, key: str, value: dict[str, Any], partition: int) -> None: ...


class DictStore:
    """A StateStore in a plain dict: the broker-free stand-in for the Faust
    table, used by the batch path and by tests (Bytewax-style test helper)."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, Any]] = {}
        self.partitions: dict[str, int] = {}

    def get(self, key: str) -> dict[str, Any] | None:
        return self.data.get(key)

    def put(self, key: str, value: dict[str, Any], partition: int) -> None:
        self.data[key] = value
        self.partitions[key] = partition


def dealer_bucket_key(dealer_id: str, department: str, day: date) -> str:
    return scope_bucket_key("dealer", dealer_id, department, day)


def scope_bucket_key(scope: str, key: str, department: str, day: date) -> str:
    return f"{scope}|{key}|{department}|{day.isoformat()}"


def latest_key(scope: str, key: str) -> str:
    return f"latest|{scope}|{key}"


def event_day(event: AnyEvent) -> date:
    """The UTC date that places an event in its daily bucket."""
    return event.occurred_at.astimezone(UTC).date()


def too_late(day: date, latest: date | None, lateness_days: int) -> bool:
    """An event more than `lateness_days` before its dealer's newest one is
    too late to change figures that managers have already acted on."""
    return latest is not None and (latest - day).days > lateness_days


def event_row(event: AnyEvent, record: RawRecord, ingested_at: datetime) -> tuple[Any, ...]:
    """In `warehouse.EVENTS_COLUMNS` order."""
    return (
        event.event_id,
        event.event_type,
        event.schema_version,
        event.dealer_id,
        event.department,
        event.occurred_at.astimezone(UTC),
        event.customer_ref,
        event.source,
        event_to_json(event).decode("utf-8"),
        record.topic,
        record.partition,
        record.offset,
        ingested_at,
    )


def _utcnow() -> datetime:
    return datetime.now(UTC)


ROLLUP_SCOPES = ("region", "brand", "network")
REGION_ACTIVE_DAYS = 7
"""A dealer silent for longer (event time) no longer holds its region's days open."""
REGION_PATIENCE_S = 300.0
"""The worker's wait, in processing time, for a region's dealer whose partition
lags: a registered dealer not heard from yet, or one silent for REGION_ACTIVE_DAYS
in event time, still holds the region's days for this long after it was last
heard from (or the region first seen). Without it a backlog read one partition
ahead of another would close a region's days with half its dealers."""
DEFAULT_LATENESS_DAYS = 35
BACKLOG_REEMIT_DAYS = DEFAULT_LATENESS_DAYS + 90
"""How far back a complaint backlog change re-emits the windows it carries into."""


def window_bucket(
    store: StateStore,
    index_key: str,
    window: str,
    end: date,
    bucket: Callable[[date], Bucket],
) -> Bucket:
    """The merged buckets of a window, plus the complaint backlog carried in
    from before it (the backlog is cumulative, not a sum over the window)."""
    days = window_days(window, end)
    total = merged(bucket(d) for d in days)
    carried = carried_backlog(store, index_key, days[0], bucket)
    if carried is not None:
        total.add("backlog_carried", carried)
    return total


class WindowReader:
    """Reads daily buckets from a store (once per batch) and builds snapshots."""

    def __init__(self, store: StateStore, catalogue: Catalogue) -> None:
        self.store = store
        self.catalogue = catalogue
        self.cache: dict[str, Bucket] = {}

    def bucket(self, key: str) -> Bucket:
        if key not in self.cache:
            stored = self.store.get(key)
            self.cache[key] = Bucket.from_dict(stored["stats"]) if stored else Bucket()
        return self.cache[key]

    def snapshots(
        self,
        labels: tuple[str, str, str, str],  # scope, key, region, brand
        department: str,
        changed_days: set[date],
        latest: date,
        bucket_key: Callable[[date], str],
        now: datetime,
        version: int,
        backlog_days: Iterable[date] = (),
    ) -> list[Snapshot]:
        """Every window of every kind that contains a changed day, and every
        window ending on or after a day whose complaint backlog changed (the
        backlog is cumulative: it carries into all later windows)."""
        out: list[Snapshot] = []
        index_key = backlog_index_key(labels[0], labels[1], department)
        # A backlog change carries into every later window, but only the windows
        # ending in the last BACKLOG_REEMIT_DAYS are re-emitted: a dealer's first
        # complaint is never "too late", and one dated years back would re-emit
        # every window since (from 1970: 400 000 snapshots, half a minute).
        horizon = latest - timedelta(days=BACKLOG_REEMIT_DAYS)
        carried_into = [
            first + timedelta(days=i)
            for first in ([max(min(backlog_days), horizon)] if backlog_days else [])
            for i in range((latest - first).days + 1)
        ]
        windows_by_end: dict[date, set[str]] = {}
        for window in WINDOWS:
            ends = {e for d in changed_days for e in affected_window_ends(window, d, latest)}
            ends.update(carried_into)
            for end in ends:
                windows_by_end.setdefault(end, set()).add(window)

        def day_bucket(d: date) -> Bucket:
            return self.bucket(bucket_key(d))

        for end in sorted(windows_by_end):
            wanted = [w for w in WINDOWS if w in windows_by_end[end]]
            for window, total in nested_window_buckets(wanted, end, day_bucket).items():
                start = window_start(window, end)
                carried = carried_backlog(self.store, index_key, start, day_bucket)
                if carried is not None:
                    total.add("backlog_carried", carried)
                out.append(
                    Snapshot(
                        *labels, department, window, start, end,
                        figures(total, self.catalogue), now, version,
                    )
                )  # fmt: skip
        return out


def nested_window_buckets(
    windows: Sequence[str], end: date, bucket: Callable[[date], Bucket]
) -> dict[str, Bucket]:
    """The merged days of several windows ending on the same day, in one
    backward pass: day ⊂ 7d ⊂ 30d ⊂ 90d and the month to date are nested, so
    the 90 days are merged once instead of once per window."""
    lengths = {w: (end - window_start(w, end)).days + 1 for w in windows}
    running, totals = Bucket(), {}
    for i in range(max(lengths.values(), default=0)):
        running.merge(bucket(end - timedelta(days=i)))
        for window, length in lengths.items():
            if length == i + 1:
                totals[window] = Bucket(dict(running.stats))
    return totals


PendingKey = tuple[tuple[str, str, str, str], str]  # (scope, key, region, brand), department


class PendingSnapshots:
    """Windows to re-emit, coalesced across batches.

    Recomputing a unit's windows after every batch costs more than the batch
    itself once a batch touches a thousand dealers; instead the changed days
    are noted here and the snapshots built at most every `interval_s` seconds
    (and never more than a quarter of the time: the interval stretches to
    three times the last flush's cost). `interval_s = 0` flushes every batch.
    Snapshots are derived from the buckets, which are stored with every
    batch, so coalescing changes when a figure shows, never what it is."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.units: dict[PendingKey, tuple[set[date], set[date]]] = {}
        self.last_flush = clock()
        self.last_cost = 0.0

    def note(self, key: PendingKey, days: Iterable[date], backlog_days: Iterable[date]) -> None:
        changed, backlog = self.units.setdefault(key, (set(), set()))
        changed.update(days)
        backlog.update(backlog_days)

    def due(self) -> bool:
        if not self.units:
            return False
        if self.interval_s == 0:
            return True
        wait = max(self.interval_s, 3.0 * self.last_cost)
        return self.clock() - self.last_flush >= wait

    def take(self) -> dict[PendingKey, tuple[set[date], set[date]]]:
        units, self.units = self.units, {}
        return units

    def flushed(self, started: float) -> None:
        self.last_flush = self.clock()
        self.last_cost = self.last_flush - started


class _Processor:
    """What both processors hold: the state, the questionnaire, the snapshots
    waiting to be emitted, the alert settings and the clock."""

    def __init__(
        self,
        store: StateStore,
        catalogue: Catalogue,
        *,
        emit_snapshots: bool = True,
        snapshot_interval_s: float = 0.0,
        alert_settings: AlertSettings | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.store = store
        self.catalogue = catalogue
        self.emit_snapshots = emit_snapshots
        self.pending = PendingSnapshots(snapshot_interval_s)
        self.alert_settings = alert_settings or AlertSettings()
        self.clock = clock

    def flush_snapshots(
        self,
        now: datetime | None = None,
        version: int | None = None,
        reader: WindowReader | None = None,
    ) -> list[Snapshot]:
        """The snapshots of every window changed since the last flush. A dealer's
        keys are scope keys with scope "dealer", so one loop serves both processors."""
        started = self.pending.clock()
        now = now or self.clock()
        version = version or time.time_ns()
        reader = reader or WindowReader(self.store, self.catalogue)
        out: list[Snapshot] = []
        for (labels, department), (days, backlog_days) in self.pending.take().items():
            scope, key = labels[0], labels[1]
            stored = self.store.get(latest_key(scope, key))
            if stored is None:
                continue
            out += reader.snapshots(
                labels, department, days, date.fromisoformat(stored["day"]),
                partial(scope_bucket_key, scope, key, department),
                now, version, backlog_days,
            )  # fmt: skip
        self.pending.flushed(started)
        return out


class DealerProcessor(_Processor):
    def __init__(
        self,
        store: StateStore,
        catalogue: Catalogue,
        *,
        registry: DealerRegistry | None = None,
        lateness_days: int = DEFAULT_LATENESS_DAYS,
        emit_snapshots: bool = True,
        snapshot_interval_s: float = 0.0,
        alert_settings: AlertSettings | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        super().__init__(
            store, catalogue, emit_snapshots=emit_snapshots,
            snapshot_interval_s=snapshot_interval_s, alert_settings=alert_settings, clock=clock,
        )  # fmt: skip
        self.registry = registry
        self.lateness_days = lateness_days

    def validate(self, record: RawRecord) -> AnyEvent:
        """The event in `record`, or InvalidEvent saying why it cannot be used."""
        event = parse_event(record.value, now=self.clock())
        expected_type = TOPIC_EVENT_TYPE.get(record.topic)
        if expected_type is not None and event.event_type != expected_type:
            raise InvalidEvent(
                f"event_type: {event.event_type!r} arrived on topic {record.topic!r}, "
                f"which carries {expected_type!r} events"
            )
        key = record.key.decode("utf-8", errors="replace") if record.key is not None else None
        if key != event.dealer_id:
            # The key decides the partition; a dealer's events and buckets must
            # share one, or its figures would be split across workers.
            raise InvalidEvent(
                f"key: message key {_shown_key(key)} must equal dealer_id {event.dealer_id!r}"
            )
        if self.registry is not None and event.dealer_id not in self.registry:
            raise InvalidEvent(f"dealer_id: {event.dealer_id!r} is not in the dealer registry")
        return event

    def validate_case_action(self, record: RawRecord) -> CaseAction:
        action = parse_case_action(record.value)
        key = record.key.decode("utf-8", errors="replace") if record.key is not None else None
        if key != action.dealer_id:
            raise InvalidEvent(
                f"key: message key {_shown_key(key)} must equal dealer_id {action.dealer_id!r}"
            )
        return action

    def labels(self, dealer_id: str) -> tuple[str, str]:
        """(region, brand) of a dealer; unknown without a registry."""
        if self.registry is None:
            return UNKNOWN, UNKNOWN
        return self.registry.region_of(dealer_id), self.registry.brand_of(dealer_id)

    def process(self, records: Sequence[RawRecord]) -> BatchOutput:
        now = self.clock()
        out = BatchOutput()
        stored: dict[str, StoredBucket] = {}
        latest: dict[str, date | None] = {}  # newest day per dealer, and per dealer and type
        changed: dict[tuple[str, str], set[date]] = {}
        partition_of: dict[str, int] = {}
        engine = AlertEngine(self.store, self.catalogue, self.alert_settings, self.labels)
        for record in records:
            if record.topic == CASE_ACTIONS.name:
                try:
                    action = self.validate_case_action(record)
                    out.add_records(engine.on_case_action(action, record.partition))
                except InvalidEvent as exc:
                    out.dead_letters.append(self._dead_letter(record, exc.reason, now))
                continue
            try:
                event = self.validate(record)
            except InvalidEvent as exc:
                out.dead_letters.append(self._dead_letter(record, exc.reason, now))
                continue
            dealer_id, day, event_id = event.dealer_id, event_day(event), str(event.event_id)
            key = dealer_bucket_key(dealer_id, event.department, day)
            if key not in stored:
                stored[key] = StoredBucket.from_dict(self.store.get(key))
            if event_id in stored[key].event_ids:
                # A replay of a counted event: it counts once, but its row and
                # its day's windows go out again. The worker that counted it may
                # have been killed after its state reached the changelog and
                # before its rows reached the warehouse; the tables' replacing
                # keys (event_id; the snapshot key) collapse the copies.
                out.duplicates += 1
                out.event_rows.append(event_row(event, record, now))
                changed.setdefault((dealer_id, event.department), set()).add(day)
                partition_of[dealer_id] = record.partition
                continue
            # Lateness is measured within one event type: Kafka orders a
            # dealer's records per topic only, and one topic may run weeks
            # ahead of another while a worker catches up.
            type_key = latest_key(f"dealer.{event.event_type}", dealer_id)
            for latest_of in (type_key, latest_key("dealer", dealer_id)):
                if latest_of not in latest:
                    latest[latest_of] = self._stored_day(latest_of)
            if too_late(day, latest[type_key], self.lateness_days):
                reason = (
                    f"occurred_at: too late: {day} is more than {self.lateness_days} days "
                    f"before dealer {dealer_id}'s newest {event.event_type} ({latest[type_key]})"
                )
                out.dead_letters.append(self._dead_letter(record, reason, now))
                continue
            out.event_rows.append(event_row(event, record, now))
            stored[key].event_ids.add(event_id)
            stored[key].bucket.add_event(event, self.catalogue)
            changed.setdefault((dealer_id, event.department), set()).add(day)
            partition_of[dealer_id] = record.partition

            def day_bucket(department: str, on: date, dealer: str = dealer_id) -> Bucket:
                """Another day's bucket of this dealer, which a joined fact changes."""
                other = dealer_bucket_key(dealer, department, on)
                if other not in stored:
                    stored[other] = StoredBucket.from_dict(self.store.get(other))
                changed.setdefault((dealer, department), set()).add(on)
                return stored[other].bucket

            join_event(event, self.store, record.partition, day_bucket, self.alert_settings)
            out.add_records(engine.on_event(event, record.partition))
            for latest_of in (type_key, latest_key("dealer", dealer_id)):
                newest = latest[latest_of]
                latest[latest_of] = day if newest is None else max(newest, day)

        engine.flush()
        version = time.time_ns()
        reader = WindowReader(self.store, self.catalogue)
        index_cache: dict[str, list[str]] = {}
        for (dealer_id, department), days in changed.items():
            partition = partition_of[dealer_id]
            region, brand = self.labels(dealer_id)
            for day in sorted(days):  # one write per changed bucket; roll-ups in day order
                key = dealer_bucket_key(dealer_id, department, day)
                self.store.put(key, stored[key].to_dict(), partition)
                reader.cache[key] = stored[key].bucket
                if "backlog_delta" in stored[key].bucket.stats:
                    note_backlog_day(
                        self.store, backlog_index_key("dealer", dealer_id, department), day,
                        partition, index_cache,
                    )  # fmt: skip
                for scope, scope_key in zip(ROLLUP_SCOPES, (region, brand, "network"), strict=True):
                    out.rollups.append(
                        RollupUpdate(
                            scope, scope_key, dealer_id, department, day,
                            dict(stored[key].bucket.stats),
                        )
                    )  # fmt: skip
            if self.emit_snapshots:
                unit_key = partial(dealer_bucket_key, dealer_id, department)
                backlog_days = [
                    d for d in days if "backlog_delta" in stored[unit_key(d)].bucket.stats
                ]
                self.pending.note(
                    (("dealer", dealer_id, region, brand), department), days, backlog_days
                )
        for key, newest_day in latest.items():
            dealer_id = key.rsplit("|", 1)[1]
            if newest_day is not None and dealer_id in partition_of:
                self.store.put(key, {"day": newest_day.isoformat()}, partition_of[dealer_id])
        if self.pending.due():
            out.snapshots = self.flush_snapshots(now, version, reader)
        return out

    def _stored_day(self, key: str) -> date | None:
        stored = self.store.get(key)
        return date.fromisoformat(stored["day"]) if stored else None

    def _dead_letter(self, record: RawRecord, reason: str, now: datetime) -> DeadLetter:
        key = record.key.decode("utf-8", errors="replace") if record.key is not None else ""
        return DeadLetter(
            record.topic, record.partition, record.offset, key, reason, record.value, now
        )


def _add_pending(store: StateStore, key: str, at: datetime, partition: int) -> None:
    """Note the time of an event whose partner (a visit) has not arrived yet."""
    pending = store.get(key) or {"at": []}
    store.put(key, {"at": [*pending["at"], at.isoformat()]}, partition)


def _within(later: datetime, earlier: datetime, days: int) -> bool:
    return timedelta(0) <= later - earlier <= timedelta(days=days)


def join_event(
    event: AnyEvent,
    store: StateStore,
    partition: int,
    day_bucket: Callable[[str, date], Bucket],
    settings: AlertSettings | None = None,
) -> None:
    """Facts that need two events: a visit's follow-up call, its comeback,
    a complaint's response and resolution times, a customer's sales and
    service answers (loyalty matrix).

    Keyed by visit_id / complaint_id / customer_ref within the dealer (one
    partition). Calls
    and visits are on different topics, so either may come first: the one
    that finds no partner leaves a pending note the other one picks up, and
    the final figures do not depend on the order.
    """
    dealer = event.dealer_id
    if isinstance(event, VisitEvent):
        visit_key = f"visit|{dealer}|{event.visit_id}"
        visit: dict[str, Any] = {
            "day": event_day(event).isoformat(),
            "department": event.department,
            "delivered_at": event.delivered_at.isoformat() if event.delivered_at else None,
            "followed_up": False,
            "came_back": False,
        }
        if event.delivered_at is not None:
            delivered = event.delivered_at
            calls = store.get(f"pending_calls|{dealer}|{event.visit_id}") or {"at": []}
            if any(
                _within(datetime.fromisoformat(at), delivered, FOLLOW_UP_DAYS) for at in calls["at"]
            ):
                visit["followed_up"] = True
                day_bucket(event.department, event_day(event)).add_follow_up()
            comebacks = store.get(f"pending_comebacks|{dealer}|{event.visit_id}") or {"at": []}
            if any(
                _within(datetime.fromisoformat(at), delivered, COMEBACK_DAYS)
                for at in comebacks["at"]
            ):
                visit["came_back"] = True
                day_bucket(event.department, event_day(event)).add_comeback_against()
        store.put(visit_key, visit, partition)
        if event.comeback_of is not None:
            _note_comeback(event, store, partition, day_bucket)
    elif isinstance(event, CallEvent) and event.outcome == "reached":
        called = store.get(f"visit|{dealer}|{event.visit_id}")
        if called is None:
            _add_pending(
                store, f"pending_calls|{dealer}|{event.visit_id}", event.occurred_at, partition
            )
        elif (
            not called["followed_up"]
            and called["delivered_at"] is not None
            and _within(
                event.occurred_at, datetime.fromisoformat(called["delivered_at"]), FOLLOW_UP_DAYS
            )
        ):
            day_bucket(called["department"], date.fromisoformat(called["day"])).add_follow_up()
            store.put(
                f"visit|{dealer}|{event.visit_id}",
                {**called, "followed_up": True},
                partition,
            )
    elif isinstance(event, ComplaintEvent):
        _note_complaint(event, store, partition, day_bucket, settings or AlertSettings())
    elif isinstance(event, SurveyEvent):
        _note_loyalty(event, store, partition, day_bucket)


def _note_loyalty(
    survey: SurveyEvent,
    store: StateStore,
    partition: int,
    day_bucket: Callable[[str, date], Bucket],
) -> None:
    """Loyalty matrix (seed 000): the customer's latest sales satisfaction ×
    this service response's satisfaction → is the return intent high? Sales
    and service surveys share a topic, so a dealer's arrive in order."""
    if survey.overall is None:
        return
    key = f"customer|{survey.dealer_id}|{survey.customer_ref}"
    satisfied = "satisfied" if is_satisfied(survey.overall, survey.scale) else "dissatisfied"
    if survey.department == "sales":
        store.put(key, {"sales": satisfied}, partition)
    elif survey.return_intent is not None:
        customer = store.get(key)
        sales = customer["sales"] if customer else "none"
        high = is_top2(survey.return_intent, survey.scale)
        day_bucket(survey.department, event_day(survey)).add_loyalty(sales, satisfied, high)


def _note_comeback(
    event: VisitEvent, store: StateStore, partition: int, day_bucket: Callable[[str, date], Bucket]
) -> None:
    original_key = f"visit|{event.dealer_id}|{event.comeback_of}"
    original = store.get(original_key)
    if original is None:
        pending_key = f"pending_comebacks|{event.dealer_id}|{event.comeback_of}"
        _add_pending(store, pending_key, event.arrived_at, partition)
    elif (
        not original["came_back"]
        and original["delivered_at"] is not None
        and _within(
            event.arrived_at, datetime.fromisoformat(original["delivered_at"]), COMEBACK_DAYS
        )
    ):
        day_bucket(
            original["department"], date.fromisoformat(original["day"])
        ).add_comeback_against()
        store.put(original_key, {**original, "came_back": True}, partition)


def _note_complaint(
    event: ComplaintEvent,
    store: StateStore,
    partition: int,
    day_bucket: Callable[[str, date], Bucket],
    settings: AlertSettings,
) -> None:
    """Complaint events share one topic, so a dealer's arrive in order.

    Besides response and resolution times (on the day the complaint was
    opened), each change of the open backlog is counted on the day it
    happens: +1 opened or reopened, −1 closed (only for a complaint known to
    be open), so the backlog at any date is the sum of all days up to it."""
    key = f"complaint|{event.dealer_id}|{event.complaint_id}"
    complaint = store.get(key)
    today = event_day(event)
    if complaint is None:
        if event.status == "opened":
            store.put(key, {
                "day": today.isoformat(), "department": event.department,
                "opened_at": event.occurred_at.isoformat(), "severity": event.severity,
                "responded": False, "resolved": False, "open": True,
            }, partition)  # fmt: skip
            day_bucket(event.department, today).add("backlog_delta", 1)
        return  # a change of a complaint whose opening is unknown: nothing to measure
    department = complaint["department"]
    opened = datetime.fromisoformat(complaint["opened_at"])
    minutes = max(int((event.occurred_at - opened).total_seconds() // 60), 0)

    def opening_day() -> Bucket:  # durations belong to the day it was opened
        return day_bucket(department, date.fromisoformat(complaint["day"]))

    severity = int(complaint["severity"])
    before = dict(complaint)
    if event.status == "responded" and not complaint["responded"]:
        due = settings.sla_first_response_hours[severity] * 60
        opening_day().add_complaint_duration("first_response", minutes, minutes > due)
        complaint["responded"] = True
    if event.status in ("resolved", "closed") and not complaint["resolved"]:
        # the first resolution counts; a reopened complaint keeps it
        due = settings.sla_resolution_hours[severity] * 60
        opening_day().add_complaint_duration("resolution", minutes, minutes > due)
        complaint["resolved"] = True
    if event.status == "closed" and complaint.get("open", True):
        complaint["open"] = False
        day_bucket(department, today).add("backlog_delta", -1)
    elif event.status == "reopened" and not complaint.get("open", True):
        complaint["open"] = True
        day_bucket(department, today).add("backlog_delta", 1)
    if complaint != before:
        store.put(key, complaint, partition)


def backlog_index_key(scope: str, key: str, department: str) -> str:
    """The days on which a unit's open complaint backlog changed."""
    return f"backlog_days|{scope}|{key}|{department}"


def note_backlog_day(
    store: StateStore, index_key: str, day: date, partition: int, cache: dict[str, list[str]]
) -> None:
    if index_key not in cache:
        stored = store.get(index_key)
        cache[index_key] = list(stored["days"]) if stored else []
    days = cache[index_key]
    if day.isoformat() not in days:
        days.append(day.isoformat())
        days.sort()
        store.put(index_key, {"days": list(days)}, partition)


def carried_backlog(
    store: StateStore,
    index_key: str,
    before: date,
    bucket: Callable[[date], Bucket],
) -> float | None:
    """The open backlog at the start of `before`: all changes on earlier days.
    None when the unit had no complaint change before that day, so a window
    from before a unit's first complaint reads None in any processing order."""
    stored = store.get(index_key)
    earlier = (
        [date.fromisoformat(d) for d in stored["days"] if d < before.isoformat()] if stored else []
    )
    if not earlier:
        return None
    return sum(bucket(d).get("backlog_delta") for d in earlier)


class RollupProcessor(_Processor):
    """Region, brand and network buckets from dealer-day updates."""

    def __init__(
        self,
        store: StateStore,
        catalogue: Catalogue,
        *,
        registry: DealerRegistry | None = None,
        member_patience_s: float = 0.0,
        emit_snapshots: bool = True,
        snapshot_interval_s: float = 0.0,
        alert_settings: AlertSettings | None = None,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        """`member_patience_s`: REGION_PATIENCE_S in the worker; 0 in the batch
        paths, which read every dealer in event-time order."""
        super().__init__(
            store, catalogue, emit_snapshots=emit_snapshots,
            snapshot_interval_s=snapshot_interval_s, alert_settings=alert_settings, clock=clock,
        )  # fmt: skip
        self.member_patience_s = member_patience_s
        self.registered: dict[str, list[str]] = {}  # region → its dealers in the registry
        if registry is not None:
            for dealer_id, dealer in registry.items():
                self.registered.setdefault(dealer.region, []).append(dealer_id)

    def process(self, updates: Sequence[tuple[int, RollupUpdate]]) -> RollupOutput:
        """`updates`: (source partition, update) in arrival order."""
        now = self.clock()
        reader = WindowReader(self.store, self.catalogue)
        index_cache: dict[str, list[str]] = {}
        changed: dict[tuple[str, str, str], set[date]] = {}
        backlog_changed: dict[tuple[str, str, str], set[date]] = {}
        partition_of: dict[tuple[str, str], int] = {}
        totals_written: dict[str, int] = {}
        member_days: dict[tuple[str, str], dict[str, date]] = {}  # region, dept → dealer → day
        for partition, update in updates:
            if update.scope == "region":
                seen = member_days.setdefault((update.key, update.department), {})
                seen[update.dealer_id] = max(seen.get(update.dealer_id, update.day), update.day)
            member_key = (
                scope_bucket_key(update.scope, update.key, update.department, update.day)
                + f"|{update.dealer_id}"
            )
            total_key = scope_bucket_key(update.scope, update.key, update.department, update.day)
            old = self.store.get(member_key)
            new = Bucket(dict(update.stats))
            total = reader.bucket(total_key)
            # absolute values in, differences applied: a replay adds nothing
            total.merge(new.minus(Bucket.from_dict(old["stats"]) if old else Bucket()))
            self.store.put(member_key, {"stats": new.to_dict()}, partition)
            totals_written[total_key] = partition  # once per batch, below
            if "backlog_delta" in new.stats or (old and "backlog_delta" in old["stats"]):
                backlog_changed.setdefault(
                    (update.scope, update.key, update.department), set()
                ).add(update.day)
                note_backlog_day(
                    self.store, backlog_index_key(update.scope, update.key, update.department),
                    update.day, partition, index_cache,
                )  # fmt: skip
            changed.setdefault((update.scope, update.key, update.department), set()).add(update.day)
            partition_of[(update.scope, update.key)] = partition
        for total_key, partition in totals_written.items():
            self.store.put(total_key, {"stats": reader.bucket(total_key).to_dict()}, partition)

        latest: dict[tuple[str, str], date] = {}
        for (scope, key, _), days in changed.items():
            stored = self.store.get(latest_key(scope, key))
            before = date.fromisoformat(stored["day"]) if stored else None
            newest = max(days) if before is None else max(before, max(days))
            latest[(scope, key)] = max(latest.get((scope, key), newest), newest)
        for (scope, key), newest in latest.items():
            self.store.put(
                latest_key(scope, key), {"day": newest.isoformat()}, partition_of[(scope, key)]
            )
        out = RollupOutput(
            alerts=self._region_drops(changed, latest, partition_of, reader, member_days, now)
        )
        if not self.emit_snapshots:
            return out
        for (scope, key, department), days in changed.items():
            labels = (
                scope, key, key if scope == "region" else "", key if scope == "brand" else "",
            )  # fmt: skip
            self.pending.note(
                (labels, department), days, backlog_changed.get((scope, key, department), ())
            )
        if self.pending.due():
            out.snapshots = self.flush_snapshots(now, reader=reader)
        return out

    def _region_drops(
        self,
        changed: dict[tuple[str, str, str], set[date]],
        latest: dict[tuple[str, str], date],
        partition_of: dict[tuple[str, str], int],
        reader: WindowReader,
        member_days: dict[tuple[str, str], dict[str, date]],
        now: datetime,
    ) -> list[Alert]:
        """Feed each region's closed days to its drop charts, once, in day order.

        A day is closed once every dealer of the region (in the registry, or
        heard from) has reported `region_close_after_days` past it, except a
        dealer that is silent: in event time for REGION_ACTIVE_DAYS and in
        processing time for `member_patience_s` (see REGION_PATIENCE_S). So a
        partition that lags behind the others holds the day open instead of
        letting it close half-filled, and the stream feeds the charts the same
        days as a replay in event-time order. What arrives for a closed day
        still counts in the figures but no longer in the detector (docs/alerts.md)."""
        alerts: list[Alert] = []
        grace = self.alert_settings.region_close_after_days
        heard_at = now.timestamp()
        for (scope, key, department), days in sorted(changed.items()):
            if scope != "region":
                continue
            watch = DropWatch(scope, key, key, "", department, self.alert_settings)
            watch.load(self.store.get(watch.state_key))
            if watch.first_heard_at is None:
                watch.first_heard_at = heard_at
            for dealer, day in member_days.get((key, department), {}).items():
                known = watch.members.get(dealer)
                newest_day = max(known["day"], day.isoformat()) if known else day.isoformat()
                watch.members[dealer] = {"day": newest_day, "heard_at": heard_at}
            horizon = self._region_horizon(watch, key, latest[(scope, key)], heard_at)
            # the day before the first one seen counts as fed, so a first batch
            # that closes nothing does not lose its days to a later batch
            through = (
                date.fromisoformat(watch.closed_through)
                if watch.closed_through
                else min(days) - timedelta(days=1)
            )
            todo = [] if horizon is None else region_watch_days(through, min(days), horizon, grace)
            for day in todo:
                bucket = reader.bucket(scope_bucket_key(scope, key, department, day))
                items = region_day_inputs(bucket)
                if items:
                    end_of_day = datetime.combine(day + timedelta(days=1), datetime.min.time(), UTC)
                    alerts += watch.feed(items, end_of_day)
            watch.closed_through = (todo[-1] if todo else through).isoformat()
            self.store.put(watch.state_key, watch.dump(), partition_of[(scope, key)])
        return alerts

    def _region_horizon(
        self, watch: DropWatch, region: str, newest: date, heard_at: float
    ) -> date | None:
        """The newest day every dealer holding the region has reported; None
        while a registered dealer not heard from yet is still waited for."""
        patient = self.member_patience_s
        holding: list[date] = []
        for dealer in {*self.registered.get(region, ()), *watch.members}:
            member = watch.members.get(dealer)
            if member is None:
                first = watch.first_heard_at if watch.first_heard_at is not None else heard_at
                if heard_at - first < patient:
                    return None
                continue
            day = date.fromisoformat(member["day"])
            if day >= newest - timedelta(days=REGION_ACTIVE_DAYS) or (
                heard_at - member["heard_at"] < patient
            ):
                holding.append(day)
        return min(holding, default=newest)
