"""Scaling from one worker process to two, and whether both give the same figures; issue 6, 2.

Target (issue 6, "Scaling"): two `csi worker` processes in one consumer group consume
the same input at least 1.7 times as fast as one, and the final figures are identical.

Method, per configuration (1 worker, then 2; with ``--runs`` > 1 the order alternates):

1. A fresh embedded broker (noida-db) with the pipeline's topics and a fresh consumer
   group (CSI_APP_ID), so both configurations start from nothing: no committed offsets,
   no changelogs, no metrics or roll-up records of the other.
2. The worker processes are started (each with CSI_WAREHOUSE=chdb://<its own dir>,
   CSI_REGISTRY, CSI_FETCH_HOLD_MS=200) and the benchmark waits until the group is
   Stable with that many members, so the two-worker run does not spend its measured
   window in the rebalance a late second member causes; Faust splits the 4 partitions of
   every event topic (and of the roll-up topic) between the members.
3. Then the same ``--dealers`` x ``--days`` of simulated events (all five types,
   simulator proportions) are produced as fast as the producer goes, and the group's
   committed offsets are polled every 0.2 s (without joining the group) until every input
   record is committed and the roll-up agent has caught up.
4. Events/s = input records committed from the first poll that sees committed progress
   to the first that sees all of them, over that time (startup and the first batch
   excluded; Faust's commit interval, 2.8 s, is left as deployed, so keep the input large
   enough for the window to be many commit intervals long).

Figures identical? One chdb data directory can be held by one process only, so two
workers cannot share a chdb warehouse. Debian's clickhouse-server (tests/
clickhouse_server.py) is ClickHouse 18.16, which has neither Map columns nor DateTime64:
the `csi` schema needs >= 23.8 (pipeline/warehouse.py), so it cannot be the shared
warehouse either. Each worker therefore writes its own chdb warehouse, and after all
workers have stopped (SIGTERM: the sinks flush last) the benchmark reads
``SELECT scope, key, department, window, window_end, csi, nps, n_responses, version FROM
csi.metric_snapshots FINAL`` from every warehouse of the configuration and takes, per
(scope, key, department, window, window_end), the row with the highest ``version`` (the
snapshot's computation time in ns) — what FINAL would keep in one shared table. A worker
writes the snapshots of the dealers of its partitions and of the roll-up keys
(region/brand/network) of its roll-up partitions, so with a stable group the two sets
are disjoint (the count of keys written by both is printed). The union is compared row
by row with the one-worker warehouse: same keys, and csi, nps, n_responses equal (floats
within 1e-9 relative; how many are bit-identical is printed too).

The output ends with::

    figures identical: yes|no
    BENCH scaling_2_workers <events/s of 2 / events/s of 1> x target 1.7 ok|short

Usage::

    .venv/bin/python benchmarks/scaling.py [--dealers 1000] [--days 4] [--runs 1]
        [--seed 7] [--timeout 1800] [--workdir DIR]

On 2 cores shared with other work, two workers compete with each other, the broker and
everything else for the same two cores: read the events per CPU second printed with
each figure next to the wall-clock ratio.
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
from typing import Any

from common import (
    Consumption,
    GroupWatcher,
    Processes,
    Produced,
    Record,
    WorkerSpec,
    bench_line,
    csi_query,
    describe_machine,
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
    wait_consumed,
    wait_group_stable,
    work_directory,
    write_simulated_registry,
)

TARGET_RATIO = 1.7
FAUST_COMMIT_INTERVAL_S = 2.8
"""Faust's default broker_commit_interval, which the workers keep: committed offsets move
in steps about this far apart."""
SNAPSHOT_SQL = (
    "SELECT scope, key, department, `window`, toString(window_end) AS window_end, "
    "csi, nps, n_responses, version FROM csi.metric_snapshots FINAL"
)
KEY_COLUMNS = ("scope", "key", "department", "window", "window_end")
FIGURE_COLUMNS = ("csi", "nps", "n_responses")

SnapshotKey = tuple[str, ...]


@dataclass
class ConfigResult:
    workers: int
    consumption: Consumption
    snapshots: dict[SnapshotKey, dict[str, Any]]
    keys_in_several: int
    rows_per_worker: list[int]


def run_config(
    workers: int,
    run: int,
    records: list[Record],
    registry: Path,
    workdir: Path,
    timeout_s: float,
) -> ConfigResult:
    group = f"bench-scale{workers}-{run}-{uuid.uuid4().hex[:6]}"
    base = workdir / f"workers{workers}-run{run}"
    specs: list[WorkerSpec] = []
    with running_broker(base, discard=True) as broker:
        specs = [
            WorkerSpec(broker.bootstrap, group, base / f"worker{i}", registry)
            for i in range(1, workers + 1)
        ]
        with Processes() as processes, GroupWatcher(broker.bootstrap, group) as watcher:
            children = [
                start_worker(processes, spec, f"worker{i}") for i, spec in enumerate(specs, start=1)
            ]
            joined_s = wait_group_stable(watcher, workers, processes)
            started = time.monotonic()
            produced = produce(broker.bootstrap, records)
            consumption = wait_consumed(
                watcher, produced.count, processes, lambda: [c.pid for c in children],
                started_at=started, timeout_s=timeout_s, rollups=True, broker_pid=broker.pid,
            )  # fmt: skip
            print_flush(
                f"  group stable with {workers} member(s) {joined_s:.1f} s after the check "
                f"began; input produced in {produced.seconds:.1f} s while they consumed"
            )
            for child in children:
                processes.stop(child)
                if child.popen.returncode not in (0, -15):
                    print_flush(f"  {child.name} exited with {child.popen.returncode}, log end:")
                    print_flush(child.log_tail(1500))
    # Every worker has stopped and flushed: read each one's warehouse.
    merged: dict[SnapshotKey, dict[str, Any]] = {}
    seen: Counter[SnapshotKey] = Counter()
    rows_per_worker = []
    for spec in specs:
        rows = csi_query(spec.warehouse, SNAPSHOT_SQL)
        rows_per_worker.append(len(rows))
        for row in rows:
            key = tuple(str(row[c]) for c in KEY_COLUMNS)
            seen[key] += 1
            if key not in merged or int(row["version"]) > int(merged[key]["version"]):
                merged[key] = row
    several = sum(1 for n in seen.values() if n > 1)
    return ConfigResult(workers, consumption, merged, several, rows_per_worker)


def same_value(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, float) or isinstance(b, float):
        x, y = float(a), float(b)
        return x == y or (
            math.isfinite(x) and math.isfinite(y) and abs(x - y) <= 1e-9 * max(1.0, abs(x))
        )
    return bool(a == b)


@dataclass
class Comparison:
    keys_a: int
    keys_b: int
    only_a: list[SnapshotKey]
    only_b: list[SnapshotKey]
    exact: int
    differing: list[str]

    @property
    def values_identical(self) -> bool:
        """Every (scope, key, department, window, window_end) in both has equal figures."""
        return not self.differing and self.keys_a > 0 and self.keys_b > 0

    @property
    def keys_identical(self) -> bool:
        return not self.only_a and not self.only_b

    @property
    def identical(self) -> bool:
        return self.values_identical and self.keys_identical

    def describe(self, a: str, b: str) -> str:
        common_keys = self.keys_a - len(self.only_a)
        lines = [
            f"{self.keys_a:,} snapshot rows {a}, {self.keys_b:,} {b}; {len(self.only_a):,} "
            f"only {a}, {len(self.only_b):,} only {b}; of the {common_keys:,} in both, "
            f"{self.exact:,} bit-identical in {', '.join(FIGURE_COLUMNS)} and "
            f"{len(self.differing):,} differing beyond 1e-9"
        ]
        for label, only in ((a, self.only_a), (b, self.only_b)):
            if only:
                kinds = Counter(f"{k[0]} {k[2]} {k[3]}" for k in only)
                lines.append(
                    f"  only {label}, by scope/department/window: "
                    + ", ".join(f"{kind} {n}" for kind, n in kinds.most_common(8))
                    + f"; e.g. {', '.join('/'.join(k) for k in sorted(only)[:3])}"
                )
        lines += [f"  differs: {d}" for d in self.differing[:5]]
        return "\n".join(lines)


def compare(
    one: dict[SnapshotKey, dict[str, Any]], two: dict[SnapshotKey, dict[str, Any]]
) -> Comparison:
    differing: list[str] = []
    exact = 0
    for key in sorted(one.keys() & two.keys()):
        a, b = one[key], two[key]
        if all(a[c] == b[c] for c in FIGURE_COLUMNS):
            exact += 1
        elif not all(same_value(a[c], b[c]) for c in FIGURE_COLUMNS):
            figures = ", ".join(f"{c} {a[c]!r} vs {b[c]!r}" for c in FIGURE_COLUMNS)
            differing.append(f"{'/'.join(key)}: {figures}")
    return Comparison(
        len(one), len(two), sorted(one.keys() - two.keys()), sorted(two.keys() - one.keys()),
        exact, differing,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dealers", type=int, default=1000)
    parser.add_argument("--days", type=int, default=4, help="full days up to yesterday")
    parser.add_argument("--runs", type=int, default=1, help="1-worker + 2-worker pairs")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=1800.0, help="per consumption, s")
    parser.add_argument("--workdir", type=Path, help="keep warehouses and logs here")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.dealers < 1 or args.days < 1:
        parser.error("--runs, --dealers and --days must be at least 1")
    handle_sigterm()
    print_flush(f"scaling: {describe_machine()}")
    ratios: list[float] = []
    all_identical = values_identical = True
    one_worker_runs: list[dict[SnapshotKey, dict[str, Any]]] = []
    with work_directory(args.workdir, "csi-bench-scaling-") as workdir:
        registry = write_simulated_registry(args.dealers, args.seed, workdir / "dealers.csv")
        records = list(encode(simulated_events(args.dealers, args.days, args.seed)))
        mix = Produced(len(records), 0.0, Counter(r.event_type for r in records)).mix()
        print_flush(
            f"input: {args.dealers:,} dealers x {args.days} days = {len(records):,} events ({mix})"
        )
        for run in range(1, args.runs + 1):
            order = (1, 2) if run % 2 else (2, 1)
            got: dict[int, ConfigResult] = {}
            for workers in order:
                load = load_average()
                print_flush(f"run {run}, {workers} worker(s) (load average {load:.2f}):")
                got[workers] = result = run_config(
                    workers, run, records, registry, workdir, args.timeout
                )
                print_flush(f"  {result.consumption.describe()}")
                if not result.consumption.window_s > 10 * FAUST_COMMIT_INTERVAL_S:
                    print_flush(
                        "  warning: the window is not 10x Faust's commit interval "
                        f"({FAUST_COMMIT_INTERVAL_S} s): the figure is coarse; use more --days"
                    )
                print_flush(
                    f"  snapshot rows per worker warehouse: {result.rows_per_worker}; keys "
                    f"written by more than one worker: {result.keys_in_several}"
                )
            ratio = got[2].consumption.events_per_s / got[1].consumption.events_per_s
            ratios.append(ratio)
            comparison = compare(got[1].snapshots, got[2].snapshots)
            all_identical = all_identical and comparison.identical
            values_identical = values_identical and comparison.values_identical
            one_worker_runs.append(got[1].snapshots)
            print_flush(
                f"run {run}: 1 worker {got[1].consumption.events_per_s:,.0f} events/s, "
                f"2 workers {got[2].consumption.events_per_s:,.0f} events/s: {ratio:.2f}x "
                f"(per consumer CPU s: {got[1].consumption.events_per_cpu_s:,.0f} and "
                f"{got[2].consumption.events_per_cpu_s:,.0f})"
            )
            print_flush(f"  figures: {comparison.describe('with 1 worker', 'with 2 workers')}")
        if len(one_worker_runs) > 1:
            control = compare(one_worker_runs[0], one_worker_runs[1])
            print_flush(
                "control, 1 worker in run 1 against 1 worker in run 2: "
                f"{'identical' if control.identical else 'not identical'}: "
                + control.describe("in run 1", "in run 2")
            )
    print_flush("")
    print_flush(f"2 workers / 1 worker: {median(ratios):.2f}x (median over {len(ratios)} run(s))")
    print_flush(
        "figures on the keys both configurations wrote: "
        + ("equal" if values_identical else "NOT equal")
    )
    print_flush(f"figures identical: {'yes' if all_identical else 'no'}")
    print_flush(
        bench_line("scaling_2_workers", median(ratios), "x", TARGET_RATIO, higher_is_better=True)
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
