"""Measure what the embedded brokers do for this pipeline; the figures behind docs/brokers.md.

For each broker kind (pipeline.broker.EmbeddedBroker) this starts a fresh broker and checks:

1. first consumer-group join: seconds from AIOKafkaConsumer.start() (group_id set,
   session_timeout_ms=10000) to its first fetched message, for two fresh groups;
2. end offsets after a batched produce of N messages to a 4-partition topic, vs expected;
3. Faust table recovery after a worker restart (benchmarks/faust_counter.py, 8 keys over
   4 partitions): worker 1 counts N messages; SIGTERM; worker 2 starts with a fresh local
   state dir (the table can only come back from its changelog) and must show N/8 per key
   before anything new is produced, then M more must bring it to (N+M)/8; SIGTERM; worker 3
   (fresh state again) gets M more produced while it is still starting and recovering, the
   race a real restart under load sees, and must reach (N+2M)/8;
4. idempotent producers (aiokafka and kafka-python), transactions (commit visible, abort
   hidden from read_committed), auto-creation on produce, data kept across a broker restart.

Usage (as a script, so that faust_counter.py beside it is importable; ``pipeline`` comes from
the installed dealer-csi package)::

    .venv/bin/python benchmarks/broker_check.py [--kinds noida,tansu] [--n 2000] [--m 800]
        [--json out.json] [--workdir DIR]

Every process it starts (brokers, Faust workers) is stopped before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition
from faust_counter import COUNTER_PARTITIONS, changelog_topic, input_topic

from pipeline.broker import BROKER_KINDS, BrokerKind, EmbeddedBroker, create_topics
from pipeline.topics import TopicSpec

FAUST_SCRIPT = Path(__file__).resolve().with_name("faust_counter.py")
KEYS = 8


@dataclass
class FaustResult:
    first_count_s: float | None = None
    stop_s: float | None = None
    # Restarted worker, nothing new produced yet: the table must come back from the changelog.
    recovered_s: float | None = None
    totals_recovered: dict[str, int] = field(default_factory=dict)
    # Then M more: totals must reach N+M per key.
    totals_after_m: dict[str, int] = field(default_factory=dict)
    ok: bool = False
    # A third worker, with M more produced while it is still starting and recovering.
    totals_racing: dict[str, int] = field(default_factory=dict)
    racing_ok: bool = False
    error: str | None = None


@dataclass
class KindResult:
    kind: str
    start_s: float = 0.0
    join_s: list[float] = field(default_factory=list)
    end_offsets_expected: dict[int, int] = field(default_factory=dict)
    end_offsets_got: dict[int, int] = field(default_factory=dict)
    records_fetched: int = 0
    idempotent_aiokafka: str = "not run"
    idempotent_kafka_python: str = "not run"
    transactions: str = "not run"
    auto_create_on_produce: str = "not run"
    survives_restart: str = "not run"
    faust: FaustResult = field(default_factory=FaustResult)
    errors: list[str] = field(default_factory=list)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:160]


def _attempt(result: KindResult, what: str, check: Callable[[], str]) -> str:
    """Run one check; an exception becomes the check's outcome, not the end of the run."""
    try:
        return check()
    except Exception as exc:
        outcome = f"error ({_describe(exc)})"
        result.errors.append(f"{what}: {outcome}")
        return outcome


async def _produce_keyed(bootstrap: str, topic: str, count: int, start: int = 0) -> None:
    """``count`` messages over KEYS keys; key k<j> always goes to partition j % 4.

    Explicit partitions spread the keys over all four partitions (the default partitioner
    happens to hash k0..k7 onto two of them) while keeping each key on one partition.
    """
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20)
    await producer.start()
    try:
        sent = [
            await producer.send(
                topic, b"v%d" % i, key=b"k%d" % (i % KEYS), partition=i % KEYS % COUNTER_PARTITIONS
            )
            for i in range(start, start + count)
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def _produce_to_partitions(bootstrap: str, topic: str, count: int, parts: int) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=50)
    await producer.start()
    try:
        sent = [await producer.send(topic, b"m%d" % i, partition=i % parts) for i in range(count)]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def _end_offsets(bootstrap: str, topic: str, parts: int) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    await consumer.start()
    try:
        offsets = await asyncio.wait_for(
            consumer.end_offsets([TopicPartition(topic, p) for p in range(parts)]), 15
        )
        return {tp.partition: int(o) for tp, o in offsets.items()}
    finally:
        await consumer.stop()


async def _fetch_count(
    bootstrap: str, topic: str, isolation: str = "read_uncommitted"
) -> list[bytes]:
    """Every value in ``topic`` from the beginning, reading until 2 s pass with nothing new."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        isolation_level=isolation,
    )
    await consumer.start()
    values: list[bytes] = []
    try:
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < 2.0:
            batches = await consumer.getmany(timeout_ms=250)
            for messages in batches.values():
                if messages:
                    idle_since = time.monotonic()
                values.extend(m.value for m in messages if m.value is not None)
    finally:
        await consumer.stop()
    return values


async def _group_join_seconds(bootstrap: str, topic: str) -> float:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"join-{uuid.uuid4().hex[:8]}",
        session_timeout_ms=10000,
        auto_offset_reset="earliest",
    )
    began = time.perf_counter()
    await consumer.start()
    try:
        await asyncio.wait_for(consumer.getone(), 60)
        return time.perf_counter() - began
    finally:
        await consumer.stop()


async def _idempotent_aiokafka(bootstrap: str, topic: str) -> str:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True)
    try:
        await asyncio.wait_for(producer.start(), 15)
        await asyncio.wait_for(producer.send_and_wait(topic, b"idempotent", partition=0), 15)
        return "ok"
    finally:
        await producer.stop()


def _idempotent_kafka_python(bootstrap: str, topic: str) -> str:
    from kafka import KafkaProducer

    producer = KafkaProducer(
        bootstrap_servers=bootstrap, enable_idempotence=True, max_block_ms=10000
    )
    try:
        producer.send(topic, b"idempotent-kp", partition=0).get(timeout=15)
        return "ok"
    finally:
        producer.close(timeout=5)


async def _transactions(bootstrap: str, topic: str) -> str:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, transactional_id=f"tx-{uuid.uuid4().hex[:8]}"
    )
    try:
        await asyncio.wait_for(producer.start(), 15)
        async with producer.transaction():
            await producer.send_and_wait(topic, b"committed", partition=0)
        await producer.begin_transaction()
        await producer.send_and_wait(topic, b"aborted", partition=0)
        await producer.abort_transaction()
    finally:
        await producer.stop()
    committed = await _fetch_count(bootstrap, topic, "read_committed")
    everything = await _fetch_count(bootstrap, topic, "read_uncommitted")
    if committed == [b"committed"] and sorted(everything) == [b"aborted", b"committed"]:
        return "ok (abort hidden from read_committed)"
    return f"wrong: read_committed={committed!r} read_uncommitted={everything!r}"


async def _auto_create(bootstrap: str) -> str:
    topic = f"check.autocreate.{uuid.uuid4().hex[:6]}"
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await producer.start()
    try:
        await asyncio.wait_for(producer.send_and_wait(topic, b"x"), 10)
    except Exception as exc:
        return f"no (produce failed: {_describe(exc)})"
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        await consumer.topics()  # refreshes the metadata partitions_for_topic reads
        found = consumer.partitions_for_topic(topic) or set()
    finally:
        await consumer.stop()
    return f"yes, with {len(found)} partition(s)"


def _wait_for_totals(
    totals_path: Path, expected: dict[str, int], worker: subprocess.Popen[bytes], timeout: float
) -> tuple[dict[str, int], float | None]:
    """Poll the worker's totals until they equal ``expected``; (last totals, seconds | None).

    Gives up early once non-empty totals have not changed for 15 s: a worker whose table came
    back wrong stays wrong, and waiting out the full timeout would only slow the check down.
    """
    began = time.monotonic()
    last: dict[str, int] = {}
    last_change = began
    while time.monotonic() - began < timeout:
        current = last
        with contextlib.suppress(OSError, ValueError):
            current = {str(k): int(v) for k, v in json.loads(totals_path.read_text()).items()}
        if current == expected:
            return current, time.monotonic() - began
        if current != last:
            last, last_change = current, time.monotonic()
        elif last and time.monotonic() - last_change > 15.0:
            break
        if worker.poll() is not None:
            raise RuntimeError(f"faust worker exited with code {worker.returncode}")
        time.sleep(0.2)
    return last, None


@contextlib.contextmanager
def _faust_worker(
    bootstrap: str, app_id: str, state_dir: Path, totals: Path, log_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    state_dir.mkdir(parents=True, exist_ok=True)
    totals.unlink(missing_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, str(FAUST_SCRIPT), bootstrap, app_id, str(state_dir), str(totals)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # signal the worker's group, not this script
        )
    try:
        yield proc
    finally:
        _stop_worker(proc)


def _stop_worker(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> float:
    """SIGTERM (Faust's clean shutdown), SIGKILL after ``timeout``; seconds it took."""
    began = time.monotonic()
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return time.monotonic() - began


def _faust_recovery(bootstrap: str, workdir: Path, n: int, m: int, timeout: float) -> FaustResult:
    result = FaustResult()
    app_id = f"bench-{uuid.uuid4().hex[:6]}"
    create_topics(
        bootstrap,
        [
            TopicSpec(input_topic(app_id), COUNTER_PARTITIONS, "benchmark input"),
            TopicSpec(changelog_topic(app_id), COUNTER_PARTITIONS, "benchmark table changelog"),
        ],
    )
    totals = workdir / f"{app_id}-totals.json"
    log_path = workdir / f"{app_id}-worker.log"

    def per_key(count: int) -> dict[str, int]:
        return {f"k{i}": count // KEYS for i in range(KEYS)}

    def worker(state: str) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
        # Each worker gets a fresh state dir: with the in-memory store the table can only
        # come back by replaying the changelog from the broker.
        return _faust_worker(bootstrap, app_id, workdir / state, totals, log_path)

    def phases() -> None:
        with worker("state-1") as first:
            asyncio.run(_produce_keyed(bootstrap, input_topic(app_id), n))
            got, result.first_count_s = _wait_for_totals(totals, per_key(n), first, timeout)
            if result.first_count_s is None:
                result.error = f"first worker never counted {n}: {got}"
                return
            result.stop_s = _stop_worker(first)

        with worker("state-2") as second:
            result.totals_recovered, result.recovered_s = _wait_for_totals(
                totals, per_key(n), second, timeout
            )
            asyncio.run(_produce_keyed(bootstrap, input_topic(app_id), m, start=n))
            result.totals_after_m, done = _wait_for_totals(totals, per_key(n + m), second, timeout)
            result.ok = result.recovered_s is not None and done is not None

        with worker("state-3") as third:
            # No waiting for recovery this time: the new messages race the worker's startup.
            asyncio.run(_produce_keyed(bootstrap, input_topic(app_id), m, start=n + m))
            result.totals_racing, done = _wait_for_totals(
                totals, per_key(n + 2 * m), third, timeout
            )
            result.racing_ok = done is not None

    try:
        phases()
    except RuntimeError as exc:
        log_tail = (
            log_path.read_text(errors="replace").splitlines()[-8:] if log_path.exists() else []
        )
        raise RuntimeError(f"{exc}; worker log: {' | '.join(log_tail)}") from exc
    return result


def check_kind(kind: BrokerKind, workdir: Path, n: int, m: int, faust_timeout: float) -> KindResult:
    result = KindResult(kind)
    kind_dir = workdir / kind
    broker = EmbeddedBroker(kind, data_dir=kind_dir / "data")
    began = time.perf_counter()
    with broker:
        result.start_s = time.perf_counter() - began
        bs = broker.bootstrap
        parts = 4
        create_topics(
            bs,
            [
                TopicSpec("check.join", parts, "group join"),
                TopicSpec("check.offsets", parts, "end offsets"),
                TopicSpec("check.idem", 1, "idempotent producers"),
                TopicSpec("check.tx", 1, "transactions"),
                TopicSpec("check.persist", 1, "restart"),
            ],
        )
        asyncio.run(_produce_to_partitions(bs, "check.join", parts, parts))
        for _ in range(2):
            try:
                result.join_s.append(asyncio.run(_group_join_seconds(bs, "check.join")))
            except Exception as exc:
                result.errors.append(f"group join: {_describe(exc)}")

        asyncio.run(_produce_to_partitions(bs, "check.offsets", n, parts))
        result.end_offsets_expected = {p: len(range(p, n, parts)) for p in range(parts)}
        try:
            result.end_offsets_got = asyncio.run(_end_offsets(bs, "check.offsets", parts))
            result.records_fetched = len(asyncio.run(_fetch_count(bs, "check.offsets")))
        except Exception as exc:
            result.errors.append(f"end offsets: {_describe(exc)}")

        result.idempotent_aiokafka = _attempt(
            result,
            "idempotent aiokafka",
            lambda: asyncio.run(_idempotent_aiokafka(bs, "check.idem")),
        )
        result.idempotent_kafka_python = _attempt(
            result, "idempotent kafka-python", lambda: _idempotent_kafka_python(bs, "check.idem")
        )
        result.transactions = _attempt(
            result, "transactions", lambda: asyncio.run(_transactions(bs, "check.tx"))
        )
        result.auto_create_on_produce = _attempt(
            result, "auto-create", lambda: asyncio.run(_auto_create(bs))
        )

        try:
            result.faust = _faust_recovery(bs, kind_dir, n, m, faust_timeout)
        except Exception as exc:
            result.faust.error = _describe(exc)
        if not broker.is_running():
            # Say so: every later failure is then the broker's death, not the check's subject.
            tail = " | ".join(broker.log_tail(6).splitlines())
            result.errors.append(f"broker died during the faust check; log: {tail}")
            broker.start()

        def persisted() -> str:
            asyncio.run(_produce_to_partitions(bs, "check.persist", 10, 1))
            broker.restart()
            if "check.persist" not in asyncio.run(_topics(bs)):
                return "no (topic gone after restart)"
            kept = asyncio.run(_end_offsets(bs, "check.persist", 1))[0]
            return "yes (10 of 10 messages)" if kept == 10 else f"partly ({kept} of 10)"

        result.survives_restart = _attempt(result, "restart", persisted)
    return result


async def _topics(bootstrap: str) -> set[str]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        return set(await consumer.topics())
    finally:
        await consumer.stop()


def _totals(totals: dict[str, int]) -> str:
    return ",".join(str(totals[k]) for k in sorted(totals)) or "none"


def _fmt_seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def render(results: list[KindResult], n: int, m: int) -> str:
    rows: list[tuple[str, ...]] = [("", *(r.kind for r in results))]

    def row(label: str, get: Callable[[KindResult], str]) -> None:
        rows.append((label, *(get(r) for r in results)))

    row("broker start (s)", lambda r: f"{r.start_s:.2f}")
    row("group join + 1st fetch (s), 2 groups", lambda r: " / ".join(f"{s:.2f}" for s in r.join_s))
    row(
        f"end offsets after {n} batched (expected)",
        lambda r: f"{list(r.end_offsets_got.values())} ({list(r.end_offsets_expected.values())})",
    )
    row("records fetched back", lambda r: str(r.records_fetched))
    row(f"faust: 1st worker counted N={n} (s)", lambda r: _fmt_seconds(r.faust.first_count_s))
    row("faust: SIGTERM stop (s)", lambda r: _fmt_seconds(r.faust.stop_s))
    row(
        f"faust: 2nd worker recovered {n // KEYS}/key (s)",
        lambda r: _fmt_seconds(r.faust.recovered_s),
    )
    row("faust: 2nd worker totals after recovery", lambda r: _totals(r.faust.totals_recovered))
    row(
        f"faust: +M={m}, totals (expected {(n + m) // KEYS})",
        lambda r: _totals(r.faust.totals_after_m),
    )
    row("faust: restart recovery correct", lambda r: "yes" if r.faust.ok else "NO")
    row(
        f"faust: 3rd worker, +M during startup (expected {(n + 2 * m) // KEYS})",
        lambda r: _totals(r.faust.totals_racing),
    )
    row("idempotent producer, aiokafka", lambda r: r.idempotent_aiokafka)
    row("idempotent producer, kafka-python", lambda r: r.idempotent_kafka_python)
    row("transactions (aiokafka)", lambda r: r.transactions)
    row("auto-creates topic on produce", lambda r: r.auto_create_on_produce)
    row("data kept across broker restart", lambda r: r.survives_restart)
    widths = [max(len(cells[i]) for cells in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--kinds", default=",".join(BROKER_KINDS))
    parser.add_argument("--n", type=int, default=2000, help="messages before the restart")
    parser.add_argument("--m", type=int, default=800, help="messages after the restart")
    parser.add_argument("--faust-timeout", type=float, default=90.0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--workdir", type=Path, help="keep data and logs here (default: temp)")
    args = parser.parse_args(argv)
    requested = [name.strip() for name in str(args.kinds).split(",") if name.strip()]
    for name in requested:
        if name not in BROKER_KINDS:
            parser.error(f"unknown kind {name!r}; choose from {BROKER_KINDS}")
    kinds: list[BrokerKind] = [kind for kind in BROKER_KINDS if kind in requested]
    if args.n % KEYS or args.m % KEYS or args.n <= 0 or args.m <= 0:
        parser.error(f"--n and --m must be positive multiples of {KEYS} (the number of keys)")

    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = args.workdir.resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="broker-check-")))
        results = []
        for kind in kinds:
            print(f"checking {kind} ...", file=sys.stderr, flush=True)
            results.append(check_kind(kind, workdir, args.n, args.m, args.faust_timeout))
    print(
        f"broker_check {time.strftime('%Y-%m-%d %H:%M')} | {platform.machine()}, "
        f"{os.cpu_count()} cores | N={args.n} M={args.m} keys={KEYS}"
    )
    print(render(results, args.n, args.m))
    for r in results:
        for problem in [*r.errors, *([f"faust: {r.faust.error}"] if r.faust.error else [])]:
            print(f"[{r.kind}] {problem}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
