"""`csi run`: the whole pipeline on embedded parts, with live progress.

Starts the embedded broker (a subprocess), creates the topics, starts the
Faust worker (a subprocess that owns the chdb warehouse), produces simulated
events, and shows progress read from Kafka alone — committed offsets of the
worker's consumer group, the dead-letter topic's size, the metrics topic —
so it never competes with the worker for the chdb data directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson
from kafka import KafkaConsumer, TopicPartition

from pipeline.broker import EmbeddedBroker, create_topics
from pipeline.config import KafkaSecurity, Settings
from pipeline.producer import EventProducer, produce_events
from pipeline.registry import write_registry
from pipeline.simulator import Drop, simulate, simulated_registry
from pipeline.topics import CASE_ACTIONS, DEAD_LETTERS, EVENT_TOPICS, METRICS, ROLLUPS

EMBEDDED_FETCH_HOLD_MS = 200


@dataclass
class Progress:
    """What the terminal shows, read from Kafka."""

    produced: int = 0
    processed: int = 0
    dead_letters: int = 0
    events_per_s: float = 0.0
    rollups_behind: int = 0
    """Roll-up updates produced but not yet committed by the roll-up agent."""
    csi_30d: dict[str, tuple[str, float, int]] = field(default_factory=dict)
    """dealer → (window_end, 30-day CSI, n_responses), the newest window seen."""


class ProgressReader:
    def __init__(self, bootstrap: str, group_id: str) -> None:
        self.group_id = group_id
        # A consumer in the worker's group that never subscribes: it only asks
        # the group coordinator for the committed offsets, it does not join.
        self.committed = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=group_id,
            client_id="csi-run-progress",
            enable_auto_commit=False,
        )
        self.offsets = KafkaConsumer(bootstrap_servers=bootstrap, client_id="csi-run-offsets")
        self.metrics = KafkaConsumer(
            bootstrap_servers=bootstrap,
            client_id="csi-run-metrics",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        self.event_partitions = [  # every input topic: events and case actions
            TopicPartition(spec.name, p)
            for spec in (*EVENT_TOPICS.values(), CASE_ACTIONS)
            for p in range(spec.partitions)
        ]
        self.dead_letter_partitions = [
            TopicPartition(DEAD_LETTERS.name, p) for p in range(DEAD_LETTERS.partitions)
        ]
        self.rollup_partitions = [
            TopicPartition(ROLLUPS.name, p) for p in range(ROLLUPS.partitions)
        ]
        self.metrics.assign([TopicPartition(METRICS.name, p) for p in range(METRICS.partitions)])
        self.state = Progress()
        self._last: tuple[float, int] | None = None

    def poll(self) -> Progress:
        state = self.state
        ends = self.offsets.end_offsets(
            self.event_partitions + self.dead_letter_partitions + self.rollup_partitions
        )
        state.produced = sum(ends[tp] for tp in self.event_partitions)
        state.dead_letters = sum(ends[tp] for tp in self.dead_letter_partitions)
        state.processed = sum(self.committed.committed(tp) or 0 for tp in self.event_partitions)
        state.rollups_behind = sum(
            ends[tp] - (self.committed.committed(tp) or 0) for tp in self.rollup_partitions
        )
        now = time.monotonic()
        if self._last is not None and now > self._last[0]:
            state.events_per_s = (state.processed - self._last[1]) / (now - self._last[0])
        self._last = (now, state.processed)
        for records in self.metrics.poll(timeout_ms=200, max_records=50_000).values():
            for record in records:
                snapshot = orjson.loads(record.value)
                if (
                    snapshot["scope"] != "dealer"
                    or snapshot["window"] != "30d"
                    or snapshot["csi"] is None
                ):
                    continue
                seen = state.csi_30d.get(snapshot["key"])
                if seen is None or snapshot["window_end"] >= seen[0]:
                    state.csi_30d[snapshot["key"]] = (
                        snapshot["window_end"], snapshot["csi"], snapshot["n_responses"],
                    )  # fmt: skip
        return state

    def close(self) -> None:
        for client in (self.committed, self.offsets, self.metrics):
            with contextlib.suppress(Exception):
                client.close()


def render(progress: Progress, elapsed_s: float, simulating: bool) -> str:
    ranked = sorted(progress.csi_30d.items(), key=lambda item: item[1][1])
    lines = [
        f"[{elapsed_s:6.0f}s] produced {progress.produced:,}  processed {progress.processed:,}  "
        f"({progress.events_per_s:,.0f} events/s)  dead letters {progress.dead_letters:,}"
        f"{'  simulator running' if simulating else ''}",
    ]
    if ranked:

        def fmt(item: tuple[str, tuple[str, float, int]]) -> str:
            dealer, (_, score, n) = item
            return f"{dealer} {score:.0f} (n={n})"

        lines.append("  worst 30-day CSI: " + ", ".join(fmt(i) for i in ranked[:3]))
        lines.append("  best  30-day CSI: " + ", ".join(fmt(i) for i in reversed(ranked[-3:])))
    return "\n".join(lines)


class Screen:
    """Redraws the progress block in place on a terminal; on a pipe or file,
    prints it every few seconds so logs stay readable."""

    def __init__(self, out: IO[str], every_s: float = 5.0) -> None:
        self.out = out
        self.tty = out.isatty()
        self.every_s = every_s
        self.lines_shown = 0
        self.last_print = -every_s

    def show(self, text: str, final: bool = False) -> None:
        if self.tty:
            # cursor up over the previous block, clear to the end of the screen
            up = f"\x1b[{self.lines_shown}F" if self.lines_shown else ""
            self.out.write(f"{up}\x1b[J{text}\n")
            self.lines_shown = text.count("\n") + 1
        elif final or time.monotonic() - self.last_print >= self.every_s:
            self.out.write(text + "\n")
            self.last_print = time.monotonic()
        self.out.flush()


def start_worker(settings: Settings, log: IO[bytes]) -> subprocess.Popen[bytes]:
    env = {
        # the embedded broker speaks PLAINTEXT: a user's CSI_KAFKA_* must not apply
        **{k: v for k, v in os.environ.items() if not k.startswith("CSI_KAFKA_")},
        "CSI_BOOTSTRAP": settings.bootstrap,
        "CSI_WAREHOUSE": settings.warehouse,
        "CSI_DATA_DIR": str(settings.data_dir),
        "CSI_APP_ID": settings.app_id,
        "CSI_REGISTRY": str(settings.registry or ""),
        "CSI_FETCH_HOLD_MS": str(settings.fetch_hold_ms),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "worker"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # Ctrl-C reaches us; we stop the worker in order
    )


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_embedded(
    *,
    data_dir: Path,
    broker_kind: str,
    dealers: int,
    days: int,
    rate: float | None,
    seed: int,
    drops: Sequence[Drop],
    duration_s: float | None,
    out: IO[str] = sys.stdout,
) -> int:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "logs").mkdir(exist_ok=True)
    broker = EmbeddedBroker(
        broker_kind,  # type: ignore[arg-type]
        data_dir=data_dir / f"broker-{broker_kind}",
        log_path=data_dir / "logs" / "broker.log",
    )
    started = time.monotonic()
    worker: subprocess.Popen[bytes] | None = None
    reader: ProgressReader | None = None
    stop_simulator = threading.Event()
    simulator_error: list[BaseException] = []
    with broker:  # starts it; stops it on the way out, Ctrl-C included
        create_topics(broker.bootstrap)
        registry_path = data_dir / "dealers.csv"  # the simulated network's registry
        write_registry(simulated_registry(dealers, seed=seed), registry_path)
        settings = Settings(
            bootstrap=broker.bootstrap,
            warehouse=f"chdb://{data_dir / 'warehouse'}",
            data_dir=data_dir,
            registry=registry_path,
            # noida-db does not hold empty fetches (docs/brokers.md)
            fetch_hold_ms=EMBEDDED_FETCH_HOLD_MS if broker_kind == "noida" else 0,
        )
        print(
            f"broker ({broker_kind}) on {broker.bootstrap}; warehouse {settings.warehouse}",
            file=out,
        )
        worker_log = open(data_dir / "logs" / "worker.log", "ab")  # noqa: SIM115 - lives as long as the worker
        try:
            worker = start_worker(settings, worker_log)

            def produce() -> None:
                try:
                    with EventProducer(broker.bootstrap, security=KafkaSecurity()) as producer:
                        events = simulate(dealers, days, seed=seed, drops=drops)
                        produce_events(producer, _until(events, stop_simulator), rate=rate)
                except BaseException as exc:  # shown to the user, not lost in a thread
                    simulator_error.append(exc)

            simulator = threading.Thread(target=produce, name="simulator", daemon=True)
            simulator.start()
            reader = ProgressReader(broker.bootstrap, settings.app_id)
            screen = Screen(out)
            while duration_s is None or time.monotonic() - started < duration_s:
                if worker.poll() is not None:
                    print(
                        f"worker exited with {worker.returncode}; see {data_dir}/logs/worker.log",
                        file=out,
                    )
                    return 1
                screen.show(render(reader.poll(), time.monotonic() - started, simulator.is_alive()))
                if simulator_error:
                    print(f"simulator failed: {simulator_error[0]!r}", file=out)
                    return 1
                time.sleep(1.0)
            stop_simulator.set()
            simulator.join(timeout=30)
            _drain(reader, timeout_s=60.0)
            screen.show(render(reader.poll(), time.monotonic() - started, False), final=True)
        except KeyboardInterrupt:
            print("\nstopping…", file=out)
            stop_simulator.set()
        finally:
            if reader is not None:
                reader.close()
            if worker is not None:
                stop_process(worker)
            worker_log.close()
    print(
        f"stopped. Inspect the figures with: csi query --data-dir {data_dir} "
        '"SELECT key, window_end, round(csi) AS csi, n_responses FROM csi.metric_snapshots FINAL '
        "WHERE scope = 'dealer' AND window = '30d' ORDER BY window_end DESC, csi LIMIT 10\"",
        file=out,
    )
    return 0


def _until(events: Any, stop: threading.Event) -> Any:
    for event in events:
        if stop.is_set():
            return
        yield event


def _drain(reader: ProgressReader, timeout_s: float) -> None:
    """Wait until the worker has committed everything produced (bounded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        progress = reader.poll()
        if progress.processed >= progress.produced and not progress.rollups_behind:
            return
        time.sleep(0.5)
