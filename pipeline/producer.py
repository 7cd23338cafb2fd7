"""Thin Kafka producer for feedback events (kafka-python 3.x).

Records are keyed by ``dealer_id`` (UTF-8) so that all of a dealer's events
land on the same partition number of every event topic (the Faust agents rely
on that co-partitioning), and the value is the event's compact JSON (orjson),
byte-identical to a line of :func:`pipeline.simulator.write_jsonl`.

Delivery is asynchronous: :meth:`EventProducer.send` only queues. Failures
reported by the broker arrive in a callback on kafka-python's sender thread;
they are counted, the first one is kept, and :meth:`EventProducer.flush`
raises :class:`ProduceError` once any record has failed, so a lost record is
never silent.

Authentication and TLS come from :class:`pipeline.config.KafkaSecurity`: by default from
the ``CSI_KAFKA_*`` environment variables, so every producer the pipeline makes (``csi
simulate``, ``csi case``, ``csi dlq replay``, ``csi serve-http``) talks to a secured
cluster the same way the worker does.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Protocol, Self

import orjson
from kafka import KafkaProducer

from pipeline.config import KafkaSecurity
from pipeline.topics import topic_for

_PACING_STEP_S = 0.05
"""Longest single sleep while pacing: short enough to stay responsive to Ctrl-C."""


class ProduceError(RuntimeError):
    """One or more records were not delivered; ``first_error`` is the earliest cause."""

    def __init__(self, failed: int, first_error: BaseException) -> None:
        super().__init__(f"{failed} record(s) failed to deliver; first error: {first_error!r}")
        self.failed = failed
        self.first_error = first_error


def encode_key(dealer_id: str) -> bytes:
    """Record key for a dealer: its code as UTF-8."""
    return dealer_id.encode("utf-8")


def encode_value(event: dict[str, Any]) -> bytes:
    """Record value: the event as compact JSON."""
    return orjson.dumps(event)


def record_for(event: dict[str, Any]) -> tuple[str, bytes, bytes]:
    """``(topic, key, value)`` for an event; ValueError if it lacks a usable type or dealer."""
    event_type = event.get("event_type")
    dealer_id = event.get("dealer_id")
    if not isinstance(event_type, str):
        raise ValueError(f"event has no string event_type: {event_type!r} (use send_raw)")
    if not isinstance(dealer_id, str) or not dealer_id:
        raise ValueError(f"event has no dealer_id to key on: {dealer_id!r} (use send_raw)")
    return topic_for(event_type), encode_key(dealer_id), encode_value(event)


class EventProducer:
    """Send events to their topic, keyed by dealer, and account for every delivery.

    ``idempotent`` turns on kafka-python's idempotent (not transactional)
    producer, which stops broker-side duplicates on retry. It is off by
    default because it needs the InitProducerId API, which some
    Kafka-compatible brokers used in development and tests do not implement;
    kafka-python 3 would otherwise enable it on its own and then fail against
    them. Duplicates are harmless downstream anyway: ``event_id`` is the
    idempotency key. With ``idempotent=True``, ``acks`` must stay ``"all"``.

    ``security`` is the SASL/TLS configuration; None reads it from the environment
    (:meth:`KafkaSecurity.from_env`, PLAINTEXT when no ``CSI_KAFKA_*`` is set). Explicit
    ``kafka_config`` keys override what it gives.

    Counters: ``sent`` is records acknowledged by the broker, ``failed`` is
    records that could not be delivered, ``pending`` is records queued without
    an outcome yet.
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        linger_ms: int = 20,
        acks: str | int = "all",
        idempotent: bool = False,
        security: KafkaSecurity | None = None,
        **kafka_config: Any,
    ) -> None:
        if security is None:
            security = KafkaSecurity.from_env()
        security_config = security.client_config()
        self._lock = threading.Lock()
        self._queued = 0
        self._sent = 0
        self._failed = 0
        self._first_error: BaseException | None = None
        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            linger_ms=linger_ms,
            acks=acks,
            enable_idempotence=idempotent,
            # Topics are created explicitly with their partition counts
            # (pipeline.broker.create_topics); a typo must not create one.
            **{"allow_auto_create_topics": False, **security_config, **kafka_config},
        )

    @property
    def sent(self) -> int:
        with self._lock:
            return self._sent

    @property
    def failed(self) -> int:
        with self._lock:
            return self._failed

    @property
    def pending(self) -> int:
        with self._lock:
            return self._queued - self._sent - self._failed

    @property
    def first_error(self) -> BaseException | None:
        with self._lock:
            return self._first_error

    def send(self, event: dict[str, Any]) -> None:
        """Queue an event on ``topic_for(event["event_type"])``, keyed by its dealer."""
        topic, key, value = record_for(event)
        self.send_raw(topic, value, key)

    def send_raw(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        """Queue bytes as they are: pre-encoded events or deliberately malformed input."""
        with self._lock:
            self._queued += 1
        try:
            future = self._producer.send(topic, value=value, key=key)
        except Exception as exc:
            # Refused before queueing (buffer full, no metadata, oversized
            # record): counted like a delivery failure so flush() reports it too.
            self._on_error(exc)
            raise
        future.add_callback(self._on_success)
        future.add_errback(self._on_error)

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every queued record; raise :class:`ProduceError` if any ever failed."""
        self._producer.flush(timeout=timeout)
        with self._lock:
            failed, first = self._failed, self._first_error
        if first is not None:
            raise ProduceError(failed, first) from first

    def close(self, timeout: float | None = None) -> None:
        """Close the client (kafka-python sends what is still queued first); does not raise
        on delivery failures, call :meth:`flush` for that."""
        self._producer.close(timeout=timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            # On an error in the with-block, only close: a flush error here
            # would hide the original exception.
            self.close()

    def _on_success(self, _metadata: object) -> None:
        with self._lock:
            self._sent += 1

    def _on_error(self, error: BaseException) -> None:
        with self._lock:
            self._failed += 1
            if self._first_error is None:
                self._first_error = error


class EventSink(Protocol):
    """What :func:`produce_events` needs; :class:`EventProducer` is one."""

    def send(self, event: dict[str, Any]) -> None: ...

    def flush(self, timeout: float | None = None) -> None: ...


def produce_events(
    producer: EventSink, events: Iterable[dict[str, Any]], *, rate: float | None = None
) -> int:
    """Send every event, at most ``rate`` events/s when given, then flush; return the count.

    Pacing follows a fixed schedule (event ``i`` is due ``i / rate`` seconds
    after the start), so a slow event source or a slow send does not lower the
    long-run rate, and sleeps in short steps. The final flush makes delivery
    failures raise here rather than get lost.
    """
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a finite number of events per second > 0, got {rate}")
    count = 0
    started = time.monotonic()
    for event in events:
        if rate is not None:
            due = started + count / rate
            while (wait := due - time.monotonic()) > 0:
                time.sleep(min(wait, _PACING_STEP_S))
        producer.send(event)
        count += 1
    producer.flush()
    return count
