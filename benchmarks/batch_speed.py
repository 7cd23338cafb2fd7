"""Time `csi metrics --engine sql` on 10 million events; issue 6, benchmark 4.

Target (issue 6): `csi metrics` on 10 million (generated) events for all scopes and a
30-day window in at most 60 s and 4 GB of memory, with the same pure formulas.

**Input** (generated once, not timed): `pipeline.simulator.simulate` for
``--block-dealers`` (200) dealers x ``--days`` (400) days ending yesterday — all five
event types in the simulator's proportions, in event-time order — written as JSON lines,
then replicated by chdb into ``--events`` (10,000,000) lines: copy k renames every
dealer D001 to C<k>D001 (k in 3 digits) and replaces the first three hex digits of every
event id by k, so the copies are distinct dealers with distinct events; line i of the
block is followed by its copies, so the file stays in event-time order; the first N
lines are kept. The registry gives each copy the original dealer's region and brand (the
simulator's registry), so regions and brands grow with the copies. With ``--workdir``
the input is kept and reused by later runs of the same shape.

**Measured**: a child process (this script with ``--child sql``) doing what
`csi metrics --engine sql --as-of <last day> --window 30d --registry dealers.csv` does for
``--by`` dealer, region, brand and network: import, load the catalogue and the registry,
one `pipeline.batch_sql.run_sql_batch` over the file (department service, the default),
then `pipeline.batch.metrics_report` for each of the four scopes, each written as the
command prints it. One scan serves the four scopes (the command takes one ``--by``; four
commands would read the file four times). The BENCH figure is the child's wall time from
start to exit; the RSS figure its peak resident set: VmHWM of /proc/<pid>/status, polled
every 0.1 s and read by the child itself when done (chdb runs inside the process, so its
memory is in it; not wait4's ru_maxrss, which Linux makes at least the size of the
parent at the fork). Also printed: the child's CPU seconds and its stages, and — as a
check of the command path — the wall time and peak RSS of one real
``csi metrics --engine sql --by region`` on the same file.

**Baseline, same run**: the Python engine (`pipeline.batch.run_batch`, the stream's
processors, and the same four reports) in a child of its own on a 1/100 sample: every
event of every 100th dealer of the registry (whole dealers, so every join stays inside
the sample). Its events/s, extrapolated linearly to N events (the Python engine folds
event by event), gives the ratio to the SQL engine. The same child then runs the SQL
engine on the sample and compares the four reports of both engines (equal to 1e-9
relative; otherwise the output says where they differ and the exit status is 1).

The output ends with::

    BENCH batch_10m <seconds> s target 60 ok|short
    BENCH batch_10m_rss <MB> MB target 4096 ok|short

Usage::

    .venv/bin/python benchmarks/batch_speed.py [--events 10000000] [--block-dealers 200]
        [--days 400] [--seed 7] [--quick] [--workdir DIR]

``--quick``: 200,000 events from 20 dealers x 400 days (a smoke run of about a minute;
not the target's figure). A default run on the 2-core development machine: about 2
minutes to generate (5 GB of JSON lines), then about 3 to measure (the SQL engine, the
command, the baseline).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from pipeline.registry import Dealer, write_registry
from pipeline.simulator import simulate, simulated_registry, write_jsonl

TARGET_S = 60.0
TARGET_RSS_MB = 4096.0
SAMPLE_EVERY = 100
"""The baseline runs on every SAMPLE_EVERY-th dealer."""
SCOPES = ("dealer", "region", "brand", "network")
WINDOW = "30d"
DEPARTMENT = "service"


@dataclass(frozen=True)
class Shape:
    events: int
    block_dealers: int
    days: int
    seed: int
    end: date

    def describe(self) -> str:
        return (
            f"{self.events:,} events from {self.block_dealers} simulated dealers x "
            f"{self.days} days ending {self.end} (seed {self.seed}), replicated"
        )


def say(*parts: object) -> None:
    print(*parts, flush=True)


def sql_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def chdb_query(sql: str) -> None:
    """One statement in a chdb engine of this process (generation only, not measured)."""
    import chdb

    connection = chdb.connect(":memory:")  # type: ignore[no-untyped-call]
    try:
        connection.query(sql)
    finally:
        connection.close()


# ----------------------------------------------------------------------------- input


def generate(shape: Shape, workdir: Path) -> tuple[Path, Path, int]:
    """(events file, registry, copies); what `workdir` holds is reused for the same shape."""
    events, registry, marker = (workdir / n for n in ("events.jsonl", "dealers.csv", "shape.json"))
    wanted = {**asdict(shape), "end": shape.end.isoformat()}
    if marker.exists() and events.exists() and registry.exists():
        made = orjson.loads(marker.read_bytes())
        copies = made.pop("copies")
        if made == wanted:
            say(f"input: reusing {events}")
            return events, registry, int(copies)
    marker.unlink(missing_ok=True)
    started = time.monotonic()
    block = workdir / "block.jsonl"
    lines = write_jsonl(
        simulate(shape.block_dealers, shape.days, end=shape.end, seed=shape.seed), block
    )
    copies = math.ceil(shape.events / lines)
    if copies > 999:
        raise SystemExit(f"{copies} copies of a {lines:,}-line block: use more --block-dealers")
    say(f"input: simulated {lines:,} events in {time.monotonic() - started:.0f} s; {copies} copies")
    replicate(block, events, copies, shape.events)
    block.unlink()
    dealers = simulated_registry(shape.block_dealers, seed=shape.seed)
    write_registry(
        [
            Dealer(f"C{k:03d}{d.dealer_id}", d.name, d.region, d.brand, d.group)
            for k in range(copies)
            for d in dealers
        ],
        registry,
    )
    marker.write_bytes(orjson.dumps({**wanted, "copies": copies}))
    say(f"input: written in {time.monotonic() - started:.0f} s")
    return events, registry, copies


def replicate(block: Path, out: Path, copies: int, limit: int) -> None:
    """`copies` re-keyed copies of every line of `block`, interleaved; the first `limit`."""
    out.unlink(missing_ok=True)
    copy = "leftPad(toString(copy), 3, '0')"
    id_prefix = "substring(leftPad(lower(hex(toUInt16(copy))), 4, '0'), 2, 3)"  # hex: no 0 bytes
    line = (
        f'replaceRegexpOne(replaceOne(line, \'"dealer_id":"\', concat(\'"dealer_id":"C\', {copy})),'
        f' \'"event_id":"[0-9a-f]{{3}}\', concat(\'"event_id":"\', {id_prefix}))'
    )
    chdb_query(
        f"INSERT INTO FUNCTION file({sql_string(str(out))}, LineAsString) SELECT {line} "
        f"FROM file({sql_string(str(block))}, LineAsString) ARRAY JOIN range({copies}) AS copy "
        f"LIMIT {limit} SETTINGS max_threads = 1, storage_file_read_method = 'pread'"
    )


def write_sample(events: Path, registry: Path, workdir: Path) -> tuple[Path, int]:
    """Every event of every SAMPLE_EVERY-th registered dealer: (file, lines)."""
    ids = [row.split(",", 1)[0] for row in registry.read_text("utf-8-sig").splitlines()[1:]]
    chosen = ", ".join(sql_string(d) for d in ids[::SAMPLE_EVERY])
    sample = workdir / "sample.jsonl"
    sample.unlink(missing_ok=True)
    chdb_query(
        f"INSERT INTO FUNCTION file({sql_string(str(sample))}, LineAsString) SELECT line "
        f"FROM file({sql_string(str(events))}, LineAsString) "
        f"WHERE JSONExtractString(line, 'dealer_id') IN ({chosen}) "
        "SETTINGS max_threads = 1, storage_file_read_method = 'pread'"
    )
    with sample.open("rb") as lines:
        return sample, sum(1 for _ in lines)


# ----------------------------------------------------------------------------- children


def reports(state: Any, as_of: date) -> dict[str, list[dict[str, Any]]]:
    from pipeline.batch import metrics_report
    from pipeline.catalogue import load_catalogue

    catalogue = load_catalogue()
    return {
        scope: metrics_report(
            state, catalogue, scope=scope, window=WINDOW, as_of=as_of, department=DEPARTMENT
        )
        for scope in SCOPES
    }


def run_sql(events: Path, registry: Path, as_of: date) -> tuple[Any, Any]:
    """What `csi metrics --engine sql` does before printing: (state, SqlRun)."""
    from pipeline.batch_sql import SqlRun, run_sql_batch
    from pipeline.catalogue import load_catalogue
    from pipeline.metrics import window_start
    from pipeline.registry import load_registry

    run = SqlRun()
    state = run_sql_batch(
        events, load_catalogue(), registry=load_registry(registry),
        since=window_start(WINDOW, as_of), departments=(DEPARTMENT,), run=run,
    )  # fmt: skip
    return state, run


def child_sql(events: Path, registry: Path, as_of: date, out: Path) -> dict[str, Any]:
    """The measured process: one scan, the four scopes' reports as the command prints them."""
    started = time.monotonic()
    state, run = run_sql(events, registry, as_of)
    for scope, report in reports(state, as_of).items():
        (out / f"{scope}.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    seconds = {**run.seconds, "reports": time.monotonic() - started - sum(run.seconds.values())}
    return {
        "seconds": seconds,
        "peak_rss_mb": own_peak_rss_mb(),
        "cpu": run.cpu_seconds,
        "events": state.events,
        "dead": len(state.dead_letters),
        "to_pydantic": run.lines_to_pydantic,
    }


def own_peak_rss_mb() -> float:
    """VmHWM of this process, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return math.nan


def child_python(events: Path, registry: Path, as_of: date, out: Path) -> dict[str, Any]:
    """The baseline: the Python engine on the sample; then the SQL engine on it, compared."""
    from pipeline.batch import run_batch
    from pipeline.catalogue import load_catalogue
    from pipeline.registry import load_registry

    started = time.monotonic()
    with events.open("rb") as lines:
        state = run_batch(lines, load_catalogue(), registry=load_registry(registry))
    python = reports(state, as_of)
    seconds = time.monotonic() - started
    sql_state, _ = run_sql(events, registry, as_of)
    differ = [
        f"{scope}{where}" for scope, report in reports(sql_state, as_of).items()
        for where in differences(report, python[scope])
    ]  # fmt: skip
    (out / "differences.txt").write_text("\n".join(differ))
    return {
        "seconds": seconds,
        "events": state.events,
        "differences": differ[:20],
        "n": len(differ),
    }


def differences(left: Any, right: Any, where: str = "") -> list[str]:
    """Where two reports differ (floats to 1e-9 relative)."""
    if isinstance(left, dict) and isinstance(right, dict):
        if set(left) != set(right):
            return [f"{where}: keys {sorted(set(left) ^ set(right))}"]
        return [d for k in left for d in differences(left[k], right[k], f"{where}.{k}")]
    if isinstance(left, list) and isinstance(right, list):
        if len(left) != len(right):
            return [f"{where}: {len(left)} rows, {len(right)} in the Python engine's"]
        return [d for i, pair in enumerate(zip(left, right, strict=True))
                for d in differences(*pair, f"{where}[{i}]")]  # fmt: skip
    if isinstance(left, float) and isinstance(right, float):
        same = math.isclose(left, right, rel_tol=1e-9, abs_tol=1e-12)
        return [] if same else [f"{where}: {left} vs {right}"]
    return [] if left == right else [f"{where}: {left!r} vs {right!r}"]


@dataclass(frozen=True)
class Child:
    seconds: float
    cpu_seconds: float
    peak_rss_mb: float
    output: dict[str, Any]


def run_child(argv: list[str], log: Path) -> Child:
    """A child process's wall time, CPU time and peak RSS, and the JSON object on the last
    line of its output (if any). The peak is VmHWM from /proc, polled every 0.1 s (it
    only grows, and starts afresh with the new program): wait4's ru_maxrss would count
    this process's size at the fork."""
    from common import memory_of_tree

    started, peak = time.monotonic(), 0.0
    with log.open("wb") as output:
        child = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, memory_of_tree(child.pid).peak_mb)
            time.sleep(0.1)
    seconds = time.monotonic() - started
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if child.returncode not in (0, 1):  # csi metrics exits 1 when it skipped invalid lines
        raise SystemExit(f"{argv[1:3]} failed with exit status {child.returncode}; see {log}")
    text = log.read_bytes().splitlines()
    last = text[-1] if text and text[-1].startswith(b"{") else b"{}"
    output = orjson.loads(last)
    peak = max(peak, output.get("peak_rss_mb", 0.0))
    return Child(seconds, usage.ru_utime + usage.ru_stime, peak, output)


def child_argv(kind: str, events: Path, registry: Path, as_of: date, out: Path) -> list[str]:
    return [
        sys.executable,
        __file__,
        "--child",
        kind,
        str(events),
        str(registry),
        str(as_of),
        str(out),
    ]


# ----------------------------------------------------------------------------- main


def measure(events: Path, registry: Path, sample: Path, end: date, workdir: Path) -> int:
    from common import bench_line

    (workdir / "sql").mkdir(exist_ok=True)
    sql = run_child(child_argv("sql", events, registry, end, workdir / "sql"), workdir / "sql.log")
    cpu = sql.output["cpu"]
    stages = ", ".join(
        f"{k} {v:.1f} s" + (f" ({cpu[k]:.1f} CPU s)" if k in cpu else "")
        for k, v in sql.output["seconds"].items()
    )
    say(
        f"sql engine: {sql.seconds:.1f} s wall, {sql.cpu_seconds:.1f} CPU s, peak RSS "
        f"{sql.peak_rss_mb:,.0f} MB for {sql.output['events']:,} events "
        f"({sql.output['events'] / sql.seconds:,.0f} events/s); {sql.output['dead']} dead "
        f"letters, {sql.output['to_pydantic']} lines left to pydantic; stages: {stages}"
    )
    command = [sys.executable, "-m", "pipeline.cli", "metrics", str(events), "--as-of", str(end),
               "--window", WINDOW, "--by", "region", "--registry", str(registry),
               "--engine", "sql"]  # fmt: skip
    cli = run_child(command, workdir / "cli.log")
    say(f"the command (csi metrics --engine sql --by region): {cli.seconds:.1f} s wall, "
        f"{cli.cpu_seconds:.1f} CPU s, peak RSS {cli.peak_rss_mb:,.0f} MB")  # fmt: skip
    (workdir / "python").mkdir(exist_ok=True)
    argv = child_argv("python", sample, registry, end, workdir / "python")
    python = run_child(argv, workdir / "python.log").output
    rate = python["events"] / python["seconds"]
    estimate = sql.output["events"] / rate
    say(
        f"python engine (baseline): {python['events']:,} events (1/{SAMPLE_EVERY} of the dealers) "
        f"in {python['seconds']:.1f} s = {rate:,.0f} events/s, so about {estimate:,.0f} s "
        f"({estimate / 60:,.0f} min) for {sql.output['events']:,} events: the sql engine is "
        f"{estimate / sql.seconds:,.0f}x faster"
    )
    verdict = "identical (1e-9)" if not python["n"] else f"{python['n']} differences, e.g.:"
    say(f"reports of both engines on the sample: {verdict}")
    for difference in python["differences"]:
        say(f"  {difference}")
    say(f"load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    say(bench_line("batch_10m", round(sql.seconds, 1), "s", TARGET_S, higher_is_better=False))
    say(bench_line("batch_10m_rss", round(sql.peak_rss_mb), "MB", TARGET_RSS_MB,
                   higher_is_better=False))  # fmt: skip
    return 1 if python["n"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--block-dealers", type=int, default=200, help="dealers simulated once")
    parser.add_argument("--days", type=int, default=400, help="days simulated, up to yesterday")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="200,000 events, 20 dealers a block")
    parser.add_argument("--workdir", type=Path, help="keep the input here and reuse it")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, events, registry, as_of, out = args.child
        run = child_sql if kind == "sql" else child_python
        result = run(Path(events), Path(registry), date.fromisoformat(as_of), Path(out))
        print(orjson.dumps(result).decode(), flush=True)
        return 0
    from common import describe_machine, handle_sigterm, work_directory

    handle_sigterm()
    events_n, block_dealers = (200_000, 20) if args.quick else (args.events, args.block_dealers)
    if events_n < 1 or block_dealers < 1 or args.days < 31:
        parser.error("--events and --block-dealers must be at least 1, --days at least 31")
    shape = Shape(
        events_n, block_dealers, args.days, args.seed, datetime.now(UTC).date() - timedelta(days=1)
    )
    say(f"batch speed: {describe_machine()}")
    with work_directory(args.workdir, "csi-bench-batch-") as workdir:
        say(f"input: {shape.describe()}")
        events, registry, copies = generate(shape, workdir)
        sample, sample_lines = write_sample(events, registry, workdir)
        say(f"input: {events.stat().st_size / 2**30:.2f} GiB, {copies} copies of the block; "
            f"baseline sample {sample_lines:,} events")  # fmt: skip
        return measure(events, registry, sample, shape.end, workdir)


if __name__ == "__main__":
    if "--child" in sys.argv:  # a measured process imports only what the command does
        sys.exit(main())
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import run_main

    sys.exit(run_main(main))
