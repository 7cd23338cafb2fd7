"""Producer: record encoding and delivery accounting, against a stand-in for KafkaProducer.

The end-to-end path against a real broker is covered by the integration tests.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import date
from typing import Any

import orjson
import pytest
from kafka.future import Future

import pipeline.producer as producer_module
from pipeline.producer import (
    EventProducer,
    ProduceError,
    encode_key,
    encode_value,
    produce_events,
    record_for,
)
from pipeline.simulator import simulate, write_jsonl
from pipeline.topics import topic_for


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


class FakeKafkaProducer:
    """Records sends; the test resolves each returned future by hand."""

    def __init__(self, **config: Any) -> None:
        self.config = config
        self.records: list[tuple[str, bytes, bytes | None]] = []
        self.futures: list[Future] = []
        self.refuse: Exception | None = None
        self.flushed = 0
        self.closed = False

    def send(self, topic: str, value: bytes, key: bytes | None = None) -> Future:
        if self.refuse is not None:
            raise self.refuse
        self.records.append((topic, value, key))
        future = Future()
        self.futures.append(future)
        return future

    def flush(self, timeout: float | None = None) -> None:
        self.flushed += 1

    def close(self, timeout: float | None = None) -> None:
        self.closed = True


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[FakeKafkaProducer]]:
    made: list[FakeKafkaProducer] = []

    def factory(**config: Any) -> FakeKafkaProducer:
        made.append(FakeKafkaProducer(**config))
        return made[-1]

    monkeypatch.setattr(producer_module, "KafkaProducer", factory)
    yield made


def test_config_defaults_and_idempotence_flag(fake: list[FakeKafkaProducer]) -> None:
    EventProducer("broker:9092")
    assert fake[0].config == {
        "bootstrap_servers": "broker:9092",
        "linger_ms": 20,
        "acks": "all",
        "enable_idempotence": False,
    }
    EventProducer("b1:9092,b2:9092", linger_ms=5, acks=1, idempotent=True, client_id="sim")
    assert fake[1].config == {
        "bootstrap_servers": "b1:9092,b2:9092",
        "linger_ms": 5,
        "acks": 1,
        "enable_idempotence": True,
        "client_id": "sim",
    }


def test_send_routes_and_counts_deliveries(
    fake: list[FakeKafkaProducer], events: list[dict[str, Any]]
) -> None:
    producer = EventProducer("broker:9092")
    for event in events:
        producer.send(event)
    producer.send_raw("csi.events.survey", b"{not json", key=None)
    kafka = fake[0]
    assert kafka.records[0] == (
        topic_for(events[0]["event_type"]),
        orjson.dumps(events[0]),
        events[0]["dealer_id"].encode(),
    )
    assert kafka.records[-1] == ("csi.events.survey", b"{not json", None)
    assert producer.pending == len(events) + 1 and producer.sent == 0
    for future in kafka.futures:
        future.success(object())
    assert (producer.sent, producer.failed, producer.pending) == (len(events) + 1, 0, 0)
    producer.flush(timeout=1.0)
    assert kafka.flushed == 1


def test_delivery_failure_makes_flush_raise(
    fake: list[FakeKafkaProducer], events: list[dict[str, Any]]
) -> None:
    producer = EventProducer("broker:9092")
    for event in events[:3]:
        producer.send(event)
    first, second = RuntimeError("leader not available"), RuntimeError("timed out")
    kafka = fake[0]
    kafka.futures[0].success(object())
    kafka.futures[1].failure(first)
    kafka.futures[2].failure(second)
    assert (producer.sent, producer.failed) == (1, 2)
    assert producer.first_error is first
    with pytest.raises(ProduceError) as raised:
        producer.flush()
    assert raised.value.failed == 2 and raised.value.first_error is first
    with pytest.raises(ProduceError):  # a failure is never forgotten
        producer.flush()


def test_refused_send_is_counted_and_reraised(
    fake: list[FakeKafkaProducer], events: list[dict[str, Any]]
) -> None:
    producer = EventProducer("broker:9092")
    fake[0].refuse = BufferError("buffer full")
    with pytest.raises(BufferError):
        producer.send(events[0])
    assert producer.failed == 1 and producer.pending == 0
    with pytest.raises(ProduceError):
        producer.flush()


def test_context_manager_flushes_then_closes(
    fake: list[FakeKafkaProducer], events: list[dict[str, Any]]
) -> None:
    with EventProducer("broker:9092") as producer:
        producer.send(events[0])
        fake[0].futures[0].success(object())
    assert fake[0].flushed == 1 and fake[0].closed

    with pytest.raises(ProduceError), EventProducer("broker:9092") as producer:
        producer.send(events[0])
        fake[1].futures[0].failure(RuntimeError("gone"))
    assert fake[1].closed


def test_context_manager_keeps_the_body_error(
    fake: list[FakeKafkaProducer], events: list[dict[str, Any]]
) -> None:
    with pytest.raises(KeyError), EventProducer("broker:9092") as producer:
        producer.send(events[0])
        fake[0].futures[0].failure(RuntimeError("gone"))
        raise KeyError("body failed")
    assert fake[0].closed and fake[0].flushed == 0


class RecordingSink:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.flushes = 0

    def send(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def flush(self, timeout: float | None = None) -> None:
        self.flushes += 1


def test_produce_events_sends_all_then_flushes(events: list[dict[str, Any]]) -> None:
    sink = RecordingSink()
    assert produce_events(sink, iter(events)) == len(events)
    assert sink.events == events and sink.flushes == 1


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
