"""The Faust worker: a thin adapter around `pipeline.stream.DealerProcessor`.

One agent (`ingest`) consumes every event topic and the case actions in
batches (`take_events`), hands the raw records to the processor, and ships
its output: events, snapshots, dead letters, alerts and cases to the
warehouse sinks, snapshots to the metrics topic, dead letters to the
dead-letter topic, alerts and case changes to the alerts topic. Buckets and
alert state live in a Faust table whose changelog is written to the
partition the dealer's events come from. `rollup` folds dealer-day updates
into regions, brands and the network (and runs the region drop charts);
`notify` (with CSI_WEBHOOK_URL) posts the alerts topic to the webhook.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, cast

import faust
import orjson
from faust.types.tuples import ack_lock

from pipeline.alerts import Alert, Case, load_alert_settings
from pipeline.broker import hold_empty_fetches
from pipeline.catalogue import Catalogue, load_catalogue
from pipeline.config import Settings
from pipeline.registry import load_registry
from pipeline.stream import (
    REGION_PATIENCE_S,
    BatchOutput,
    DealerProcessor,
    RawRecord,
    RollupProcessor,
    RollupUpdate,
    Snapshot,
)
from pipeline.topics import (
    ALERTS,
    CASE_ACTIONS,
    DEAD_LETTERS,
    EVENT_PARTITIONS,
    EVENT_TOPICS,
    METRICS,
    ROLLUPS,
)
from pipeline.warehouse import SinkSet, alert_row, case_row, create_schema, open_warehouse
from pipeline.webhook import WebhookError, WebhookNotifier, WebhookSettings

log = logging.getLogger("csi.worker")

HEALTH_INTERVAL_S = 10.0
"""How often the worker writes its own measurements to csi.pipeline_health."""


class PartitionedTable(faust.Table[str, dict[str, Any]]):
    """A table whose changelog partition is set by the writer.

    Faust picks the changelog partition from `current_event()`, which inside a
    `take_events()` batch is the batch's last event — possibly from another
    partition than the dealer being written. Writing the wrong changelog
    partition would hand the dealer's state to the wrong worker on recovery.
    """

    write_partition: int | None = None

    def partition_for_key(self, key: Any) -> int | None:
        if self.write_partition is None:
            return super().partition_for_key(key)
        return self.write_partition


class TableStore:
    """`StateStore` over a PartitionedTable."""

    def __init__(self, table: PartitionedTable) -> None:
        self.table = table

    def get(self, key: str) -> dict[str, Any] | None:
        value = self.table.get(key)
        return value if value is None else dict(value)

    def put(self, key: str, value: dict[str, Any], partition: int) -> None:
        self.table.write_partition = partition
        try:
            self.table[key] = value
        finally:
            self.table.write_partition = None


def next_commit(committed: int | None, acked: Iterable[int], processed: set[int]) -> int | None:
    """The offset to commit for a partition, or None to leave it.

    From the committed offset, step over every offset that Faust acked or
    this worker processed, and stop at the first that is neither: a record
    that never reached the agent holds the commit until it is re-read.
    """
    done = processed.union(acked)
    if not done:
        return None
    offset = committed if committed is not None else min(done)
    while offset in done:
        offset += 1
    return offset if committed is None or offset > committed else None


class OffsetGuard:
    """The worker's own at-least-once bookkeeping on top of Faust's consumer.

    faust-streaming 0.15 loses acks in rebalance/recovery races (upstream
    #596), after which a partition never commits again, and can skip
    records, after which its commit steps over the gap (#606). So the guard
    decides what to commit (`next_commit`, installed as the consumer's
    `_new_offset`) from the offsets the agents really processed, and when a
    batch jumps past the next expected offset of a partition it holds back
    that partition's records and seeks back to the gap: the gap's records are
    processed first, then the rest again, in offset order. Order matters: a
    dealer's drop charts read its responses in sequence, so a gap processed
    after what follows it would change their statistics. Input topics carry
    no transaction markers, so a gap is never legitimate.
    """

    RESEEK_AFTER_S = 5.0
    """A seek whose records have not come back by then is repeated ..."""
    MAX_SEEKS = 5
    """... this many times; then the held records are processed out of order
    (logged), and the gap still holds the commit back until it is read."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.processed: dict[Any, set[int]] = {}
        self.expected: dict[Any, int] = {}
        self.gaps: dict[Any, tuple[int, int, float]] = {}  # tp → (offset, seeks, last seek)
        self.skips_found = 0
        self.clock = clock

    def admit(
        self, events: Sequence[Any], committed: Callable[[Any], int | None]
    ) -> tuple[list[Any], list[tuple[Any, int]]]:
        """Split a batch into the events to process now and the seeks to make."""
        admitted: list[Any] = []
        seeks: list[tuple[Any, int]] = []
        now = self.clock()
        for event in events:
            tp, offset = event.message.tp, event.message.offset
            expected = self.expected.get(tp)
            if expected is None:
                expected = committed(tp)
            if expected is None or offset <= expected:
                # the next record, or one already processed (event-id dedup drops it)
                admitted.append(event)
                if expected is None or offset == expected:
                    self.expected[tp] = offset + 1
                    self.gaps.pop(tp, None)
                continue
            gap = self.gaps.get(tp)
            if gap is None or gap[0] != expected:
                self.skips_found += offset - expected
                self.gaps[tp] = (expected, 1, now)
                seeks.append((tp, expected))
                log.error(
                    "offsets %d..%d of %s skipped by the consumer: holding back what follows "
                    "and re-reading them", expected, offset - 1, tp,
                )  # fmt: skip
            elif gap[1] >= self.MAX_SEEKS:
                log.error(
                    "offsets %d..%d of %s still missing after %d re-reads: processing %d out "
                    "of order; the commit stays at %d until they are read",
                    expected, offset - 1, tp, gap[1], offset, expected,
                )  # fmt: skip
                admitted.append(event)
                self.expected[tp] = offset + 1
                self.gaps.pop(tp, None)
            elif now - gap[2] >= self.RESEEK_AFTER_S:
                self.gaps[tp] = (expected, gap[1] + 1, now)
                seeks.append((tp, expected))
        return admitted, seeks

    def record(self, events: Sequence[Any]) -> None:
        """Note the offsets of a processed batch (what `admit` let through)."""
        for event in events:
            self.processed.setdefault(event.message.tp, set()).add(event.message.offset)

    def forget_assignment(self) -> None:
        """After a rebalance Faust restarts from the committed offsets."""
        self.expected.clear()
        self.gaps.clear()

    def install(self, consumer: Any) -> None:
        """Make the consumer ask the guard which offset to commit."""

        def new_offset(tp: Any) -> int | None:
            with ack_lock:
                acked = consumer._acked[tp]
                processed = self.processed.setdefault(tp, set())
                offset = next_commit(consumer._committed_offset.get(tp), acked, processed)
                if offset is not None:  # forget what the commit covers
                    acked[:] = [o for o in acked if o >= offset]
                    consumer._acked_index[tp] = {
                        o for o in consumer._acked_index[tp] if o >= offset
                    }
                    processed.difference_update([o for o in processed if o < offset])
                return offset

        consumer._new_offset = new_offset

    def touch(self, consumer: Any) -> None:
        """Faust commits only partitions it has acks for: list ours too."""
        for tp in self.processed:
            consumer._acked[tp]  # a defaultdict: creates the entry


SINK_PENDING_BOUND = 50_000
"""Rows the sinks may hold while the warehouse is failing; past it the agents
stop taking batches (consumption pauses, Kafka keeps the rest) until a flush
succeeds: memory stays bounded and nothing is dropped."""


async def flush_or_pause(
    sinks: SinkSet, *, bound: int = SINK_PENDING_BOUND, max_pause_s: float = 30.0
) -> None:
    """Flush the sinks that are due. A failing warehouse is logged and retried
    at the next batch while the buffered rows stay under `bound`; beyond it,
    wait (1, 2, 4 … `max_pause_s` s) and retry until the warehouse takes them."""
    pause = 1.0
    while True:
        try:
            sinks.flush_due()
            return
        except Exception as exc:
            if sinks.pending < bound:
                log.warning("warehouse write failed, %d rows kept: %s", sinks.pending, exc)
                return
            log.error(
                "warehouse write failed with %d rows waiting: consumption paused, retrying "
                "in %.1f s: %s", sinks.pending, pause, exc,
            )  # fmt: skip
            await asyncio.sleep(pause)
            pause = min(pause * 2, max_pause_s)


def commit_after(consumer: Any, before_commit: Callable[[], Awaitable[bool]]) -> None:
    """Make the consumer run `before_commit` before every offset commit and
    skip the commit when it returns False.

    Faust flushes its producer (changelogs, output topics) before committing,
    but knows nothing of our sinks: without this, offsets could be committed
    while the rows of those events still sat in a sink's buffer, and a worker
    killed then would lose them (issue 7). `_commit` is the non-transactional
    commit call of faust-streaming 0.15's consumer (faust internals)."""
    commit = consumer._commit

    async def flushed_commit(offsets: Any) -> bool:
        if not await before_commit():
            return False
        return bool(await commit(offsets))

    consumer._commit = flushed_commit


class TableDeliveredLog:
    """Webhook deliveries done, in a Faust table: after a restart the notify
    agent re-reads uncommitted alerts and skips those already delivered."""

    def __init__(self, table: PartitionedTable, partition: int) -> None:
        self.table, self.partition = table, partition

    def __contains__(self, delivery_id: str) -> bool:
        return self.table.get(delivery_id) is not None

    def add(self, delivery_id: str) -> None:
        TableStore(self.table).put(delivery_id, {"done": True}, self.partition)


async def deliver_until_done(
    notifier: WebhookNotifier, delivery_id: str, message: dict[str, Any]
) -> None:
    """Deliver one record, waiting out a webhook that is down or misconfigured:
    the notify agent stops (its offsets stay put) rather than drop an alert."""
    pause = 5.0
    while True:
        try:
            await notifier.deliver(delivery_id, message)
            return
        except WebhookError as exc:
            log.error("webhook delivery %s failed, retrying in %.0f s: %s", delivery_id, pause, exc)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 300.0)


def faust_broker_urls(bootstrap: str) -> list[str]:
    return [f"kafka://{host_port.strip()}" for host_port in bootstrap.split(",") if host_port]


def make_app(settings: Settings, catalogue: Catalogue, sinks: SinkSet) -> faust.App:
    app = faust.App(
        settings.app_id,
        broker=faust_broker_urls(settings.bootstrap),
        store="memory://",
        datadir=str(settings.data_dir / "faust"),
        topic_partitions=EVENT_PARTITIONS,
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=max(settings.session_timeout_s / 3, 1.0),
        # SASL and/or TLS from CSI_KAFKA_* (None: PLAINTEXT); Faust passes them to every
        # aiokafka client it makes (consumer, producer, topic admin).
        broker_credentials=settings.kafka.faust_credentials(),
        consumer_group_instance_id=settings.instance_id,
    )

    def state_table(name: str, help: str) -> PartitionedTable:
        table = PartitionedTable(
            app, name=name, default=None, partitions=EVENT_PARTITIONS, key_type=str,
            beacon=app.tables.beacon, help=help,
        )  # fmt: skip
        app.tables.add(table)
        return table

    buckets = state_table("buckets", "daily buckets per dealer and department")
    rollup_buckets = state_table("rollups", "daily buckets per region, brand and network")
    # One batch writes one changelog record per changed bucket; Faust's
    # default buffer of 100 would call every batch "producer buffer full".
    app.producer.buffer.max_messages = max(settings.batch_max, 100)
    registry = load_registry(settings.registry) if settings.registry else None
    alert_settings = load_alert_settings(settings.alerts_file)
    processor = DealerProcessor(
        TableStore(buckets), catalogue, registry=registry, lateness_days=settings.lateness_days,
        alert_settings=alert_settings, snapshot_interval_s=settings.snapshot_interval_s,
    )  # fmt: skip
    rollup_processor = RollupProcessor(
        TableStore(rollup_buckets), catalogue, alert_settings=alert_settings,
        snapshot_interval_s=settings.snapshot_interval_s, registry=registry,
        member_patience_s=REGION_PATIENCE_S,
    )  # fmt: skip
    guard = OffsetGuard()
    guard.install(app.consumer)

    def take_pending_snapshots() -> list[Snapshot]:
        """Both processors' changed windows, whatever their interval."""
        return [*processor.flush_snapshots(), *rollup_processor.flush_snapshots()]

    async def before_commit() -> bool:
        """Everything the offsets about to be committed produced is stored
        first: pending snapshots published, every sink flushed, Kafka sends done."""
        try:
            await publish_snapshots(take_pending_snapshots())
            sinks.flush_all()
            await app.producer.flush()
        except Exception as exc:
            log.error("not committing offsets: their outputs are not all stored: %s", exc)
            return False
        return True

    commit_after(app.consumer, before_commit)
    log_level = logging.getLevelName(settings.log_level.upper())
    log_level = log_level if isinstance(log_level, int) else logging.WARNING

    def raw_topic(*names: str) -> faust.TopicT:
        # Bytes in, bytes out: validation happens once, in the processor, and
        # a dead letter must keep the original bytes.
        return app.topic(
            *names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
        )

    event_topics = raw_topic(*(spec.name for spec in EVENT_TOPICS.values()), CASE_ACTIONS.name)
    dead_letter_topic = raw_topic(DEAD_LETTERS.name)
    metrics_topic = raw_topic(METRICS.name)
    rollup_topic = raw_topic(ROLLUPS.name)
    alerts_topic = raw_topic(ALERTS.name)

    async def admit(events: Sequence[Any]) -> list[Any]:
        """The batch's events to process now; seeks back over a skipped gap."""
        committed = cast(Any, app.consumer)._committed_offset.get  # faust internals
        admitted, seeks = guard.admit(events, committed)
        for tp, offset in seeks:
            await app.consumer.seek(tp, offset)
        return admitted

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]  # as on_before_shutdown
    async def reset_guard(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        guard.forget_assignment()

    processed: Counter[str] = Counter()  # event type (or "dead_letter") → since last tick
    worker_name = f"{socket.gethostname()}:{os.getpid()}"
    health_tick = [time.monotonic()]

    async def ship(out: BatchOutput) -> None:
        processed.update(row[1] for row in out.event_rows)
        processed["dead_letter"] += len(out.dead_letters)
        sinks.events.add(out.event_rows)
        sinks.dead_letters.add(dl.to_row() for dl in out.dead_letters)
        for dead_letter in out.dead_letters:
            await dead_letter_topic.send(
                key=dead_letter.message_key, value=orjson.dumps(dead_letter.to_message())
            )
        await publish_snapshots(out.snapshots)
        await publish_alerts(out.alerts, out.cases)
        for update in out.rollups:
            await rollup_topic.send(
                key=update.partition_key.encode("utf-8"), value=orjson.dumps(update.to_message())
            )
        await flush_or_pause(sinks)

    async def publish_snapshots(snapshots: list[Snapshot]) -> None:
        sinks.metric_snapshots.add(s.to_row() for s in snapshots)
        for snapshot in snapshots:
            await metrics_topic.send(
                key=snapshot.key.encode("utf-8"), value=orjson.dumps(snapshot.to_message())
            )

    async def publish_alerts(alerts: Sequence[Alert], cases: Sequence[Case]) -> None:
        sinks.alerts.add(alert_row(a) for a in alerts)
        sinks.cases.add(case_row(c) for c in cases)
        records: list[Alert | Case] = [*alerts, *cases]
        for record in records:
            key = record.key if isinstance(record, Alert) else record.dealer_id
            await alerts_topic.send(
                key=key.encode("utf-8"), value=orjson.dumps(record.to_message())
            )

    @app.agent(event_topics, name="ingest")
    async def ingest(stream: faust.StreamT[bytes]) -> None:
        async for batch in cast(faust.Stream[bytes], stream).take_events(
            settings.batch_max, settings.batch_within_s
        ):
            events = await admit(batch)
            records = [
                RawRecord(
                    e.message.topic, e.message.partition, e.message.offset,
                    e.message.key, e.message.value or b"",  # a null value: a dead letter
                )
                for e in events
            ]  # fmt: skip
            await ship(processor.process(records))
            guard.record(events)

    @app.agent(rollup_topic, name="rollup")
    async def rollup(stream: faust.StreamT[bytes]) -> None:
        async for batch in cast(faust.Stream[bytes], stream).take_events(
            settings.batch_max, settings.batch_within_s
        ):
            events = await admit(batch)
            # our own topic, written only by the ingest agent above
            updates = [
                (e.message.partition, RollupUpdate.from_message(orjson.loads(e.message.value)))
                for e in events
                if e.message.value is not None
            ]
            result = rollup_processor.process(updates)
            await publish_snapshots(result.snapshots)
            await publish_alerts(result.alerts, [])
            await flush_or_pause(sinks)
            guard.record(events)

    if settings.webhook_url:
        delivered = state_table("deliveries", "webhook deliveries done, by delivery_id")
        headers = {"Authorization": settings.webhook_auth} if settings.webhook_auth else {}
        notifier = WebhookNotifier(WebhookSettings(settings.webhook_url, headers=headers))

        @app.agent(alerts_topic, name="notify")
        async def notify(stream: faust.StreamT[bytes]) -> None:
            async for batch in cast(faust.Stream[bytes], stream).take_events(
                settings.batch_max, settings.batch_within_s
            ):
                events = await admit(batch)
                for event in events:
                    if event.message.value is None:
                        continue
                    message = orjson.loads(event.message.value)
                    log_of = TableDeliveredLog(delivered, event.message.partition)
                    notifier.delivered = log_of
                    await deliver_until_done(notifier, message["delivery_id"], message)
                guard.record(events)

    @app.task  # type: ignore[untyped-decorator]
    async def quiet_client_logs() -> None:
        # mode's logging setup leaves aiokafka's loggers enabled for DEBUG: every
        # fetch then builds log records the handler throws away (a sixth of the
        # consumer thread's samples in a profile on the embedded broker).
        for name in ("aiokafka", "kafka"):
            logging.getLogger(name).setLevel(max(logging.INFO, log_level))

    @app.timer(interval=max(settings.snapshot_interval_s, 0.2))  # type: ignore[untyped-decorator]
    async def flush_snapshots() -> None:
        # quiet periods: changed windows still show within the interval
        if processor.pending.due():
            await publish_snapshots(processor.flush_snapshots())
        if rollup_processor.pending.due():
            await publish_snapshots(rollup_processor.flush_snapshots())

    @app.timer(interval=HEALTH_INTERVAL_S)  # type: ignore[untyped-decorator]
    async def record_health() -> None:
        # events/s per type, consumer lag per topic, sink latencies: the
        # pipeline-health dashboard reads these rows
        now, elapsed = time.monotonic(), time.monotonic() - health_tick[0]
        health_tick[0] = now
        at = datetime.now(UTC)
        rows = [
            (at, worker_name, "events_per_s", kind, count / max(elapsed, 1e-3))
            for kind, count in sorted(processed.items())
        ]
        processed.clear()
        lag: Counter[str] = Counter()
        consumer = cast(Any, app.consumer)
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            committed = consumer._committed_offset.get(tp)  # faust internals
            if highwater is not None:
                lag[tp.topic] += max(highwater - (committed or 0), 0)
        rows += [(at, worker_name, "consumer_lag", t, float(n)) for t, n in sorted(lag.items())]
        rows += sinks.health_rows(at, worker_name)
        sinks.pipeline_health.add(rows)

    @app.timer(interval=1.0)  # type: ignore[untyped-decorator]
    async def list_partitions_to_commit() -> None:
        guard.touch(app.consumer)

    @app.timer(interval=min(settings.sink_max_age_s, 1.0) / 2)  # type: ignore[untyped-decorator]
    async def flush_sinks() -> None:
        # Quiet periods: rows younger than max_age still reach the warehouse.
        try:
            sinks.flush_due()
        except Exception as exc:  # kept buffered; the agents pause if it persists
            log.warning("warehouse write failed, %d rows kept for retry: %s", sinks.pending, exc)

    @app.on_before_shutdown.connect  # type: ignore[arg-type]  # mode types async receivers too narrowly
    async def flush_on_shutdown(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        # windows changed since the last snapshot flush go out before we stop
        pending = take_pending_snapshots()
        try:
            await publish_snapshots(pending)  # the producer still runs at this point
        except Exception:
            log.exception("could not publish the last snapshots to the metrics topic")
            sinks.metric_snapshots.add(s.to_row() for s in pending)
        sinks.flush_all()
        log.info("sinks flushed on shutdown (%d pending snapshots)", len(pending))

    return app


def run_worker(settings: Settings) -> None:
    """Open the warehouse, build the app and run the Faust worker until
    SIGINT/SIGTERM (Faust stops gracefully; the sinks flush last)."""
    hold_empty_fetches(settings.fetch_hold_ms / 1000)
    catalogue = load_catalogue()
    warehouse = open_warehouse(settings.warehouse)
    create_schema(warehouse)
    sinks = SinkSet(warehouse, max_rows=settings.sink_max_rows, max_age_s=settings.sink_max_age_s)
    app = make_app(settings, catalogue, sinks)
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True)
    try:
        worker.execute_from_commandline()
    finally:
        warehouse.close()
