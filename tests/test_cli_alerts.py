"""`csi alerts replay` and `csi case`, as a user runs them (in-process, through `main`)."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.cli import main
from pipeline.registry import write_registry
from pipeline.simulator import Drop, simulate, simulated_registry, write_jsonl

REQUIRED = {"kind", "metric", "scope", "key", "detected_at", "baseline", "current", "n", "message"}
CUSTOMER = "c0ffee00c0ffee00"


@pytest.fixture(autouse=True)
def keep_signal_handlers() -> Iterator[None]:
    """`main` installs SIGINT and SIGTERM handlers: give pytest its own back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict[str, Any]], str]:
    """Exit status, stdout as one JSON object a line, and stderr."""
    status = main(list(args))
    captured = capsys.readouterr()
    return status, [orjson.loads(line) for line in captured.out.splitlines()], captured.err


def envelope(event_type: str, occurred_at: str, **body: Any) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()), "event_type": event_type, "schema_version": 1,
        "dealer_id": "D001", "department": "service", "occurred_at": occurred_at,
        "customer_ref": CUSTOMER, "source": "survey_vendor" if event_type == "survey" else "dms",
        **body,
    }  # fmt: skip


def test_replay_sorts_by_event_time_and_reports_bad_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A complaint opened 1 Apr 08:00 (severity 3: first response due 16:00), a bad
    # survey at 15:00 and a visit next morning, written out of time order. In file
    # order the complaint would come last and never be seen overdue; in event time
    # the visit (2 Apr 10:00) finds it 18 h past its opening, 10 h past due.
    visit = envelope(
        "visit", "2026-04-02T10:00:00Z", visit_id="RO-7", appointment=False,
        arrived_at="2026-04-02T10:00:00Z",
    )  # fmt: skip
    bad = envelope(
        "survey", "2026-04-01T15:00:00Z", channel="sms", overall=2, recommend=2,
        comment="Nobody called me back",
    )  # fmt: skip
    good = envelope("survey", "2026-04-01T09:00:00Z", channel="web", overall=9, recommend=9)
    opened = envelope(
        "complaint", "2026-04-01T08:00:00Z", complaint_id="CMP-9", status="opened",
        category="communication", severity=3,
    )  # fmt: skip
    lines = [
        orjson.dumps(visit),
        orjson.dumps(bad),
        orjson.dumps({"event_type": "survey", "dealer_id": "D001"}),  # line 3: invalid
        orjson.dumps(good),
        orjson.dumps(opened),
    ]
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\n".join(lines) + b"\n")

    status, records, err = run(capsys, "alerts", "replay", str(events))
    assert status == 1  # a line was skipped
    assert f"{events}:3: event_id: is required" in err
    assert "4 event(s), 2 alert(s) opened, 0 closed, 1 case(s), 1 invalid line(s) skipped" in err
    for record in records:
        assert set(record) >= REQUIRED
        assert record["record"] == "alert"
    # in event time: the hot alert (15:00), then the SLA alert (due 16:00)
    assert [(r["kind"], r["metric"], r["status"]) for r in records] == [
        ("hot", "response", "open"), ("complaint_sla", "first_response", "open"),
    ]  # fmt: skip
    hot, sla = records
    assert (hot["scope"], hot["key"], hot["event_id"]) == ("dealer", "D001", bad["event_id"])
    assert (hot["detected_at"], hot["current"], hot["n"]) == ("2026-04-01T15:00:00+00:00", 2.0, 1)
    assert "overall 2 of 1–10" in hot["message"] and "detractor (2/10)" in hot["message"]
    assert hot["case_id"].startswith("D001/") and len(hot["case_id"]) == len("D001/") + 10
    assert sla["detected_at"] == "2026-04-01T16:00:00+00:00"
    assert (sla["baseline"], sla["current"]) == (8.0, 26.0)  # due 8 h; seen 08:00 → 10:00 + 24 h

    # --cases adds the case the hot survey opened
    status, with_cases, _ = run(capsys, "alerts", "replay", str(events), "--cases")
    assert status == 1
    [case] = [r for r in with_cases if r["record"] == "case"]
    assert (case["case_id"], case["status"], case["seq"]) == (hot["case_id"], "open", 1)
    assert case["contact_due_at"] == "2026-04-02T15:00:00+00:00"  # 15:00 + 24 h
    assert case["delivery_id"] == f"case:{hot['case_id']}:1"


def test_replay_of_a_simulated_drop_alerts_after_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events, registry = tmp_path / "events.jsonl", tmp_path / "dealers.csv"
    start = date(2026, 3, 1)
    write_jsonl(
        simulate(4, 300, end=date(2026, 6, 30), seed=5, drops=[Drop("D002", start, 120.0)]),
        events,
    )
    write_registry(simulated_registry(4, seed=5), registry)

    status, records, err = run(capsys, "alerts", "replay", str(events), "--registry", str(registry))
    assert status == 0 and "invalid line" not in err
    assert records and all(set(r) >= REQUIRED for r in records)
    d002 = [r for r in records if (r["kind"], r["scope"], r["key"]) == ("drop", "dealer", "D002")]
    detected = [date.fromisoformat(r["detected_at"][:10]) for r in d002 if r["status"] == "open"]
    assert [d for d in detected if d < start] == []  # no drop alert before the change
    csi_drops = [r for r in d002 if r["metric"] == "csi" and r["status"] == "open"]
    assert len(csi_drops) >= 1
    first = csi_drops[0]
    # a 120-point fall at about 1.5 surveys a day is caught within the month
    assert start <= date.fromisoformat(first["detected_at"][:10]) < date(2026, 4, 1)
    assert first["baseline"] > first["current"] and first["n"] > 0
    assert "D002" in first["message"] and "fell from" in first["message"]
    # printed in event time
    stamps = [r["updated_at"] for r in records]
    assert stamps == sorted(stamps)


def test_case_close_without_reason_is_refused_before_any_broker(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = main(["case", "close", "D001/0123456789", "--by", "me"])
    captured = capsys.readouterr()
    assert status == 2
    assert captured.out == ""
    assert captured.err.startswith("csi: case D001/0123456789: ")
    assert "reason: closing a case needs a reason" in captured.err
    assert "comment: closing a case needs a comment" in captured.err
