"""Latency from producing an event to its row being queryable; issue 6, 3.

Target (issue 6, "Latency"): at a steady 2,000 events/s, an event's row is queryable in
the warehouse within 2 s (99th percentile).

Method:

1. A fresh embedded broker (noida-db) with the pipeline's topics; one worker
   (``python -m pipeline.cli worker`` with CSI_WAREHOUSE=chdb://<dir>, CSI_REGISTRY,
   CSI_FETCH_HOLD_MS=200, Faust's commit interval as deployed), started and waited for
   until its consumer group is Stable, so startup is not in any latency.
2. ``--rate`` x ``--seconds`` simulated events (all five types, simulator proportions,
   ``--dealers`` dealers), encoded beforehand, are sent on a fixed schedule (event i is
   due i / rate seconds after the start) with kafka-python (acks=all, linger
   ``--linger-ms``, 20 ms like `pipeline.producer.EventProducer`). An event's produce
   time is the wall-clock time the benchmark handed it to the producer; its partition and
   offset come from the broker's acknowledgement.
3. Two arrival times are recorded for every event:

   * queryable: the worker runs through a shim (this script with ``--worker-shim``) that
     wraps the warehouse the worker opens (`pipeline.worker.open_warehouse`) and writes
     the wall-clock time at which each INSERT into csi.events *returned*, with the
     event_ids of its rows. From that moment a query on the warehouse returns the row (a
     chdb INSERT is synchronous). The shim changes nothing else: same code, same sinks,
     same flush policy. The worker owns the chdb directory, so nothing can query it while
     it runs; this records the moment instead of polling for it.
   * committed: the first time the worker's consumer group had committed an offset past
     the event's record, from committed offsets polled every ``--poll`` s (0.1) without
     joining the group (resolution: the poll interval).

   What lies between (pipeline/worker.py, as read for this benchmark): the ingest agent
   takes batches (`take_events`, up to CSI_BATCH_MAX=2000 records or CSI_BATCH_WITHIN=0.5 s),
   the processor builds the rows, and they go to a BatchingSink that writes one INSERT
   when it holds CSI_SINK_MAX_ROWS=1000 rows or its oldest row is CSI_SINK_MAX_AGE=1 s old
   (checked after every batch and by a 0.5 s timer). Offsets are committed by Faust's
   commit timer (2.8 s) from the offsets the agent has processed (OffsetGuard); the commit
   does not wait for the sink flush, so "committed" may come before or after
   "queryable", and neither implies the other.

4. After the last event is sent, the benchmark waits until every input record is
   committed, lets the sinks flush, and stops the worker (SIGTERM; the sinks flush last).
   Latency = arrival - produce time; p50, p90, p99 and max over all events are printed
   for both definitions, with the rate actually sent and whether the worker kept up
   (if it does not, latency is mostly time spent waiting in the backlog).

The output ends with (queryable if it was recorded for every event, else committed;
the definition is printed on the line before)::

    BENCH latency_p99 <seconds> s target 2 ok|short

Usage::

    .venv/bin/python benchmarks/latency.py [--rate 2000] [--seconds 60] [--dealers 1000]
        [--seed 7] [--poll 0.1] [--linger-ms 20] [--timeout 1800] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import bisect
import math
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from common import (
    INPUT_PARTITIONS,
    PYTHON,
    GroupWatcher,
    Processes,
    Produced,
    Record,
    WorkerSpec,
    bench_line,
    describe_machine,
    encode,
    handle_sigterm,
    load_average,
    print_flush,
    run_main,
    running_broker,
    simulated_events,
    start_worker,
    wait_group_stable,
    work_directory,
    write_simulated_registry,
)
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

TARGET_P99_S = 2.0
SCRIPT = Path(__file__).resolve()
PACING_STEP_S = 0.005


# ----------------------------------------------------------------------------- worker shim


class RecordingWarehouse:
    """A Warehouse that notes when each csi.events INSERT returned, and which event_ids
    it held; everything else is passed through unchanged."""

    def __init__(self, inner: Any, out: IO[str], events_table: str) -> None:
        self.inner = inner
        self.out = out
        self.events_table = events_table
        self.lock = threading.Lock()

    def execute(self, sql: str) -> None:
        self.inner.execute(sql)

    def query(self, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        result: tuple[list[str], list[tuple[Any, ...]]] = self.inner.query(sql)
        return result

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.inner.insert(table, columns, rows)
        if table != self.events_table:
            return
        returned = time.time()
        index = list(columns).index("event_id")
        text = "".join(f"{returned:.6f} {row[index]}\n" for row in rows)
        with self.lock:
            self.out.write(text)
            self.out.flush()

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def run_worker_shim(out_path: Path) -> int:
    """`csi worker`, with the warehouse it opens wrapped in a RecordingWarehouse."""
    import pipeline.warehouse as warehouse_module
    import pipeline.worker as worker_module
    from pipeline.cli import main as csi_main

    original = vars(worker_module).get("open_warehouse", warehouse_module.open_warehouse)
    out = open(out_path, "a", encoding="utf-8")  # noqa: SIM115 - open while the worker runs

    def recording_open(url: str) -> Any:
        return RecordingWarehouse(original(url), out, warehouse_module.EVENTS_TABLE)

    # Where the worker looks the function up now, and where it would after a refactor.
    for module in (worker_module, warehouse_module):
        vars(module)["open_warehouse"] = recording_open
    try:
        return csi_main(["worker"])
    finally:
        out.close()


# ----------------------------------------------------------------------------- measuring


@dataclass
class CommitLog:
    """(wall time, committed offset) samples per input partition, from a poller thread."""

    samples: dict[TopicPartition, list[tuple[float, int]]] = field(default_factory=dict)
    error: BaseException | None = None

    def arrival(self, tp: TopicPartition, offset: int) -> float | None:
        """First sample time at which the partition's committed offset was past ``offset``."""
        series = self.samples.get(tp, [])
        offsets = [o for _, o in series]
        i = bisect.bisect_right(offsets, offset)  # committed > offset
        return series[i][0] if i < len(series) else None

    def total(self) -> int:
        return sum(series[-1][1] for series in self.samples.values() if series)


def poll_commits(
    bootstrap: str, group: str, interval_s: float, log: CommitLog, stop: threading.Event
) -> None:
    try:
        client = KafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group, client_id="csi-bench-latency",
            enable_auto_commit=False,
        )  # fmt: skip
        try:
            while not stop.is_set():
                began = time.monotonic()
                for tp in INPUT_PARTITIONS:
                    committed = client.committed(tp) or 0
                    series = log.samples.setdefault(tp, [])
                    if not series or committed != series[-1][1]:
                        series.append((time.time(), committed))
                stop.wait(max(interval_s - (time.monotonic() - began), 0.0))
        finally:
            client.close()
    except BaseException as exc:
        log.error = exc


@dataclass
class Sent:
    at: list[float]
    """Wall-clock produce time per event."""
    tps: list[TopicPartition]
    offsets: list[int]
    seconds: float


def send_paced(bootstrap: str, records: Sequence[Record], rate: float, linger_ms: int) -> Sent:
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=linger_ms, acks="all",
        enable_idempotence=False, allow_auto_create_topics=False,
    )  # fmt: skip
    at: list[float] = []
    futures: list[Any] = []
    try:
        started = time.monotonic()
        for i, record in enumerate(records):
            due = started + i / rate
            while (wait := due - time.monotonic()) > 0:
                time.sleep(min(wait, PACING_STEP_S))
            at.append(time.time())
            futures.append(producer.send(record.topic, value=record.value, key=record.key))
        producer.flush()
        seconds = time.monotonic() - started
        metadata = [f.get(timeout=60) for f in futures]
    finally:
        producer.close()
    return Sent(
        at, [TopicPartition(m.topic, m.partition) for m in metadata],
        [m.offset for m in metadata], seconds,
    )  # fmt: skip


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(math.ceil(q / 100 * len(ordered)), 1)
    return ordered[rank - 1]


def summary(latencies: Sequence[float]) -> str:
    return (
        f"p50 {percentile(latencies, 50):.3f} s, p90 {percentile(latencies, 90):.3f} s, "
        f"p99 {percentile(latencies, 99):.3f} s, max {max(latencies, default=math.nan):.3f} s "
        f"over {len(latencies):,} events"
    )


def read_queryable(path: Path) -> dict[str, float]:
    """event_id -> first time an INSERT holding its row returned."""
    arrived: dict[str, float] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return arrived
    for line in lines:
        moment, _, event_id = line.partition(" ")
        if event_id and event_id not in arrived:
            arrived[event_id] = float(moment)
    return arrived


def events_needed(dealers: int, count: int, seed: int) -> list[Record]:
    """The first ``count`` events of a simulation long enough to hold them."""
    days = max(3, math.ceil(count / (dealers * 8)) + 3)
    while True:
        records: list[Record] = []
        for record in encode(simulated_events(dealers, days, seed)):
            records.append(record)
            if len(records) == count:
                return records
        days *= 2


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=2000.0, help="events/s to send")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to send")
    parser.add_argument("--dealers", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--poll", type=float, default=0.1, help="committed-offset poll, s")
    parser.add_argument("--linger-ms", type=int, default=20, help="producer linger, ms")
    parser.add_argument("--timeout", type=float, default=1800.0, help="to drain, s")
    parser.add_argument("--workdir", type=Path, help="keep data and logs here (default: temp)")
    parser.add_argument("--worker-shim", type=Path, metavar="FILE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker_shim:
        return run_worker_shim(args.worker_shim)
    if args.rate <= 0 or args.seconds <= 0 or args.dealers < 1:
        parser.error("--rate, --seconds and --dealers must be positive")
    handle_sigterm()
    print_flush(f"latency: {describe_machine()}")
    count = max(int(args.rate * args.seconds), 1)
    with work_directory(args.workdir, "csi-bench-latency-") as workdir:
        registry = write_simulated_registry(args.dealers, args.seed, workdir / "dealers.csv")
        records = events_needed(args.dealers, count, args.seed)
        mix = Produced(len(records), 0.0, Counter(r.event_type for r in records)).mix()
        print_flush(
            f"input: {count:,} events of {args.dealers:,} dealers ({mix}), "
            f"{args.rate:,.0f} events/s for {args.seconds:.0f} s"
        )
        arrivals_path = workdir / "queryable.txt"
        group = f"bench-latency-{uuid.uuid4().hex[:6]}"
        commits = CommitLog()
        stop_polling = threading.Event()
        with running_broker(workdir, discard=True) as broker:
            spec = WorkerSpec(broker.bootstrap, group, workdir / "worker", registry)
            with Processes() as processes, GroupWatcher(broker.bootstrap, group) as watcher:
                worker = start_worker(
                    processes, spec, "worker",
                    argv=(PYTHON, str(SCRIPT), "--worker-shim", str(arrivals_path)),
                )  # fmt: skip
                joined_s = wait_group_stable(watcher, 1, processes)
                print_flush(f"worker joined its group {joined_s:.1f} s after the check began")
                poller = threading.Thread(
                    target=poll_commits,
                    args=(broker.bootstrap, group, args.poll, commits, stop_polling),
                    daemon=True,
                )
                poller.start()
                try:
                    load = load_average()
                    sent = send_paced(broker.bootstrap, records, args.rate, args.linger_ms)
                    print_flush(
                        f"sent {len(sent.at):,} events in {sent.seconds:.1f} s = "
                        f"{len(sent.at) / sent.seconds:,.0f} events/s (load average {load:.2f})"
                    )
                    sent_done = time.time()
                    deadline = time.monotonic() + args.timeout
                    while commits.total() < len(sent.at):
                        processes.check()
                        if commits.error is not None:
                            raise RuntimeError(f"offset poller failed: {commits.error!r}")
                        if time.monotonic() > deadline:
                            raise TimeoutError(
                                f"{commits.total():,} of {len(sent.at):,} committed after "
                                f"{args.timeout:.0f} s"
                            )
                        time.sleep(0.2)
                    drained_s = time.time() - sent_done
                    time.sleep(2.0)  # sinks flush rows at most 1 s old, on a 0.5 s timer
                finally:
                    stop_polling.set()
                    poller.join(timeout=10)
                processes.stop(worker)
                if worker.popen.returncode not in (0, -15):
                    print_flush(f"worker exited with {worker.popen.returncode}:")
                    print_flush(worker.log_tail(1500))
        queryable_at = read_queryable(arrivals_path)
        committed_lat: list[float] = []
        queryable_lat: list[float] = []
        missing_commit = missing_row = 0
        for record, at, tp, offset in zip(records, sent.at, sent.tps, sent.offsets, strict=True):
            arrived = commits.arrival(tp, offset)
            if arrived is None:
                missing_commit += 1
            else:
                committed_lat.append(arrived - at)
            row_at = queryable_at.get(record.event_id)
            if row_at is None:
                missing_row += 1
            else:
                queryable_lat.append(row_at - at)

    consumed_rate = len(sent.at) / (sent.seconds + drained_s)
    kept_up = drained_s < 5.0
    print_flush(
        f"the worker had committed everything {drained_s:.1f} s after the last send: "
        + (
            "it kept up"
            if kept_up
            else f"it fell behind (about {consumed_rate:,.0f} events/s overall): the latencies "
            "below are mostly time spent waiting in the backlog"
        )
    )
    print_flush(
        f"produce -> committed (consumer group offset past the record; polled every "
        f"{args.poll} s): {summary(committed_lat)}"
        + (f"; {missing_commit:,} never seen committed" if missing_commit else "")
    )
    print_flush(
        "produce -> queryable (INSERT into csi.events holding the row returned in the "
        f"worker): {summary(queryable_lat) if queryable_lat else 'not recorded'}"
        + (f"; {missing_row:,} rows never written" if missing_row else "")
    )
    if queryable_lat and not missing_row:
        definition, figure = "queryable", percentile(queryable_lat, 99)
    else:
        definition, figure = "committed", percentile(committed_lat, 99)
        print_flush("(the queryable times were not recorded for every event: see above)")
    print_flush(f"figure on the BENCH line: p99 of produce -> {definition}")
    print_flush(bench_line("latency_p99", figure, "s", TARGET_P99_S, higher_is_better=False))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
