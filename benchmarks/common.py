"""Shared helpers of the issue-6 pipeline benchmarks (throughput, scaling, latency, memory).

What is here: start the embedded broker (noida-db) with the pipeline's topics; simulate a
mixed stream (`pipeline.simulator.simulate`, all five event types in the simulator's
proportions) and produce it; start and stop `csi worker` subprocesses with CSI_* settings;
read a consumer group's committed offsets without joining the group (to know how much
input a worker has finished); wait for a group to be stable; read a process tree's memory
(/proc); query a worker's chdb warehouse after it stopped (`csi query`, a subprocess,
because one process can hold only one chdb data directory); format the `BENCH` line.

Every process started through `Processes` is stopped (SIGTERM to its process group, then
SIGKILL) when the `with` block ends, on an exception or Ctrl-C too; `handle_sigterm()` makes
a SIGTERM sent to the benchmark itself unwind the same way.

The benchmarks run as scripts (``.venv/bin/python benchmarks/NAME.py``), so this module is
imported as ``common`` from the script's directory, like ``faust_counter`` in broker_check.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

import orjson
from kafka import KafkaConsumer, TopicPartition

from pipeline.broker import EmbeddedBroker, create_topics
from pipeline.producer import EventProducer, record_for
from pipeline.registry import write_registry
from pipeline.runner import EMBEDDED_FETCH_HOLD_MS
from pipeline.simulator import simulate, simulated_registry
from pipeline.topics import CASE_ACTIONS, EVENT_TOPICS, ROLLUPS

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

INPUT_TOPICS: tuple[str, ...] = (*(spec.name for spec in EVENT_TOPICS.values()), CASE_ACTIONS.name)
"""What the worker's ingest agent consumes: the five event topics and the case actions."""
INPUT_PARTITIONS: tuple[TopicPartition, ...] = tuple(
    TopicPartition(spec.name, p)
    for spec in (*EVENT_TOPICS.values(), CASE_ACTIONS)
    for p in range(spec.partitions)
)
ROLLUP_PARTITIONS: tuple[TopicPartition, ...] = tuple(
    TopicPartition(ROLLUPS.name, p) for p in range(ROLLUPS.partitions)
)

POLL_INTERVAL_S = 0.2
"""How often committed offsets are read while waiting for consumption."""


# ----------------------------------------------------------------------------- the run


def handle_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so `finally` blocks stop every child process."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def run_main(main: Callable[[], int]) -> int:
    """Run a benchmark's main(); Ctrl-C or SIGTERM: exit status 130 without a traceback
    (the `with` blocks have stopped every process by the time it gets here)."""
    try:
        return main()
    except KeyboardInterrupt:
        print("interrupted; every process this benchmark started has been stopped", flush=True)
        return 130


@contextlib.contextmanager
def work_directory(keep: Path | None, prefix: str) -> Iterator[Path]:
    """``keep`` (created, left in place) or a temporary directory removed afterwards."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep.resolve()
        return
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def describe_machine() -> str:
    """One line on where and under what load the figures were taken."""
    load1, load5, _ = os.getloadavg()
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"load average {load1:.2f} (1 min) {load5:.2f} (5 min) at start: other work on "
        "this machine shares the cores, compare figures of the same run only"
    )


def load_average() -> float:
    return os.getloadavg()[0]


def median(values: Sequence[float]) -> float:
    """Median of the values that are numbers (a run that could not measure is NaN)."""
    numbers = [v for v in values if not math.isnan(v)]
    return float(statistics.median(numbers)) if numbers else math.nan


def bench_line(
    name: str, figure: float, unit: str, target: float, *, higher_is_better: bool
) -> str:
    """``BENCH <name> <figure> <unit> target <target> ok|short`` (a NaN figure is short)."""
    met = figure >= target if higher_is_better else figure <= target
    ok = met and not math.isnan(figure)
    return f"BENCH {name} {_number(figure)} {unit} target {_number(target)} " + (
        "ok" if ok else "short"
    )


def _number(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


# ----------------------------------------------------------------------------- broker, input


@contextlib.contextmanager
def running_broker(directory: Path, *, discard: bool = False) -> Iterator[EmbeddedBroker]:
    """A fresh noida-db broker in ``directory`` with every pipeline topic; stopped on exit.

    noida, not Tansu: its offsets are right and its group joins fast (docs/brokers.md).
    noida keeps every record in memory and in one JSON snapshot, and the worker writes
    much more than it reads (changelogs, snapshots, roll-ups): with ``discard`` the broker
    is killed on exit instead of writing its snapshot, and its data directory removed.
    """
    (directory / "logs").mkdir(parents=True, exist_ok=True)
    data_dir = directory / "broker"
    broker = EmbeddedBroker("noida", data_dir=data_dir, log_path=directory / "logs" / "broker.log")
    broker.start()
    try:
        create_topics(broker.bootstrap)
        yield broker
    finally:
        if discard:
            broker.kill()
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            broker.stop(timeout=120)


def topic_records(bootstrap: str) -> dict[str, int]:
    """Records in every topic on the broker (sum of end offsets), by topic name."""
    client = KafkaConsumer(bootstrap_servers=bootstrap, client_id="csi-bench-topics")
    try:
        partitions = [
            TopicPartition(topic, p)
            for topic in client.topics()
            for p in sorted(client.partitions_for_topic(topic) or ())
        ]
        ends: dict[TopicPartition, int] = client.end_offsets(partitions)
    finally:
        client.close()
    totals: Counter[str] = Counter()
    for tp, end in ends.items():
        totals[tp.topic] += end
    return dict(totals)


def describe_output(records: Mapping[str, int], input_events: int) -> str:
    """What a worker wrote to Kafka per input event, topic by topic (input topics left out)."""
    written = {t: n for t, n in records.items() if t not in INPUT_TOPICS and n}
    total = sum(written.values())
    parts = ", ".join(
        f"{topic} {n / max(input_events, 1):.2f}"
        for topic, n in sorted(written.items(), key=lambda item: -item[1])
    )
    return f"{total / max(input_events, 1):.2f} records per input event ({parts})"


def last_full_day() -> date:
    """Yesterday (UTC): simulations end there, so every simulated day is complete."""
    return datetime.now(UTC).date() - timedelta(days=1)


def simulated_events(dealers: int, days: int, seed: int) -> Iterator[dict[str, Any]]:
    """All five event types for ``days`` full days up to yesterday, in event-time order."""
    return simulate(dealers, days, end=last_full_day(), seed=seed)


def write_simulated_registry(dealers: int, seed: int, path: Path) -> Path:
    """The registry of the simulated dealers (the worker's CSI_REGISTRY)."""
    write_registry(simulated_registry(dealers, seed=seed), path)
    return path


@dataclass
class Produced:
    count: int = 0
    seconds: float = 0.0
    by_type: Counter[str] = field(default_factory=Counter)

    def mix(self) -> str:
        return ", ".join(
            f"{kind} {n:,} ({100 * n / max(self.count, 1):.0f}%)"
            for kind, n in self.by_type.most_common()
        )


@dataclass(frozen=True)
class Record:
    """One event as the producer sends it (`pipeline.producer.record_for`)."""

    topic: str
    key: bytes
    value: bytes
    event_type: str
    event_id: str


def encode(events: Iterable[dict[str, Any]]) -> Iterator[Record]:
    for event in events:
        topic, key, value = record_for(event)
        yield Record(topic, key, value, event["event_type"], event["event_id"])


def produce(bootstrap: str, records: Iterable[Record]) -> Produced:
    """Send every record as fast as the producer goes, then flush (which raises if any
    record was not delivered)."""
    result = Produced()
    started = time.monotonic()
    with EventProducer(bootstrap) as producer:
        for record in records:
            producer.send_raw(record.topic, record.value, record.key)
            result.by_type[record.event_type] += 1
            result.count += 1
    result.seconds = time.monotonic() - started
    return result


# ----------------------------------------------------------------------------- processes


@dataclass
class Child:
    """A process this benchmark started, with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


class ChildFailedError(RuntimeError):
    """A worker (or other child) exited while the benchmark still needed it."""

    def __init__(self, child: Child) -> None:
        super().__init__(
            f"{child.name} (pid {child.pid}) exited with {child.popen.returncode}; "
            f"log {child.log_path}, its end:\n{child.log_tail()}"
        )


class Processes:
    """Starts children in their own process groups and stops every one of them on exit.

    A child in its own session does not get the terminal's Ctrl-C; this object stops it
    in order instead (SIGTERM to the group, so a Faust worker stops gracefully and its
    sinks flush; SIGKILL after ``stop_timeout_s``).
    """

    def __init__(self, stop_timeout_s: float = 60.0) -> None:
        self.children: list[Child] = []
        self.stop_timeout_s = stop_timeout_s

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    def start(
        self, name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path
    ) -> Child:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                list(argv),
                env=dict(env),
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        child = Child(name, popen, log_path)
        self.children.append(child)
        return child

    def stop(self, child: Child, timeout_s: float | None = None) -> float:
        """SIGTERM, wait, SIGKILL if need be; return the seconds the stop took."""
        started = time.monotonic()
        if child.popen.poll() is None:
            _signal_group(child.popen, signal.SIGTERM)
            try:
                child.popen.wait(self.stop_timeout_s if timeout_s is None else timeout_s)
            except subprocess.TimeoutExpired:
                print(f"{child.name} ignored SIGTERM; killing it", file=sys.stderr)
                _signal_group(child.popen, signal.SIGKILL)
                child.popen.wait()
        else:
            _signal_group(child.popen, signal.SIGKILL)  # leftovers in its group, if any
        return time.monotonic() - started

    def stop_all(self) -> None:
        # Newest first; a second Ctrl-C while stopping must not leave the rest running.
        for child in reversed(self.children):
            try:
                self.stop(child)
            except KeyboardInterrupt:
                _signal_group(child.popen, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    child.popen.wait(5)
        self.children.clear()

    def check(self) -> None:
        """Raise ChildFailedError if any child has exited."""
        for child in self.children:
            if not child.alive():
                raise ChildFailedError(child)


def _signal_group(popen: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # The group id is the child's pid (start_new_session); it is signalled only while the
    # child is unreaped, or right after reaping its group leader, never a recycled pid's.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, sig)


@dataclass(frozen=True)
class WorkerSpec:
    """Where one `csi worker` process keeps its things."""

    bootstrap: str
    app_id: str
    """The consumer group (and changelog prefix): fresh per measured run."""
    directory: Path
    """Its own data dir (Faust state) with the chdb warehouse inside."""
    registry: Path

    @property
    def warehouse(self) -> str:
        return f"chdb://{self.directory / 'warehouse'}"

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return {
            **os.environ,
            "CSI_BOOTSTRAP": self.bootstrap,
            "CSI_APP_ID": self.app_id,
            "CSI_DATA_DIR": str(self.directory),
            "CSI_WAREHOUSE": self.warehouse,
            "CSI_REGISTRY": str(self.registry),
            # noida-db answers empty fetches at once; `csi run` and the tests hold them
            # 200 ms on the client (docs/brokers.md), so do the benchmarks.
            "CSI_FETCH_HOLD_MS": str(EMBEDDED_FETCH_HOLD_MS),
            **(extra or {}),
        }


WORKER_ARGV: tuple[str, ...] = (PYTHON, "-m", "pipeline.cli", "worker")


def start_worker(
    processes: Processes,
    spec: WorkerSpec,
    name: str = "worker",
    *,
    argv: Sequence[str] = WORKER_ARGV,
    extra_env: Mapping[str, str] | None = None,
) -> Child:
    spec.directory.mkdir(parents=True, exist_ok=True)
    return processes.start(name, argv, spec.env(extra_env), spec.directory / f"{name}.log")


# ----------------------------------------------------------------------------- offsets


class GroupWatcher:
    """Committed offsets and membership of a consumer group, read without joining it.

    A KafkaConsumer with the group's id that never subscribes only asks the coordinator
    for committed offsets (as `pipeline.runner.ProgressReader` does; that one also reads
    the metrics topic, which would cost this process CPU the workers need).
    """

    def __init__(self, bootstrap: str, group: str) -> None:
        from kafka.admin import KafkaAdminClient

        self.group = group
        self.committed_client = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=group,
            client_id="csi-bench-committed",
            enable_auto_commit=False,
        )
        self.offsets_client = KafkaConsumer(
            bootstrap_servers=bootstrap, client_id="csi-bench-offsets"
        )
        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="csi-bench-admin")

    def close(self) -> None:
        for client in (self.committed_client, self.offsets_client, self.admin):
            with contextlib.suppress(Exception):
                client.close()

    def __enter__(self) -> GroupWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def committed(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """The group's committed offset per partition (0 where nothing is committed)."""
        return {tp: self.committed_client.committed(tp) or 0 for tp in partitions}

    def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        ends: dict[TopicPartition, int] = self.offsets_client.end_offsets(list(partitions))
        return ends

    def input_committed(self) -> int:
        """Input records (events and case actions) the group has committed."""
        return sum(self.committed(INPUT_PARTITIONS).values())

    def input_produced(self) -> int:
        return sum(self.end_offsets(INPUT_PARTITIONS).values())

    def rollups_behind(self) -> int:
        """Roll-up updates produced by the ingest agent and not yet committed by `rollup`."""
        ends = self.end_offsets(ROLLUP_PARTITIONS)
        committed = self.committed(ROLLUP_PARTITIONS)
        return sum(max(ends[tp] - committed[tp], 0) for tp in ROLLUP_PARTITIONS)

    def members(self) -> tuple[str, int]:
        """(group state, number of members), e.g. ("Stable", 2)."""
        info = self.admin.describe_groups([self.group]).get(self.group) or {}
        return str(info.get("group_state", info.get("state", "?"))), len(info.get("members", []))


def wait_group_stable(
    watcher: GroupWatcher, members: int, processes: Processes, timeout_s: float = 120.0
) -> float:
    """Wait until the group is Stable with ``members`` members for two checks in a row
    (0.5 s apart); return the seconds waited."""
    started = time.monotonic()
    streak = 0
    while True:
        processes.check()
        state, count = watcher.members()
        streak = streak + 1 if (state.lower() == "stable" and count == members) else 0
        if streak >= 2:
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(
                f"group {watcher.group} not stable with {members} members after "
                f"{timeout_s:.0f} s (state {state}, {count} members)"
            )
        time.sleep(0.5)


@dataclass
class Consumption:
    """How a group worked through ``expected`` input records, from committed offsets."""

    expected: int
    started_at: float
    """monotonic time the wait began (workers started, or input produced)."""
    samples: list[tuple[float, int]] = field(default_factory=list)
    """(monotonic time, input records committed), one per poll."""
    done_at: float | None = None
    """First poll that saw every input record committed."""
    drained_at: float | None = None
    """First poll that also saw the roll-up agent caught up (if that was waited for)."""
    cpu_seconds_at: dict[str, float] = field(default_factory=dict)
    """CPU seconds of the consumer processes at the first progress ("first") and at done
    ("done"); of the broker at the same moments ("broker_first", "broker_done")."""

    @property
    def first_progress(self) -> tuple[float, int] | None:
        return next(((t, n) for t, n in self.samples if n > 0), None)

    @property
    def events_per_s(self) -> float:
        """(expected - committed at first progress) / (done - first progress): startup,
        group join and the first commit interval excluded. NaN if not measurable (not done,
        or everything came in the first commit: use more input then)."""
        first = self.first_progress
        if first is None or self.done_at is None or self.done_at <= first[0]:
            return math.nan
        return (self.expected - first[1]) / (self.done_at - first[0])

    @property
    def measured_events(self) -> int:
        first = self.first_progress
        return self.expected - first[1] if first else 0

    @property
    def window_s(self) -> float:
        first = self.first_progress
        if first is None or self.done_at is None:
            return math.nan
        return self.done_at - first[0]

    def cpu_used(self, who: str = "") -> float:
        """CPU seconds used between first progress and done by the consumer processes
        (``who=""``) or the broker (``who="broker_"``)."""
        at = self.cpu_seconds_at
        return at.get(f"{who}done", math.nan) - at.get(f"{who}first", math.nan)

    @property
    def events_per_cpu_s(self) -> float:
        """Measured events per CPU second the consumer processes used in the same window:
        less sensitive to other work on the machine than events per wall second."""
        used = self.cpu_used()
        return self.measured_events / used if used > 0 else math.nan

    def describe(self) -> str:
        first = self.first_progress
        startup = f"{first[0] - self.started_at:.1f} s to first commit" if first else "no commit"
        return (
            f"{self.events_per_s:,.0f} events/s ({self.measured_events:,} events in "
            f"{self.window_s:.2f} s after the first commit; {startup}; "
            f"consumer CPU {self.cpu_used():.1f} s = {self.events_per_cpu_s:,.0f} events/CPU s; "
            f"broker CPU {self.cpu_used('broker_'):.1f} s)"
        )


def wait_consumed(
    watcher: GroupWatcher,
    expected: int,
    processes: Processes,
    pids: Callable[[], Sequence[int]],
    *,
    started_at: float,
    timeout_s: float,
    rollups: bool = True,
    broker_pid: int | None = None,
    interval_s: float = POLL_INTERVAL_S,
) -> Consumption:
    """Poll committed offsets every ``interval_s`` until ``expected`` input records are
    committed (and, with ``rollups``, the roll-up agent has caught up); TimeoutError after
    ``timeout_s``. ``pids``: the consumer processes whose CPU time is sampled."""
    result = Consumption(expected, started_at)
    deadline = time.monotonic() + timeout_s

    def sample_cpu(moment: str) -> None:
        result.cpu_seconds_at[moment] = sum(cpu_seconds(p) for p in pids())
        if broker_pid is not None:
            result.cpu_seconds_at[f"broker_{moment}"] = cpu_seconds(broker_pid)

    while True:
        processes.check()
        committed = watcher.input_committed()
        now = time.monotonic()
        result.samples.append((now, committed))
        if committed > 0 and "first" not in result.cpu_seconds_at:
            sample_cpu("first")
        if committed >= expected and result.done_at is None:
            result.done_at = now
            sample_cpu("done")
        if result.done_at is not None and (not rollups or watcher.rollups_behind() == 0):
            result.drained_at = time.monotonic()
            return result
        if now > deadline:
            raise TimeoutError(
                f"group {watcher.group}: {committed:,} of {expected:,} input records "
                f"committed after {timeout_s:.0f} s"
                + ("" if result.done_at is None else "; roll-ups still behind")
            )
        time.sleep(max(interval_s - (time.monotonic() - now), 0.0))


# ----------------------------------------------------------------------------- /proc


def _children_of() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name (2nd field) may hold spaces and parentheses: split after it
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (alive now)."""
    tree = _children_of()
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(tree.get(current, []))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Memory:
    rss_bytes: int
    """Resident set now, summed over the process and its descendants."""
    peak_bytes: int
    """VmHWM (peak resident set) summed over the same processes."""
    pids: tuple[int, ...]

    @property
    def rss_mb(self) -> float:
        return self.rss_bytes / 2**20

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20


def memory_of_tree(pid: int) -> Memory:
    """RSS and peak RSS (VmRSS, VmHWM from /proc/PID/status) of ``pid`` and its children."""
    rss = peak = 0
    pids = process_tree(pid)
    for current in pids:
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                kib = int(value.split()[0]) * 1024
                if name == "VmRSS":
                    rss += kib
                else:
                    peak += kib
    return Memory(rss, peak, tuple(pids))


# ----------------------------------------------------------------------------- warehouse


def csi_query(warehouse: str, sql: str, timeout_s: float = 300.0) -> list[dict[str, Any]]:
    """Rows of ``sql`` as dicts, through `csi query` in a subprocess: the worker that owned
    the chdb directory must have stopped, and this process keeps no chdb of its own."""
    done = subprocess.run(
        [PYTHON, "-m", "pipeline.cli", "query", "--warehouse", warehouse, "--format", "json", sql],
        capture_output=True,
        timeout=timeout_s,
        cwd=REPO_ROOT,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"csi query failed ({done.returncode}) on {warehouse}: "
            f"{done.stderr.decode(errors='replace')[-2000:]}"
        )
    return [orjson.loads(line) for line in done.stdout.splitlines() if line.strip()]


def print_flush(*parts: object, file: IO[str] | None = None) -> None:
    print(*parts, file=file or sys.stdout, flush=True)
