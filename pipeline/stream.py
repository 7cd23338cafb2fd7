"""What the stream does with one batch of records — broker-free.

`BatchProcessor.process()` validates raw Kafka records, folds valid events
into daily buckets of sufficient statistics held in a `StateStore` (a Faust
table in the worker, a dict in tests), and returns the rows for the
warehouse, the dead letters and the metric snapshots of every window the
batch touched. The Faust worker (`pipeline.worker`) is a thin adapter that
feeds it `take_events()` batches and ships its output.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Protocol

from pipeline.catalogue import Catalogue
from pipeline.metrics import (
    WINDOWS,
    Bucket,
    affected_window_ends,
    figures,
    merged,
    window_days,
)
from pipeline.topics import EVENT_TOPICS
from pipeline.warehouse import dead_letter_row
from schemas import InvalidEvent, SurveyEvent, VisitEvent, event_to_json, parse_event

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

    def to_message(self) -> dict[str, Any]:
        """The dead-letter topic's JSON value."""
        return {
            "dead_letter_id": self.dead_letter_id,
            "received_at": self.received_at.isoformat(),
            "source_topic": self.source_topic,
            "partition": self.partition,
            "offset": self.offset,
            "key": self.key,
            "reason": self.reason,
            "raw_b64": base64.b64encode(self.raw).decode("ascii"),
        }


@dataclass(frozen=True)
class Snapshot:
    """The figures of one unit and window, as of `window_end`."""

    scope: str
    key: str
    department: str
    window: str
    window_start: date
    window_end: date
    n_responses: int
    n_visits: int
    csi: float | None
    factors: dict[str, float]
    factor_n: dict[str, int]
    nps: float | None
    nps_n: int
    nps_se: float | None
    weights_version: str
    computed_at: datetime
    version: int

    def to_row(self) -> tuple[Any, ...]:
        """In `warehouse.METRIC_SNAPSHOTS_COLUMNS` order."""
        return tuple(asdict(self).values())

    def to_message(self) -> dict[str, Any]:
        """The metrics topic's JSON value."""
        message = asdict(self)
        for name in ("window_start", "window_end", "computed_at"):
            message[name] = message[name].isoformat()
        return message


@dataclass
class BatchOutput:
    event_rows: list[tuple[Any, ...]] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)
    duplicates: int = 0


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
    state stays co-partitioned with the dealer's events."""

    def get(self, key: str) -> dict[str, Any] | None: ...

    def put(self, key: str, value: dict[str, Any], partition: int) -> None: ...


def bucket_key(dealer_id: str, department: str, day: date) -> str:
    return f"{dealer_id}|{department}|{day.isoformat()}"


def latest_key(dealer_id: str, department: str) -> str:
    return f"{dealer_id}|{department}|latest"


def event_day(event: VisitEvent | SurveyEvent) -> date:
    """The UTC date that places an event in its daily bucket."""
    return event.occurred_at.astimezone(UTC).date()


def add_to_bucket(bucket: Bucket, event: VisitEvent | SurveyEvent, catalogue: Catalogue) -> None:
    if isinstance(event, SurveyEvent):
        bucket.add_survey(event, catalogue)
    else:
        bucket.add_visit()


def event_row(
    event: VisitEvent | SurveyEvent, record: RawRecord, ingested_at: datetime
) -> tuple[Any, ...]:
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


Unit = tuple[str, str]  # (dealer_id, department)


class BatchProcessor:
    def __init__(
        self,
        store: StateStore,
        catalogue: Catalogue,
        *,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.store = store
        self.catalogue = catalogue
        self.clock = clock

    def validate(self, record: RawRecord) -> VisitEvent | SurveyEvent:
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
            raise InvalidEvent(f"key: message key {key!r} must equal dealer_id {event.dealer_id!r}")
        return event

    def process(self, records: Sequence[RawRecord]) -> BatchOutput:
        now = self.clock()
        out = BatchOutput()
        cache: dict[str, StoredBucket] = {}
        changed: dict[Unit, set[date]] = {}
        unit_partition: dict[Unit, int] = {}
        for record in records:
            try:
                event = self.validate(record)
            except InvalidEvent as exc:
                out.dead_letters.append(self._dead_letter(record, exc.reason, now))
                continue
            out.event_rows.append(event_row(event, record, now))
            unit: Unit = (event.dealer_id, event.department)
            day = event_day(event)
            stored = self._stored(bucket_key(*unit, day), cache)
            event_id = str(event.event_id)
            if event_id in stored.event_ids:
                out.duplicates += 1  # a replay: the warehouse dedups it too (FINAL)
                continue
            stored.event_ids.add(event_id)
            add_to_bucket(stored.bucket, event, self.catalogue)
            changed.setdefault(unit, set()).add(day)
            unit_partition[unit] = record.partition
        for unit, days in changed.items():  # one state write per changed bucket
            for day in days:
                key = bucket_key(*unit, day)
                self.store.put(key, cache[key].to_dict(), unit_partition[unit])
        out.snapshots = self._snapshots(changed, unit_partition, cache, now)
        return out

    def _dead_letter(self, record: RawRecord, reason: str, now: datetime) -> DeadLetter:
        key = record.key.decode("utf-8", errors="replace") if record.key is not None else ""
        return DeadLetter(
            record.topic, record.partition, record.offset, key, reason, record.value, now
        )

    def _snapshots(
        self,
        changed: dict[Unit, set[date]],
        unit_partition: dict[Unit, int],
        cache: dict[str, StoredBucket],
        now: datetime,
    ) -> list[Snapshot]:
        """The snapshots of every window that contains a changed day."""
        snapshots: list[Snapshot] = []
        version = time.time_ns()
        for (dealer_id, department), days in changed.items():
            latest = self._latest_day(dealer_id, department, max(days), unit_partition)
            for window, length in WINDOWS.items():
                ends = sorted({e for d in days for e in affected_window_ends(d, length, latest)})
                for window_end in ends:
                    in_window = window_days(window_end, length)
                    total = merged(
                        self._stored(bucket_key(dealer_id, department, d), cache).bucket
                        for d in in_window
                    )
                    snapshots.append(
                        snapshot(
                            "dealer", dealer_id, department, window, in_window[0], window_end,
                            total, self.catalogue, now, version,
                        )
                    )  # fmt: skip
        return snapshots

    def _stored(self, key: str, cache: dict[str, StoredBucket]) -> StoredBucket:
        if key not in cache:
            cache[key] = StoredBucket.from_dict(self.store.get(key))
        return cache[key]

    def _latest_day(
        self, dealer_id: str, department: str, candidate: date, unit_partition: dict[Unit, int]
    ) -> date:
        """The unit's newest event date, remembered so a late event re-emits
        the windows up to it and no further."""
        key = latest_key(dealer_id, department)
        stored = self.store.get(key)
        latest = date.fromisoformat(stored["day"]) if stored else candidate
        if candidate > latest or not stored:
            latest = max(latest, candidate)
            self.store.put(
                key, {"day": latest.isoformat()}, unit_partition[(dealer_id, department)]
            )
        return latest


def snapshot(
    scope: str,
    key: str,
    department: str,
    window: str,
    window_start: date,
    window_end: date,
    bucket: Bucket,
    catalogue: Catalogue,
    computed_at: datetime,
    version: int,
) -> Snapshot:
    return Snapshot(
        scope=scope,
        key=key,
        department=department,
        window=window,
        window_start=window_start,
        window_end=window_end,
        computed_at=computed_at,
        version=version,
        **asdict(figures(bucket, catalogue)),
    )


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


def unit_windows(
    events: Iterable[VisitEvent | SurveyEvent], catalogue: Catalogue
) -> dict[Unit, dict[date, Bucket]]:
    """Batch path: daily buckets per unit, straight from a list of events."""
    units: dict[Unit, dict[date, Bucket]] = {}
    seen: set[str] = set()
    for event in events:
        if str(event.event_id) in seen:  # the same id twice is one event
            continue
        seen.add(str(event.event_id))
        days = units.setdefault((event.dealer_id, event.department), {})
        add_to_bucket(days.setdefault(event_day(event), Bucket()), event, catalogue)
    return units
