"""Producer: record encoding (pure), and routing and delivery accounting against a real broker.

The integration tests run kafka-python's real KafkaProducer against the embedded noida-db
broker (``broker`` / ``broker_factory`` fixtures) and read the records back with a real
KafkaConsumer; every failure they provoke is a real one (broker-side rejection, a stopped
broker, kafka-python's own size check). Only the pacing test fakes something: the clock.
"""

from __future__ import annotations

import io
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import date
from typing import Any

import orjson
import pytest
from kafka import KafkaConsumer
from kafka.errors import (
    IllegalStateError,
    KafkaConfigurationError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
)
from kafka.structs import TopicPartition

import pipeline.producer as producer_module
from pipeline.broker import EmbeddedBroker, create_topics
from pipeline.producer import (
    EventProducer,
    ProduceError,
    encode_key,
    encode_value,
    produce_events,
    record_for,
)
from pipeline.simulator import simulate, write_jsonl
from pipeline.topics import ALL_TOPICS, DEAD_LETTERS, METRICS, topic_for
from tests.broker_fixture import BrokerFactory

Record = tuple[str, bytes | None, bytes]
"""(topic, key, value) of a record as read back from the broker."""

KAFKA_MAX_REQUEST_SIZE = 1_048_576
"""kafka-python's default max_request_size: a larger record is refused before queueing."""

OVERSIZED = b"x" * 1_200_000
"""Bigger than the broker's (and kafka-python's default) maximum message size."""

ROUND_TRIP_TIMEOUT_S = 15.0


@pytest.fixture
def events() -> list[dict[str, Any]]:
    return list(simulate(2, 4, end=date(2024, 6, 30), seed=1))


def test_key_is_the_dealer_code_in_utf8() -> None:
    assert encode_key("D001") == b"D001"
    assert encode_key("店-01") == "店-01".encode()


def test_value_is_the_same_bytes_as_the_jsonl_line(events: list[dict[str, Any]]) -> None:
    out = io.BytesIO()
    write_jsonl(events, out)
    assert [encode_value(e) for e in events] == out.getvalue().splitlines()
    assert orjson.loads(encode_value(events[0])) == events[0]


def test_record_for_routes_by_event_type(events: list[dict[str, Any]]) -> None:
    for event in events:
        topic, key, value = record_for(event)
        assert topic == topic_for(event["event_type"])
        assert key == event["dealer_id"].encode()
        assert value == orjson.dumps(event)


@pytest.mark.parametrize(
    ("event", "message"),
    [
        ({"dealer_id": "D001"}, "event_type"),
        ({"event_type": 3, "dealer_id": "D001"}, "event_type"),
        ({"event_type": "visit"}, "dealer_id"),
        ({"event_type": "visit", "dealer_id": ""}, "dealer_id"),
        ({"event_type": "teleport", "dealer_id": "D001"}, "unknown event_type"),
    ],
)
def test_record_for_rejects_unroutable_events(event: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        record_for(event)


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.02)


def _read_back(bootstrap: str) -> list[tuple[Record, int]]:
    """Every record of every pipeline topic, with its partition, read from the beginning.

    Polls until as many records arrived as the end offsets say the topics hold, or fails
    after ROUND_TRIP_TIMEOUT_S.
    """
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        partitions = [
            TopicPartition(spec.name, partition)
            for spec in ALL_TOPICS
            for partition in range(spec.partitions)
        ]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        expected = sum(consumer.end_offsets(partitions).values())
        records: list[tuple[Record, int]] = []
        deadline = time.monotonic() + ROUND_TRIP_TIMEOUT_S
        while len(records) < expected:
            if time.monotonic() >= deadline:
                raise AssertionError(f"read {len(records)} of {expected} records in time")
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(((m.topic, m.key, m.value), m.partition) for m in batch)
        return records
    finally:
        consumer.close()


@pytest.mark.integration
def test_config_defaults_and_idempotence_flag(broker: EmbeddedBroker) -> None:
    with EventProducer(broker.bootstrap) as producer:
        config = producer._producer.config
        assert config["bootstrap_servers"] == broker.bootstrap
        assert (config["linger_ms"], config["acks"]) == (20, -1)  # kafka-python: "all" is -1
        # Off unless asked for, although kafka-python 3 would turn it on by itself.
        assert config["enable_idempotence"] is False
    with EventProducer(broker.bootstrap, linger_ms=5, acks=1, client_id="sim") as producer:
        config = producer._producer.config
        assert (config["linger_ms"], config["acks"], config["client_id"]) == (5, 1, "sim")
        assert config["enable_idempotence"] is False
    # noida-db implements InitProducerId, so an idempotent producer delivers here.
    with EventProducer(broker.bootstrap, idempotent=True) as producer:
        assert producer._producer.config["enable_idempotence"] is True
        producer.send_raw(METRICS.name, b"{}", b"D001")
    assert (producer.sent, producer.failed) == (1, 0)
    with pytest.raises(KafkaConfigurationError, match="acks=1"):
        EventProducer(broker.bootstrap, acks=1, idempotent=True)


@pytest.mark.integration
def test_send_routes_by_type_and_keys_by_dealer(broker: EmbeddedBroker) -> None:
    events = list(simulate(3, 2, end=date(2024, 6, 30), seed=1))
    assert {"visit", "survey", "call"} <= {e["event_type"] for e in events}  # several topics
    raw = (topic_for("survey"), None, b"{not json")
    with EventProducer(broker.bootstrap) as producer:
        for event in events:
            producer.send(event)
        producer.send_raw(raw[0], raw[2], raw[1])  # bytes as they are, no key
    assert (producer.sent, producer.failed, producer.pending) == (len(events) + 1, 0, 0)

    read = _read_back(broker.bootstrap)
    expected = [
        (topic_for(e["event_type"]), e["dealer_id"].encode(), encode_value(e)) for e in events
    ]
    assert Counter(record for record, _ in read) == Counter([*expected, raw])
    partitions_of: defaultdict[bytes, set[int]] = defaultdict(set)
    for (_topic, key, _value), partition in read:
        if key is not None:
            partitions_of[key].add(partition)
    assert sorted(partitions_of) == [b"D001", b"D002", b"D003"]
    # One partition number per dealer across every event topic (co-partitioning).
    assert all(len(partitions) == 1 for partitions in partitions_of.values()), partitions_of


@pytest.mark.integration
def test_produce_events_sends_all_then_flushes(
    broker: EmbeddedBroker, events: list[dict[str, Any]]
) -> None:
    # A long linger keeps records queued until something flushes them.
    producer = EventProducer(broker.bootstrap, linger_ms=60_000)
    try:
        assert produce_events(producer, iter(events)) == len(events)
        assert (producer.sent, producer.failed, producer.pending) == (len(events), 0, 0)
    finally:
        producer.close()
    assert Counter(record for record, _ in _read_back(broker.bootstrap)) == Counter(
        record_for(event) for event in events
    )


@pytest.mark.integration
def test_broker_rejection_makes_flush_raise(broker: EmbeddedBroker) -> None:
    # kafka-python lets the record through (max_request_size raised); the broker refuses it.
    producer = EventProducer(broker.bootstrap, max_request_size=4 * KAFKA_MAX_REQUEST_SIZE)
    try:
        producer.send_raw(METRICS.name, b"{}", b"D001")
        producer.send_raw(DEAD_LETTERS.name, OVERSIZED, b"D002")
        producer.send_raw(METRICS.name, b"{}", b"D003")
        with pytest.raises(ProduceError) as raised:
            producer.flush()
        assert (producer.sent, producer.failed, producer.pending) == (2, 1, 0)
        assert raised.value.failed == 1
        assert isinstance(raised.value.first_error, MessageSizeTooLargeError)
        assert raised.value.first_error is producer.first_error
        with pytest.raises(ProduceError):  # a failure is never forgotten
            producer.flush()
    finally:
        producer.close()


@pytest.mark.integration
def test_stopped_broker_makes_flush_raise(broker_factory: BrokerFactory) -> None:
    broker = broker_factory().start()
    create_topics(broker.bootstrap, [METRICS])
    producer = EventProducer(
        broker.bootstrap,
        linger_ms=0,
        delivery_timeout_ms=1500,
        request_timeout_ms=1000,
        max_block_ms=1000,
        reconnect_backoff_max_ms=200,
    )
    try:
        producer.send_raw(METRICS.name, b"{}", b"D001")  # also caches the topic's metadata
        producer.flush(timeout=10)
        broker.stop()
        producer.send_raw(METRICS.name, b"{}", b"D001")
        producer.send_raw(METRICS.name, b"{}", b"D002")
        with pytest.raises(ProduceError) as raised:  # not KafkaTimeoutError: all expired
            producer.flush(timeout=10)
        assert (producer.sent, producer.failed, producer.pending) == (1, 2, 0)
        assert raised.value.failed == 2
        assert isinstance(raised.value.first_error, KafkaTimeoutError)
    finally:
        producer.close(timeout=5)


@pytest.mark.integration
def test_refused_send_is_counted_and_reraised(broker: EmbeddedBroker) -> None:
    producer = EventProducer(broker.bootstrap)
    try:
        producer.send_raw(METRICS.name, b"{}", b"D001")
        # Over kafka-python's max_request_size: refused on the spot, nothing is queued.
        with pytest.raises(MessageSizeTooLargeError) as refused:
            producer.send_raw(DEAD_LETTERS.name, OVERSIZED, b"D001")
        assert producer.failed == 1 and producer.first_error is refused.value
        with pytest.raises(ProduceError) as raised:
            producer.flush()
        assert raised.value.first_error is refused.value
        assert (producer.sent, producer.failed, producer.pending) == (1, 1, 0)
    finally:
        producer.close()
    # Any other refusal is counted the same way: here, sending on a closed client.
    with pytest.raises(IllegalStateError):
        producer.send_raw(METRICS.name, b"{}", b"D001")
    assert (producer.failed, producer.pending) == (2, 0)
    # Nothing of the refused records reached the broker.
    assert [record for record, _ in _read_back(broker.bootstrap)] == [
        (METRICS.name, b"D001", b"{}")
    ]


@pytest.mark.integration
def test_context_manager_flushes_then_closes(broker: EmbeddedBroker) -> None:
    # A long linger keeps records queued until something flushes them.
    with EventProducer(broker.bootstrap, linger_ms=60_000) as producer:
        for dealer in (b"D001", b"D002", b"D003"):
            producer.send_raw(METRICS.name, b"{}", dealer)
        assert producer.pending == 3
    assert (producer.sent, producer.failed, producer.pending) == (3, 0, 0)
    with pytest.raises(IllegalStateError):  # closed
        producer.send_raw(METRICS.name, b"{}", b"D001")

    # A delivery failure surfaces from the with-statement (only flush raises it), and the
    # client is still closed.
    with (
        pytest.raises(ProduceError),
        EventProducer(
            broker.bootstrap, linger_ms=60_000, max_request_size=4 * KAFKA_MAX_REQUEST_SIZE
        ) as producer,
    ):
        producer.send_raw(DEAD_LETTERS.name, OVERSIZED, b"D001")
    assert (producer.sent, producer.failed, producer.pending) == (0, 1, 0)
    with pytest.raises(IllegalStateError):
        producer.send_raw(METRICS.name, b"{}", b"D001")


@pytest.mark.integration
def test_context_manager_keeps_the_body_error(broker: EmbeddedBroker) -> None:
    with (
        pytest.raises(KeyError, match="body failed"),
        EventProducer(broker.bootstrap, max_request_size=4 * KAFKA_MAX_REQUEST_SIZE) as producer,
    ):
        producer.send_raw(DEAD_LETTERS.name, OVERSIZED, b"D001")
        _wait_for(lambda: producer.failed == 1)  # a flush on the way out would now raise
        raise KeyError("body failed")
    with pytest.raises(IllegalStateError):  # closed all the same
        producer.send_raw(METRICS.name, b"{}", b"D001")


class RecordingSink:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.flushes = 0

    def send(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def flush(self, timeout: float | None = None) -> None:
        self.flushes += 1


class FakeClock:
    """Stands in for the `time` module: sleeping advances the clock."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_produce_events_paces_in_small_steps(
    monkeypatch: pytest.MonkeyPatch, events: list[dict[str, Any]]
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(producer_module, "time", clock)
    sent_at: list[float] = []

    class TimedSink(RecordingSink):
        def send(self, event: dict[str, Any]) -> None:
            sent_at.append(clock.now)
            super().send(event)

    assert produce_events(TimedSink(), events[:21], rate=2.0) == 21
    # Event i goes out at i / rate seconds after the start, no earlier.
    assert sent_at == pytest.approx([100.0 + i / 2.0 for i in range(21)])
    assert clock.sleeps and max(clock.sleeps) <= producer_module._PACING_STEP_S + 1e-9


@pytest.mark.parametrize("rate", [0.0, -1.0, float("nan"), float("inf")])
def test_produce_events_rejects_bad_rate(rate: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        produce_events(RecordingSink(), [], rate=rate)
