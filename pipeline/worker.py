"""The Faust worker: a thin adapter around `pipeline.stream.BatchProcessor`.

One agent consumes every event topic in batches (`take_events`), hands the
raw records to the processor, and ships its output: events, snapshots and
dead letters to the warehouse sinks, snapshots to the metrics topic, dead
letters to the dead-letter topic. Buckets live in a Faust table whose
changelog is written to the partition the dealer's events come from.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import faust
import orjson

from pipeline.catalogue import Catalogue, load_catalogue
from pipeline.config import Settings
from pipeline.stream import BatchOutput, BatchProcessor, RawRecord
from pipeline.topics import DEAD_LETTERS, EVENT_PARTITIONS, EVENT_TOPICS, METRICS
from pipeline.warehouse import SinkSet, create_schema, open_warehouse

log = logging.getLogger("csi.worker")


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
    )
    buckets = PartitionedTable(
        app,
        name="buckets",
        default=None,
        partitions=EVENT_PARTITIONS,
        key_type=str,
        beacon=app.tables.beacon,
        help="daily buckets of sufficient statistics per dealer and department",
    )
    app.tables.add(buckets)
    # One batch writes one changelog record per changed bucket; Faust's
    # default buffer of 100 would call every batch "producer buffer full".
    app.producer.buffer.max_messages = max(settings.batch_max, 100)
    processor = BatchProcessor(TableStore(buckets), catalogue)

    def raw_topic(*names: str) -> faust.TopicT:
        # Bytes in, bytes out: validation happens once, in the processor, and
        # a dead letter must keep the original bytes.
        return app.topic(
            *names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
        )

    event_topics = raw_topic(*(spec.name for spec in EVENT_TOPICS.values()))
    dead_letter_topic = raw_topic(DEAD_LETTERS.name)
    metrics_topic = raw_topic(METRICS.name)

    async def ship(out: BatchOutput) -> None:
        sinks.events.add(out.event_rows)
        sinks.dead_letters.add(dl.to_row() for dl in out.dead_letters)
        sinks.metric_snapshots.add(s.to_row() for s in out.snapshots)
        for dead_letter in out.dead_letters:
            await dead_letter_topic.send(
                key=dead_letter.key.encode("utf-8"), value=orjson.dumps(dead_letter.to_message())
            )
        for snapshot in out.snapshots:
            await metrics_topic.send(
                key=snapshot.key.encode("utf-8"), value=orjson.dumps(snapshot.to_message())
            )
        sinks.flush_due()

    @app.agent(event_topics, name="ingest")
    async def ingest(stream: faust.StreamT[bytes]) -> None:
        async for events in cast(faust.Stream[bytes], stream).take_events(
            settings.batch_max, settings.batch_within_s
        ):
            records = [
                RawRecord(
                    e.message.topic, e.message.partition, e.message.offset,
                    e.message.key, e.message.value or b"",  # a null value: a dead letter
                )
                for e in events
            ]  # fmt: skip
            await ship(processor.process(records))

    @app.timer(interval=min(settings.sink_max_age_s, 1.0) / 2)  # type: ignore[untyped-decorator]
    async def flush_sinks() -> None:
        # Quiet periods: rows younger than max_age still reach the warehouse.
        sinks.flush_due()

    @app.on_before_shutdown.connect  # type: ignore[arg-type]  # mode types async receivers too narrowly
    async def flush_on_shutdown(sender: Any, *args: Any, signal: Any, **kwargs: Any) -> None:
        sinks.flush_all()
        log.info("sinks flushed on shutdown")

    return app


def run_worker(settings: Settings) -> None:
    """Open the warehouse, build the app and run the Faust worker until
    SIGINT/SIGTERM (Faust stops gracefully; the sinks flush last)."""
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
