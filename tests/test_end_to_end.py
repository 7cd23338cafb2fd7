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
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.catalogue import load_catalogue
from pipeline.metrics import WINDOWS, figures, merged, window_days
from pipeline.producer import EventProducer
from pipeline.runner import ProgressReader
from pipeline.simulator import simulate
from pipeline.stream import unit_windows
from pipeline.topics import EVENT_TOPICS
from schemas import parse_event

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
        (EVENT_TOPICS["call"].name, b"D001", variant(event_type="call"), "not supported yet"),
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
        while (processed := reader.poll().processed) < expected and time.monotonic() < deadline:
            if worker.poll() is not None:
                break  # died: the caller shows its log
            time.sleep(0.5)
        return processed
    finally:
        reader.close()


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
            worker.terminate()
            worker.wait(60)
    assert worker.returncode == 0, log_path.read_text()[-3000:]


def test_events_in_figures_out(broker: Any, tmp_path: Path) -> None:
    today = datetime.now(UTC).date()
    events = list(simulate(6, 12, end=today, seed=11))
    replayed = events[5]  # produced twice: must count once everywhere
    bad = malformed_records(today)
    warehouse = f"chdb://{tmp_path / 'warehouse'}"
    group = f"csi-e2e-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ, "CSI_BOOTSTRAP": broker.bootstrap, "CSI_WAREHOUSE": warehouse,
        "CSI_DATA_DIR": str(tmp_path), "CSI_APP_ID": group,
    }  # fmt: skip
    # Two worker runs over two halves of the stream: the worker keeps its
    # buckets in memory, so the second run must recover them from the
    # changelog, or its 30-day windows would miss the first half.
    half = len(events) // 2
    with EventProducer(broker.bootstrap) as producer:
        for event in events[:half]:
            producer.send(event)
    run_worker_until_consumed(broker.bootstrap, group, half, env, tmp_path / "worker-1.log")
    with EventProducer(broker.bootstrap) as producer:
        for event in events[half:]:
            producer.send(event)
        producer.send(replayed)
        for topic, key, value, _ in bad:
            producer.send_raw(topic, value, key=key)
    total = len(events) + 1 + len(bad)
    run_worker_until_consumed(broker.bootstrap, group, total, env, tmp_path / "worker-2.log")

    # every valid event exactly once
    valid = [parse_event(orjson.dumps(e)) for e in events]
    stored = query(
        warehouse, "SELECT toString(event_id) AS id, count() AS n FROM csi.events FINAL GROUP BY id"
    )
    assert {r["id"] for r in stored} == {str(e.event_id) for e in valid}
    assert all(r["n"] == 1 for r in stored)

    # every malformed record is a dead letter with its reason
    dead = query(warehouse, "SELECT reason, raw_b64 FROM csi.dead_letters FINAL")
    assert len(dead) == len(bad)
    for _, _, value, expected_reason in bad:
        [row] = [d for d in dead if base64.b64decode(d["raw_b64"]) == value]
        assert expected_reason in row["reason"], row["reason"]

    # the stream's figures equal the formulas over the produced events
    units = unit_windows(valid, CATALOGUE)
    snapshots = query(
        warehouse,
        "SELECT key, department, window, toString(window_end) AS window_end, csi, nps, "
        "n_responses, n_visits, nps_n FROM csi.metric_snapshots FINAL",
    )
    assert snapshots
    checked_latest = set()
    for snap in snapshots:
        days = units[(snap["key"], snap["department"])]
        end = date.fromisoformat(snap["window_end"])
        expected = figures(
            merged(days[d] for d in window_days(end, WINDOWS[snap["window"]]) if d in days),
            CATALOGUE,
        )
        assert snap["n_responses"] == expected.n_responses
        assert snap["n_visits"] == expected.n_visits
        assert snap["nps_n"] == expected.nps_n
        for name in ("csi", "nps"):
            want = getattr(expected, name)
            assert (snap[name] is None) == (want is None)
            if want is not None:
                assert snap[name] == pytest.approx(want, abs=1e-9)
        if snap["window"] == "30d" and end == max(days):
            checked_latest.add(snap["key"])
    # the rolling 30 days as of each dealer's newest day is there, for every dealer
    assert checked_latest == {dealer for dealer, _ in units}
