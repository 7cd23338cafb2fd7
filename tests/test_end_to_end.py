"""End to end on real parts: the embedded broker (noida-db), the Faust worker
as its own process, chdb. Simulated events plus malformed ones go in; the
warehouse must hold every valid event exactly once, every malformed one as a
dead letter with its reason, and the stream's CSI/NPS must equal the same
formulas computed directly over the produced events."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
import uuid
from dataclasses import asdict
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.batch import run_batch, window_figures
from pipeline.catalogue import load_catalogue
from pipeline.metrics import WINDOWS
from pipeline.producer import EventProducer
from pipeline.registry import DealerRegistry, write_registry
from pipeline.runner import EMBEDDED_FETCH_HOLD_MS, ProgressReader
from pipeline.simulator import simulate, simulated_registry
from pipeline.topics import EVENT_TOPICS

pytestmark = pytest.mark.integration

CATALOGUE = load_catalogue()
SURVEY_TOPIC = EVENT_TOPICS["survey"].name


def csi_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True, text=True, timeout=120, env=env, check=True,
    )  # fmt: skip


def query(warehouse: str, sql: str) -> list[dict[str, Any]]:
    out = csi_cli("query", "--warehouse", warehouse, "--format", "json", sql).stdout
    return [orjson.loads(line) for line in out.splitlines() if line.strip()]


def malformed_records(today: date) -> list[tuple[str, bytes, bytes, str]]:
    """(topic, key, value, a part of the expected reason)."""
    base = {
        "event_id": str(uuid.uuid4()), "event_type": "survey", "schema_version": 1,
        "dealer_id": "D001", "department": "service",
        "occurred_at": f"{today.isoformat()}T08:00:00+00:00", "customer_ref": "abcdef0123456789",
        "source": "web", "channel": "web", "scale": {"min": 1, "max": 10},
        "ratings": {"work_quality": 8}, "recommend": 9,
    }  # fmt: skip

    def variant(**changes: Any) -> bytes:
        return orjson.dumps({**base, "event_id": str(uuid.uuid4()), **changes})

    future = (datetime.now(UTC) + timedelta(days=3)).isoformat()
    return [
        (SURVEY_TOPIC, b"D001", b'{"event_id": "truncated', "JSON"),
        (SURVEY_TOPIC, b"D001", variant(ratings={"work_quality": 11}), "ratings.work_quality"),
        (SURVEY_TOPIC, b"D001", variant(occurred_at="2026-01-01T08:00:00"), "occurred_at"),
        (SURVEY_TOPIC, b"D001", variant(occurred_at=future), "occurred_at"),
        (SURVEY_TOPIC, b"D001", variant(event_type="gossip"), "gossip"),
        (EVENT_TOPICS["call"].name, b"D001", variant(event_type="call"), "outcome: is required"),
        (SURVEY_TOPIC, b"D999", variant(), "must equal dealer_id"),
        (SURVEY_TOPIC, b"D001", b"\xff\xfe\x00binary", "JSON"),
    ]


def wait_until_consumed(
    bootstrap: str, group: str, expected: int, worker: subprocess.Popen[bytes], timeout_s: float
) -> int:
    reader = ProgressReader(bootstrap, group)
    try:
        assert reader.poll().produced == expected
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            progress = reader.poll()
            if progress.processed >= expected and not progress.rollups_behind:
                break  # every event, and every roll-up update they caused
            if worker.poll() is not None:
                break  # died: the caller shows its log
            time.sleep(0.5)
        if progress.processed < expected or progress.rollups_behind:
            ends = reader.offsets.end_offsets(reader.event_partitions + reader.rollup_partitions)
            lag = {
                f"{tp.topic}/{tp.partition}": (reader.committed.committed(tp), end)
                for tp, end in ends.items()
                if (reader.committed.committed(tp) or 0) < end
            }
            print(f"behind after {timeout_s:.0f} s, (committed, end) per partition: {lag}")
        return progress.processed
    finally:
        reader.close()


def stop_worker(worker: subprocess.Popen[bytes], grace_s: float = 60.0) -> None:
    """SIGTERM (Faust stops, the sinks flush); SIGKILL if it has not exited
    within `grace_s`, so a hung worker never outlives its test."""
    worker.terminate()
    try:
        worker.wait(grace_s)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait(10)


def run_worker_until_consumed(
    bootstrap: str, group: str, expected: int, env: dict[str, str], log_path: Path
) -> None:
    """Run `csi worker` until it has committed `expected` records, then stop it
    gracefully (Faust stops, the sinks flush last)."""
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "worker"], env=env, stdout=log, stderr=log
        )
        try:
            consumed = wait_until_consumed(bootstrap, group, expected, worker, timeout_s=180)
            assert consumed == expected, log_path.read_text()[-3000:]
        finally:
            stop_worker(worker)
    assert worker.returncode == 0, log_path.read_text()[-3000:]


def test_events_in_figures_out(broker: Any, tmp_path: Path) -> None:
    today = datetime.now(UTC).date()
    events = list(simulate(5, 50, end=today, seed=11))
    registry = simulated_registry(5, seed=11)
    write_registry(registry, tmp_path / "dealers.csv")
    replayed = events[5]  # produced twice: must count once everywhere
    surveys = [e for e in events if e["event_type"] == "survey"]
    newest = max(e["occurred_at"] for e in events)

    def late_copy(days_back: int) -> dict[str, Any]:
        when = datetime.fromisoformat(newest) - timedelta(days=days_back)
        return {**surveys[-1], "event_id": str(uuid.uuid4()), "occurred_at": when.isoformat()}

    extra = [
        late_copy(20),  # late but within the 35-day bound: counts, windows re-emitted
        late_copy(40),  # beyond it: a dead letter, in stream and batch alike
        {**surveys[-1], "event_id": str(uuid.uuid4()), "dealer_id": "D999"},  # unregistered
    ]
    bad = malformed_records(today)
    warehouse = f"chdb://{tmp_path / 'warehouse'}"
    group = f"csi-e2e-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ, "CSI_BOOTSTRAP": broker.bootstrap, "CSI_WAREHOUSE": warehouse,
        "CSI_DATA_DIR": str(tmp_path), "CSI_APP_ID": group,
        "CSI_REGISTRY": str(tmp_path / "dealers.csv"),
        "CSI_FETCH_HOLD_MS": str(EMBEDDED_FETCH_HOLD_MS),  # as `csi run` does on noida
    }  # fmt: skip
    # Two worker runs over two halves of the stream: the worker keeps its
    # buckets in memory, so the second run must recover them from the
    # changelog, or its windows would miss the first half.
    half = len(events) // 2
    with EventProducer(broker.bootstrap) as producer:
        for event in events[:half]:
            producer.send(event)
    run_worker_until_consumed(broker.bootstrap, group, half, env, tmp_path / "worker-1.log")
    with EventProducer(broker.bootstrap) as producer:
        for event in [*events[half:], replayed, *extra]:
            producer.send(event)
        for topic, key, value, _ in bad:
            producer.send_raw(topic, value, key=key)
    total = len(events) + 1 + len(extra) + len(bad)
    run_worker_until_consumed(broker.bootstrap, group, total, env, tmp_path / "worker-2.log")

    # every valid event exactly once
    valid_ids = {e["event_id"] for e in [*events, extra[0]]}
    stored = query(
        warehouse, "SELECT toString(event_id) AS id, count() AS n FROM csi.events FINAL GROUP BY id"
    )
    assert {r["id"] for r in stored} == valid_ids
    assert all(r["n"] == 1 for r in stored)

    # every malformed record is a dead letter with its reason
    dead = query(warehouse, "SELECT reason, raw_b64 FROM csi.dead_letters FINAL")
    expected_dead = [
        *((value, reason) for _, _, value, reason in bad),
        (orjson.dumps(extra[1]), "too late"),
        (orjson.dumps(extra[2]), "not in the dealer registry"),
    ]
    assert len(dead) == len(expected_dead)
    for value, expected_reason in expected_dead:
        [row] = [d for d in dead if base64.b64decode(d["raw_b64"]) == value]
        assert expected_reason in row["reason"], row["reason"]

    # every snapshot of every scope and window equals the batch recompute
    # (`csi metrics`' code) over the same events in the same order
    lines = [orjson.dumps(e) for e in [*events, replayed, *extra]]
    batch = run_batch(lines, CATALOGUE, registry=DealerRegistry(registry))
    snapshots = query(
        warehouse,
        "SELECT *, toString(window_end) AS end FROM csi.metric_snapshots FINAL",
    )
    assert {s["scope"] for s in snapshots} == {"dealer", "region", "brand", "network"}
    assert {s["window"] for s in snapshots} == set(WINDOWS)
    for snap in snapshots:
        expected = asdict(
            window_figures(
                batch, CATALOGUE, snap["scope"], snap["key"], snap["department"],
                snap["window"], date.fromisoformat(snap["end"]),
            )
        )  # fmt: skip
        for name, want in expected.items():
            assert_same(snap[name], want, f"{snap['scope']} {snap['key']} {snap['window']} "
                        f"{snap['end']} {name}")  # fmt: skip
    # the newest 30-day window of every dealer and of the network is there
    newest_30d = {s["key"] for s in snapshots if s["window"] == "30d" and s["end"] == newest[:10]}
    assert {d.dealer_id for d in registry} | {"network"} <= newest_30d


def assert_same(got: Any, want: Any, where: str) -> None:
    """Equal, with a 1e-9 tolerance for floats, also inside maps."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), where
        for key, value in want.items():
            assert_same(got[key], value, f"{where}.{key}")
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-9), where
    else:
        assert got == want, where
