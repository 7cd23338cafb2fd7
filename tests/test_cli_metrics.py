"""`csi metrics`, the batch recompute, as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from datetime import date
from pathlib import Path

import orjson

from pipeline.registry import write_registry
from pipeline.simulator import simulate, simulated_registry, write_jsonl

REQUIRED = {
    "scope", "key", "window_start", "window_end", "n_responses", "csi", "factors", "nps",
    "csat_top2", "satisfaction_rate", "satisfaction_degree", "css_ratio", "csm",
    "servqual_gap", "response_rate", "complaints_per_100_visits", "mystery_shop_score",
}  # fmt: skip


def csi(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_metrics_reports_bad_lines_and_prints_every_unit(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    write_jsonl(simulate(4, 20, end=date(2026, 11, 20), seed=3), events)
    with events.open("ab") as out:
        out.write(b"not json\n")
        out.write(orjson.dumps({"event_type": "survey", "dealer_id": "D001"}) + b"\n")
    lines = events.read_bytes().count(b"\n")
    write_registry(simulated_registry(4, seed=3), tmp_path / "dealers.csv")

    run = csi(
        "metrics", str(events), "--as-of", "2026-11-20", "--window", "30d", "--by", "region",
        "--registry", str(tmp_path / "dealers.csv"),
    )  # fmt: skip
    assert run.returncode == 1  # says that lines were skipped
    assert f"events.jsonl:{lines - 1}: not valid JSON" in run.stderr
    assert f"events.jsonl:{lines}: " in run.stderr
    report = orjson.loads(run.stdout)
    regions = {d.region for d in simulated_registry(4, seed=3)}
    assert {r["key"] for r in report} == regions
    for row in report:
        assert set(row) >= REQUIRED
        assert (row["window_start"], row["window_end"]) == ("2026-10-22", "2026-11-20")
        assert row["csi"] is None or 100 <= row["csi"] <= 1000


def test_metrics_refuses_an_unknown_window(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_bytes(b"")
    run = csi("metrics", str(tmp_path / "e.jsonl"), "--as-of", "2026-11-20", "--window", "5d")
    assert run.returncode == 2
    assert "--window must be one of day, 7d, 30d, 90d, month" in run.stderr
