"""Throughput of the full worker against a bare Faust agent on the same input; issue 6, 1.

Target (issue 6, "Throughput"): the full worker (`csi worker`: validation, buckets in a
Faust table with changelog, snapshots, roll-ups, alerts, chdb sinks) consumes a backlog
at no less than 70% of the rate of a bare Faust agent over the same topics on the same
machine — the share of Faust's own floor the pipeline keeps.

Method:

1. ``--dealers`` x ``--days`` of simulated events (`pipeline.simulator.simulate`: all
   five event types in the simulator's proportions, full days up to yesterday) are
   generated and encoded once. The default, 1,000 x 4, is about 36,000 events (the first
   simulated days hold fewer: calls and surveys follow visits by days, so 3 days make
   only 22,500).
2. Each run consumes that input twice, once per side, each time on a fresh embedded
   broker (noida-db) with the pipeline's topics, to which the whole input is produced
   before the consumer starts; a new consumer group and a fresh process. A fresh broker
   per consumption because noida keeps every record in memory and the full worker writes
   about ten records per input event (printed): the next consumption must not pay for
   the broker's bloat from the last. The order alternates between runs, so drift in the
   machine's other load does not favour one side.

   * bare: a Faust app configured like the worker's (memory store, 4 partitions,
     earliest offsets, the same session timeout, `take_events` with the worker's batch
     size and wait, the same client-side hold of empty fetches on noida) whose one agent
     subscribes to the same input topics and decodes each value with orjson — nothing
     else; run by this script with ``--bare-agent``;
   * full: ``python -m pipeline.cli worker`` with CSI_APP_ID (fresh group),
     CSI_WAREHOUSE=chdb://<run dir>, CSI_REGISTRY (the simulated registry) and
     CSI_FETCH_HOLD_MS=200 (docs/brokers.md).

3. Events/s = input records committed between the first poll that sees any committed
   progress and the first poll that sees all of them, divided by the time between the
   two (committed offsets of the group, read every 0.2 s without joining the group).
   Process start, group join and everything processed before the first commit are
   therefore excluded. For the full worker the wait goes on until the roll-up agent has
   caught up too, but only input records count and the clock stops when the last input
   record is committed.

Faust commits on a timer (``broker_commit_interval``, 2.8 s by default), so committed
offsets move in steps: too coarse to time the bare agent, which finishes the default
input in about 5 s. The bare agent therefore runs with BROKER_COMMIT_INTERVAL (a Faust
setting read from the environment) at ``--commit-interval`` (default 0.2 s); it
produces nothing, so its commits cost next to nothing. The full worker keeps Faust's
default, as deployed (``--worker-commit-interval`` changes that: each commit makes Faust
flush its producer, which costs the worker throughput, measured at about 15% with 0.2 s
in one development run). With the worker's window (two minutes at the pipeline's speed
when this was written) the 2.8 s steps cost the figure at most 2-3%; the output warns
when a window is shorter than 10 commit intervals.

Also printed, per run: events per CPU second of the consumer process and CPU seconds the
broker used in the same window (less sensitive to other work on the machine than wall
time); for the full worker a cross-check from its warehouse: distinct events in
csi.events, dead letters, and the rate over the rows' ingested_at span (the time the
processor built each row, so neither sink flushes nor commits are in it); and, once,
how many records the worker wrote to Kafka per input event, by topic.

The figure is the median over ``--runs`` runs (default 3) of the per-run ratio
full / bare. The output ends with::

    BENCH throughput_ratio <full/bare in %> percent target 70 ok|short

Usage::

    .venv/bin/python benchmarks/throughput.py [--dealers 1000] [--days 4] [--runs 3]
        [--seed 7] [--commit-interval 0.2] [--worker-commit-interval 0] [--timeout 900]
        [--workdir DIR]

At the pipeline's speed when this was written (about 250-300 events/s on 2 shared
cores) a default run takes about 8 minutes, nearly all of it in the full worker.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from common import (
    INPUT_TOPICS,
    PYTHON,
    Consumption,
    GroupWatcher,
    Processes,
    Produced,
    Record,
    WorkerSpec,
    bench_line,
    csi_query,
    describe_machine,
    describe_output,
    encode,
    handle_sigterm,
    load_average,
    median,
    print_flush,
    produce,
    run_main,
    running_broker,
    simulated_events,
    start_worker,
    topic_records,
    wait_consumed,
    work_directory,
    write_simulated_registry,
)

TARGET_PERCENT = 70.0
SCRIPT = Path(__file__).resolve()


@dataclass
class RunResult:
    bare: Consumption
    full: Consumption
    full_rows: int
    full_dead_letters: int
    full_ingested_rate: float
    load: float

    @property
    def ratio_percent(self) -> float:
        return 100 * self.full.events_per_s / self.bare.events_per_s


# ----------------------------------------------------------------------------- bare agent


def run_bare_agent(bootstrap: str, group: str, state_dir: Path) -> None:
    """The bare consumer: Faust, the worker's app settings, orjson.loads per record."""
    import faust
    import orjson

    from pipeline.broker import hold_empty_fetches
    from pipeline.config import Settings
    from pipeline.topics import EVENT_PARTITIONS
    from pipeline.worker import faust_broker_urls

    settings = Settings(bootstrap=bootstrap, app_id=group, data_dir=state_dir)
    hold_empty_fetches(settings.fetch_hold_ms / 1000)
    app = faust.App(
        settings.app_id,
        broker=faust_broker_urls(settings.bootstrap),
        store="memory://",
        datadir=str(state_dir / "faust"),
        topic_partitions=EVENT_PARTITIONS,
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=max(settings.session_timeout_s / 3, 1.0),
    )
    topics = app.topic(
        *INPUT_TOPICS, key_type=bytes, value_type=bytes, key_serializer="raw",
        value_serializer="raw",
    )  # fmt: skip
    decoded = [0]

    async def bare(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_max, settings.batch_within_s):
            for event in events:
                orjson.loads(event.message.value)
            decoded[0] += len(events)

    # Registered by call: a decorator would erase the function's type under mypy --strict.
    app.agent(topics, name="bare")(bare)
    cast(Any, faust.Worker(app, loglevel="warning", quiet=True)).execute_from_commandline()


# ----------------------------------------------------------------------------- one side


def consume_once(
    kind: str,
    run: int,
    records: list[Record],
    registry: Path,
    workdir: Path,
    commit_env: dict[str, str],
    timeout_s: float,
) -> tuple[Consumption, dict[str, float], str]:
    """On a fresh broker holding just ``records``, start one consumer (bare or full) with
    a fresh group, wait until it has committed every input record, stop it. Returns the
    consumption, for the full worker the warehouse cross-check, and what it wrote to Kafka.
    """
    group = f"bench-{kind}-{run}-{uuid.uuid4().hex[:6]}"
    directory = workdir / f"{kind}-{run}"
    check: dict[str, float] = {}
    with running_broker(directory, discard=True) as broker:
        produced = produce(broker.bootstrap, records)
        check["produce_s"] = produced.seconds
        spec = WorkerSpec(broker.bootstrap, group, directory, registry)
        with Processes() as processes, GroupWatcher(broker.bootstrap, group) as watcher:
            started = time.monotonic()
            if kind == "bare":
                child = start_worker(
                    processes, spec, "bare-agent", extra_env=commit_env,
                    argv=(PYTHON, str(SCRIPT), "--bare-agent", broker.bootstrap, group,
                          str(spec.directory)),
                )  # fmt: skip
            else:
                child = start_worker(processes, spec, "worker", extra_env=commit_env)
            consumption = wait_consumed(
                watcher, produced.count, processes, lambda: [child.pid],
                started_at=started, timeout_s=timeout_s, rollups=kind == "full",
                broker_pid=broker.pid,
            )  # fmt: skip
            check["stop_s"] = processes.stop(child)
            if child.popen.returncode not in (0, -15):
                print_flush(f"  {kind} exited with {child.popen.returncode}: {child.log_tail()}")
        output = describe_output(topic_records(broker.bootstrap), produced.count)
    if kind == "full":
        [row] = csi_query(
            spec.warehouse,
            "SELECT count() AS n_rows, uniqExact(event_id) AS ids, "
            "toFloat64(min(ingested_at)) AS first, toFloat64(max(ingested_at)) AS last "
            "FROM csi.events",
        )
        [dead] = csi_query(spec.warehouse, "SELECT count() AS n FROM csi.dead_letters")
        span = float(row["last"]) - float(row["first"])
        check.update(
            rows=float(row["n_rows"]),
            ids=float(row["ids"]),
            dead_letters=float(dead["n"]),
            ingested_rate=float(row["ids"]) / span if span > 0 else math.nan,
        )
    return consumption, check, output


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dealers", type=int, default=1000)
    parser.add_argument("--days", type=int, default=4, help="full days up to yesterday")
    parser.add_argument("--runs", type=int, default=3, help="bare+full pairs; median reported")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--commit-interval", type=float, default=0.2,
        help="the bare agent's Faust broker_commit_interval, s (0: Faust's default, 2.8)",
    )  # fmt: skip
    parser.add_argument(
        "--worker-commit-interval", type=float, default=0.0,
        help="the full worker's broker_commit_interval, s (default 0: Faust's 2.8, as deployed)",
    )  # fmt: skip
    parser.add_argument("--timeout", type=float, default=900.0, help="per consumption, s")
    parser.add_argument("--workdir", type=Path, help="keep data and logs here (default: temp)")
    parser.add_argument("--bare-agent", nargs=3, metavar=("BOOTSTRAP", "GROUP", "DIR"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args(argv)
    if args.bare_agent:
        bootstrap, group, state_dir = args.bare_agent
        run_bare_agent(bootstrap, group, Path(state_dir))
        return 0
    if args.runs < 1 or args.dealers < 1 or args.days < 1:
        parser.error("--runs, --dealers and --days must be at least 1")
    handle_sigterm()
    commit_env = {
        kind: {"BROKER_COMMIT_INTERVAL": str(interval)} if interval > 0 else {}
        for kind, interval in (("bare", args.commit_interval),
                               ("full", args.worker_commit_interval))
    }  # fmt: skip
    print_flush(f"throughput: {describe_machine()}")
    results: list[RunResult] = []
    with work_directory(args.workdir, "csi-bench-throughput-") as workdir:
        registry = write_simulated_registry(args.dealers, args.seed, workdir / "dealers.csv")
        records = list(encode(simulated_events(args.dealers, args.days, args.seed)))
        mix = Produced(len(records), 0.0, Counter(r.event_type for r in records)).mix()
        print_flush(
            f"input: {args.dealers:,} dealers x {args.days} days = {len(records):,} events "
            f"({mix}), produced to a fresh broker before each consumer starts"
        )
        print_flush(
            "commit interval: bare agent "
            + ", full worker ".join(
                f"{env['BROKER_COMMIT_INTERVAL']} s" if env else "Faust's default (2.8 s)"
                for env in (commit_env["bare"], commit_env["full"])
            )
        )
        for run in range(1, args.runs + 1):
            order = ("bare", "full") if run % 2 else ("full", "bare")
            got: dict[str, tuple[Consumption, dict[str, float], str]] = {}
            load = load_average()
            for kind in order:
                got[kind] = consume_once(
                    kind, run, records, registry, workdir, commit_env[kind], args.timeout
                )
                consumption = got[kind][0]
                print_flush(f"run {run} {kind:4}: {consumption.describe()}")
                interval = float(commit_env[kind].get("BROKER_COMMIT_INTERVAL", 2.8))
                if not consumption.window_s > 10 * interval:
                    print_flush(
                        f"  warning: the {kind} side's window is not 10x its commit interval "
                        f"({interval} s): the figure is coarse; use more --days or a shorter "
                        "commit interval"
                    )
            full_check = got["full"][1]
            result = RunResult(
                bare=got["bare"][0],
                full=got["full"][0],
                full_rows=int(full_check["ids"]),
                full_dead_letters=int(full_check["dead_letters"]),
                full_ingested_rate=full_check["ingested_rate"],
                load=load,
            )
            results.append(result)
            print_flush(
                f"run {run}: full/bare {result.ratio_percent:.0f}%; warehouse: "
                f"{result.full_rows:,} distinct events in csi.events "
                f"({int(full_check['rows']):,} rows), {result.full_dead_letters} dead "
                f"letters; rate over the rows' ingested_at span "
                f"{result.full_ingested_rate:,.0f} events/s; worker stop took "
                f"{full_check['stop_s']:.1f} s; load average {load:.2f} at the run's start"
            )
            if run == 1:
                print_flush(f"  the full worker wrote to Kafka: {got['full'][2]}")

    bare_rates = [r.bare.events_per_s for r in results]
    full_rates = [r.full.events_per_s for r in results]
    ratios = [r.ratio_percent for r in results]
    print_flush("")
    print_flush(
        "per run (events/s): bare "
        + ", ".join(f"{x:,.0f}" for x in bare_rates)
        + "; full "
        + ", ".join(f"{x:,.0f}" for x in full_rates)
        + "; full/bare "
        + ", ".join(f"{x:.0f}%" for x in ratios)
    )
    print_flush(f"bare Faust agent (baseline): {median(bare_rates):,.0f} events/s (median)")
    print_flush(f"full worker: {median(full_rates):,.0f} events/s (median)")
    print_flush(
        "full worker per CPU second: "
        f"{median([r.full.events_per_cpu_s for r in results]):,.0f} events/CPU s; bare agent "
        f"{median([r.bare.events_per_cpu_s for r in results]):,.0f} events/CPU s (medians)"
    )
    print_flush(f"full / bare: {median(ratios):.0f}% (median of per-run ratios)")
    print_flush(
        bench_line(
            "throughput_ratio", median(ratios), "percent", TARGET_PERCENT,
            higher_is_better=True,
        )
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
