"""Resident memory of a worker holding 1,000 dealers x 100 days of buckets; issue 6, 4.

Target (issue 6, "Memory"): a worker that has consumed 1,000 dealers x 100 days of
events (its Faust tables then hold every dealer's and roll-up's daily buckets) stays
below 1,024 MB resident.

Method:

1. A fresh embedded broker (noida-db) with the pipeline's topics; one worker
   (``python -m pipeline.cli worker``, CSI_WAREHOUSE=chdb://<dir>, CSI_REGISTRY,
   CSI_FETCH_HOLD_MS=200) is started and waited for until its consumer group is Stable.
2. Baseline: after ``--idle`` seconds (default 5) with no input, the idle worker's RSS.
3. ``--dealers`` x ``--days`` of simulated events (all five types, simulator proportions,
   full days up to yesterday; 1,000 x 100 is about 1.2 million) are produced from the
   simulator as they are generated, never more than ``--max-lag`` events (default 20,000)
   ahead of what the worker has committed, so the broker grows with the worker's pace.
4. When every input record is committed and the roll-up agent has caught up, and
   ``--settle`` seconds (default 5) later, the worker's RSS and peak RSS are read: VmRSS
   and VmHWM from /proc/<pid>/status, summed over the worker and any child processes it
   has (psutil is not installed; /proc is what it would read). RSS is also sampled every
   second during the run; the largest sample is printed next to VmHWM.

The figure on the BENCH line is the RSS after consumption (not the peak). Nothing is
extrapolated: with a smaller ``--days`` the output says what was measured.

The embedded broker keeps every record in memory (docs/brokers.md), and the worker writes
about ten records to Kafka per input event (changelogs, snapshots, roll-ups: printed at the
end): 1,000 dealers x 4 days (36,000 events) left noida-db at 2.2 GB resident, so 100 days
would need some 70 GB. Every 5 s the benchmark therefore deletes (Kafka DeleteRecords,
which noida-db implements and which frees its memory) the records nobody will read again:
input and roll-up records the group has committed, and the topics only other consumers
or a restart would read (csi.metrics, csi.alerts, csi.dead_letters and the group's table
changelogs) — what retention and compaction do on a real broker. A worker that is not
restarted never reads its changelogs (they are for recovery; with one worker there are no
standby replicas), so the worker does the same work either way; if the group is seen
unstable during the run (a rebalance would re-read a trimmed changelog) the output warns.
``--no-trim`` keeps everything. As a last guard, production stops when MemAvailable
(/proc/meminfo) falls below ``--min-available-mb`` (default 3072); the worker then finishes
what was produced and the figures are those of the days it got to, said so in the output.

The output ends with::

    BENCH worker_rss <MB> MB target 1024 ok|short

Usage::

    .venv/bin/python benchmarks/memory.py [--dealers 1000] [--days 100] [--seed 7]
        [--idle 5] [--settle 5] [--max-lag 20000] [--min-available-mb 3072]
        [--no-trim] [--timeout 14400] [--workdir DIR]

At the pipeline's speed when this was written (about 250 events/s with 1,000 dealers on
2 shared cores) the default run takes over an hour; ``--days 10`` about 5 minutes.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    INPUT_PARTITIONS,
    ROLLUP_PARTITIONS,
    GroupWatcher,
    Memory,
    Processes,
    WorkerSpec,
    bench_line,
    describe_machine,
    describe_output,
    encode,
    handle_sigterm,
    memory_of_tree,
    print_flush,
    run_main,
    running_broker,
    simulated_events,
    start_worker,
    topic_records,
    wait_group_stable,
    work_directory,
    write_simulated_registry,
)
from kafka import TopicPartition
from kafka.errors import KafkaError

from pipeline.broker import create_topics
from pipeline.producer import EventProducer
from pipeline.topics import ALERTS, DEAD_LETTERS, EVENT_PARTITIONS, METRICS, TopicSpec

TARGET_MB = 1024.0
CHANGELOG_TABLES = ("buckets", "rollups")
"""The worker's Faust tables (pipeline/worker.py `state_table`), without a webhook."""


class Trimmer:
    """Deletes records nobody will read again (Kafka DeleteRecords, which noida-db
    implements and which frees its memory): input and roll-up records the group has
    committed, and everything in the topics only other consumers or a restart would read
    (csi.metrics, csi.alerts, csi.dead_letters, the group's table changelogs). A worker that
    does not restart never reads its changelogs (they are for recovery), so this changes
    nothing for it; it keeps the broker's memory bounded the way retention and compaction
    would on a real broker."""

    def __init__(self, watcher: GroupWatcher, app_id: str) -> None:
        self.watcher = watcher
        self.app_id = app_id
        self.trimmed: dict[TopicPartition, int] = {}
        self.deleted = 0
        self.refused: dict[str, str] = {}
        """Topics the broker would not trim (e.g. compacted ones), with the error."""

    @staticmethod
    def precreate_changelogs(bootstrap: str, app_id: str) -> None:
        """Create the worker's table changelogs before it does, without cleanup.policy
        compact (Faust's choice), on which Kafka and noida refuse DeleteRecords; noida does
        not compact anyway. Table names as in pipeline/worker.py; a table not listed here
        gets Faust's compacted changelog and is reported as not trimmed."""
        create_topics(
            bootstrap,
            [
                TopicSpec(f"{app_id}-{table}-changelog", EVENT_PARTITIONS, f"{table} changelog")
                for table in CHANGELOG_TABLES
            ],
        )

    def run(self) -> None:
        client = self.watcher.offsets_client
        unread = [
            topic
            for topic in client.topics()
            if topic in (METRICS.name, ALERTS.name, DEAD_LETTERS.name)
            or (topic.startswith(f"{self.app_id}-") and topic.endswith("-changelog"))
        ]
        unread_tps = [
            TopicPartition(topic, p)
            for topic in unread
            for p in sorted(client.partitions_for_topic(topic) or ())
        ]
        targets = self.watcher.end_offsets(unread_tps)
        targets.update(self.watcher.committed([*INPUT_PARTITIONS, *ROLLUP_PARTITIONS]))
        todo = {
            tp: n
            for tp, n in targets.items()
            if n > self.trimmed.get(tp, 0) and tp.topic not in self.refused
        }
        for topic in sorted({tp.topic for tp in todo}):
            part = {tp: n for tp, n in todo.items() if tp.topic == topic}
            try:
                self.watcher.admin.delete_records(part)
            except KafkaError as exc:
                self.refused[topic] = type(exc).__name__
                continue
            for tp, n in part.items():
                self.deleted += n - self.trimmed.get(tp, 0)
                self.trimmed[tp] = n


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


@dataclass
class Feed:
    """State shared by the producing thread and the main loop."""

    committed: int = 0
    produced: int = 0
    last_day: str = ""
    by_type: Counter[str] = field(default_factory=Counter)
    stop: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


def feed_events(
    bootstrap: str, dealers: int, days: int, seed: int, max_lag: int, feed: Feed
) -> None:
    """Produce the simulation, keeping at most ``max_lag`` events ahead of the commits."""
    try:
        with EventProducer(bootstrap) as producer:
            for record in encode(simulated_events(dealers, days, seed)):
                while feed.produced - feed.committed >= max_lag and not feed.stop.is_set():
                    producer.flush()
                    time.sleep(0.1)
                if feed.stop.is_set():
                    break
                producer.send_raw(record.topic, record.value, record.key)
                feed.produced += 1
                feed.by_type[record.event_type] += 1
                if feed.produced % 1000 == 0:
                    feed.last_day = _day_of(record.value)
    except BaseException as exc:
        feed.error = exc
    finally:
        feed.done.set()


def _day_of(value: bytes) -> str:
    marker = value.find(b'"occurred_at":"')
    return value[marker + 15 : marker + 25].decode() if marker >= 0 else "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dealers", type=int, default=1000)
    parser.add_argument("--days", type=int, default=100, help="full days up to yesterday")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--idle", type=float, default=5.0, help="idle s before the baseline")
    parser.add_argument("--settle", type=float, default=5.0, help="s after consumption")
    parser.add_argument("--max-lag", type=int, default=20_000, help="events ahead of commits")
    parser.add_argument("--min-available-mb", type=float, default=3072.0)
    parser.add_argument(
        "--no-trim", action="store_true",
        help="keep every record on the broker (noida then holds it all in memory)",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=14_400.0, help="s for the whole feed")
    parser.add_argument("--workdir", type=Path, help="keep data and logs here (default: temp)")
    args = parser.parse_args(argv)
    if args.dealers < 1 or args.days < 1 or args.max_lag < 1:
        parser.error("--dealers, --days and --max-lag must be at least 1")
    handle_sigterm()
    print_flush(f"memory: {describe_machine()}; {mem_available_mb():,.0f} MB available")
    feed = Feed()
    aborted = ""
    peak_sample = 0
    with work_directory(args.workdir, "csi-bench-memory-") as workdir:
        registry = write_simulated_registry(args.dealers, args.seed, workdir / "dealers.csv")
        group = f"bench-memory-{uuid.uuid4().hex[:6]}"
        with running_broker(workdir, discard=True) as broker:
            assert broker.pid is not None
            spec = WorkerSpec(broker.bootstrap, group, workdir / "worker", registry)
            if not args.no_trim:
                Trimmer.precreate_changelogs(broker.bootstrap, group)
            with Processes() as processes, GroupWatcher(broker.bootstrap, group) as watcher:
                worker = start_worker(processes, spec, "worker")
                wait_group_stable(watcher, 1, processes)
                time.sleep(args.idle)
                idle = memory_of_tree(worker.pid)
                print_flush(
                    f"idle worker after {args.idle:.0f} s: RSS {idle.rss_mb:,.0f} MB "
                    f"(pids {list(idle.pids)})"
                )
                producer = threading.Thread(
                    target=feed_events,
                    args=(broker.bootstrap, args.dealers, args.days, args.seed, args.max_lag,
                          feed),
                    daemon=True,
                )  # fmt: skip
                trimmer = None if args.no_trim else Trimmer(watcher, group)
                unstable = 0
                started = time.monotonic()
                producer.start()
                last_report = last_trim = started
                try:
                    while True:
                        processes.check()
                        if feed.error is not None:
                            raise RuntimeError(f"producing failed: {feed.error!r}")
                        feed.committed = watcher.input_committed()
                        sample = memory_of_tree(worker.pid)
                        peak_sample = max(peak_sample, sample.rss_bytes)
                        available = mem_available_mb()
                        if available < args.min_available_mb and not feed.stop.is_set():
                            aborted = (
                                f"production stopped after {feed.produced:,} events (up to "
                                f"{feed.last_day}): {available:,.0f} MB available on the "
                                f"machine, under --min-available-mb {args.min_available_mb:,.0f}"
                            )
                            print_flush(aborted)
                            feed.stop.set()
                        if (
                            feed.done.is_set()
                            and feed.committed >= feed.produced
                            and watcher.rollups_behind() == 0
                        ):
                            break
                        now = time.monotonic()
                        if trimmer is not None and now - last_trim >= 5:
                            last_trim = now
                            trimmer.run()
                            state, members = watcher.members()
                            if state.lower() != "stable" or members != 1:
                                unstable += 1
                        if now - last_report >= 30:
                            last_report = now
                            broker_mem = memory_of_tree(broker.pid)
                            print_flush(
                                f"  [{now - started:5.0f} s] produced {feed.produced:,} (up to "
                                f"{feed.last_day or '?'}), committed {feed.committed:,}; worker "
                                f"RSS {sample.rss_mb:,.0f} MB, broker RSS "
                                f"{broker_mem.rss_mb:,.0f} MB; {available:,.0f} MB available"
                            )
                        if now - started > args.timeout:
                            raise TimeoutError(
                                f"not consumed after {args.timeout:.0f} s: produced "
                                f"{feed.produced:,}, committed {feed.committed:,}"
                            )
                        time.sleep(1.0)
                finally:
                    feed.stop.set()
                    producer.join(timeout=30)
                consumed_s = time.monotonic() - started
                time.sleep(args.settle)
                after: Memory = memory_of_tree(worker.pid)
                broker_after = memory_of_tree(broker.pid)
                processes.stop(worker)
            output = describe_output(topic_records(broker.bootstrap), feed.produced)

    mix = ", ".join(f"{kind} {n:,}" for kind, n in feed.by_type.most_common())
    print_flush(
        f"consumed {feed.produced:,} events ({mix}) of {args.dealers:,} dealers"
        + (
            f" over {args.days} days"
            if not aborted
            else f", days up to {feed.last_day} of the {args.days} asked for"
        )
        + f", in {consumed_s:,.0f} s"
    )
    if aborted:
        print_flush(f"PARTIAL: {aborted}; the figures below are for what was consumed")
    print_flush(f"the worker wrote to Kafka: {output}")
    print_flush(
        f"broker (noida-db, everything in memory) RSS: {broker_after.rss_mb:,.0f} MB; "
        + (
            "nothing trimmed (--no-trim)"
            if trimmer is None
            else f"{trimmer.deleted:,} records no longer needed were deleted during the run"
            + "".join(f"; {t} not trimmed ({e})" for t, e in sorted(trimmer.refused.items()))
        )
    )
    if unstable:
        print_flush(
            f"WARNING: the group was not stable with one member at {unstable} check(s): "
            "if the worker rebalanced and re-read a trimmed changelog, its tables may be "
            "incomplete and the RSS below too low; rerun with --no-trim and fewer --days"
        )
    print_flush(
        f"worker RSS: idle {idle.rss_mb:,.0f} MB (baseline); after consumption "
        f"{after.rss_mb:,.0f} MB = {after.rss_bytes / max(idle.rss_bytes, 1):.1f}x idle; "
        f"peak (VmHWM) {after.peak_mb:,.0f} MB; largest 1 s sample {peak_sample / 2**20:,.0f} MB"
    )
    figure = round(after.rss_mb)
    print_flush(bench_line("worker_rss", figure, "MB", TARGET_MB, higher_is_better=False))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
