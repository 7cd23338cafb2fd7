"""`csi run`, the main job, as a user runs it: real broker, worker, chdb;
Ctrl-C stops everything; `csi query` then reads the figures it left."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CSI = [sys.executable, "-m", "pipeline.cli"]


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_run_shows_progress_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    run = subprocess.Popen(
        [*CSI, "run", "--data-dir", str(tmp_path / "state"), "--dealers", "8", "--days", "40",
         "--rate", "500"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert run.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 90
    try:
        # wait until figures are live: a 30-day CSI league shows up
        while time.monotonic() < deadline:
            line = run.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "worst 30-day CSI" in line:
                break
        text = "".join(lines)
        assert "worst 30-day CSI" in text, text
        port = int(re.search(r"on 127\.0\.0\.1:(\d+)", text).group(1))  # type: ignore[union-attr]
        assert port_open(port)
        run.send_signal(signal.SIGINT)
        rest, _ = run.communicate(timeout=90)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, rest
    assert "stopping" in rest and "stopped." in rest
    assert not port_open(port)  # the broker is gone
    processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    assert "pipeline.cli worker" not in processes.stdout  # the worker is gone too
    state = tmp_path / "state"

    query = subprocess.run(
        [*CSI, "query", "--data-dir", str(state), "--format", "json",
         "SELECT uniqExactIf(key, scope = 'dealer') AS dealers, countIf(scope = 'network') > 0 "
         "AS network FROM csi.metric_snapshots FINAL"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert query.stdout.strip() == '{"dealers":8,"network":1}'
