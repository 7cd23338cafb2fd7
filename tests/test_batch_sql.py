"""The SQL batch engine (`pipeline.batch_sql`) against the Python one (`pipeline.batch`).

One messy file from three simulated networks (seeds 1-3, all five event types) goes
through both engines: lines shuffled locally (calls before their visits, complaint
changes out of order), exact replays, replays moved to another day, too-late copies,
valid lines in unusual forms (offsets, fractions, spaces, escapes, long comments), a
reused visit id, comebacks before and of themselves, the whole tests/nasty corpus,
blank lines, an unregistered dealer and a case action. Every dealer bucket (keys and
values), every roll-up bucket, the backlog indexes, the dead letters (line and reason)
and every report (four scopes, two departments, five windows) must be equal, floats to
1e-9 relative.
"""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import orjson
import pytest

from pipeline import batch_sql
from pipeline.batch import BatchState, metrics_report, run_batch
from pipeline.batch_sql import (
    EVENT_MODELS,
    JSON_KINDS,
    LITERALS,
    css_verdict_sql,
    is_satisfied_sql,
    is_top2_sql,
    minutes_sql,
    nps_category_sql,
    rescale_to_10_sql,
    run_sql_batch,
    within_sql,
)
from pipeline.catalogue import load_catalogue
from pipeline.metrics import (
    WINDOWS,
    css_verdict,
    is_satisfied,
    is_top2,
    nps_category,
    rescale_to_10,
    window_start,
)
from pipeline.registry import DealerRegistry, write_registry
from pipeline.simulator import simulate, simulated_registry, write_jsonl
from schemas import Scale

chdb = pytest.importorskip("chdb", reason="chdb (the embedded extra) is not installed")

END = date(2026, 11, 20)
SEEDS = (1, 2, 3)
NASTY = Path(__file__).parent / "nasty"
SCOPES = ("dealer", "region", "brand", "network")


def _query(sql: str) -> list[tuple[Any, ...]]:
    connection = chdb.connect(":memory:")
    try:
        table = connection.query(sql, "ArrowTable").to_pydict()
    finally:
        connection.close()
    return list(zip(*table.values(), strict=True))


def test_sql_rules_equal_the_python_rules() -> None:
    """The per-event rules the scan applies in SQL, value for value (the same floats)."""
    scales = [(1, 10), (0, 10), (1, 5), (1, 7), (-90, 90), (0, 100)]
    cases = [(x / 4, lo, hi) for lo, hi in scales for x in range(4 * lo - 8, 4 * hi + 9)]
    xs, los, his = zip(*cases, strict=True)
    rows = _query(
        f"SELECT {rescale_to_10_sql('x', 'lo', 'hi')}, {is_top2_sql('x', 'hi')}, "
        f"{is_satisfied_sql('x', 'lo', 'hi')} FROM (SELECT arrayJoin(arrayZip("
        f"{list(xs)}::Array(Float64), {list(los)}::Array(Int64), {list(his)}::Array(Int64))) AS t,"
        " t.1 AS x, t.2 AS lo, t.3 AS hi)"
    )
    for (x, lo, hi), (x10, top2, satisfied) in zip(cases, rows, strict=True):
        scale = Scale(min=lo, max=hi)
        assert x10 == rescale_to_10(x, lo, hi)  # bit for bit
        assert bool(top2) == is_top2(x, scale)
        assert bool(satisfied) == is_satisfied(x, scale)
    names = {1: "promoter", 2: "passive", 3: "detractor"}
    for recommend, (category,) in enumerate(_query(
        f"SELECT {nps_category_sql('r')} FROM (SELECT arrayJoin(range(11)) AS r)"
    )):  # fmt: skip
        assert names[category] == nps_category(recommend)
    ratios = [0.0, 0.9, 0.95, 0.9500000001, 1.0, 1.05, 1.0500000001, 1.125, 9 / 8, 19 / 20, 21 / 20]
    verdicts = ("exceeded", "met", "disappointed")
    for ratio, (k,) in zip(ratios, _query(
        f"SELECT {css_verdict_sql('r')} FROM (SELECT arrayJoin({ratios}::Array(Float64)) AS r)"
    ), strict=True):  # fmt: skip
        assert verdicts[k - 1] == css_verdict(ratio)


def test_sql_durations_equal_the_streams() -> None:
    """`_within` and the complaint minutes of `_note_complaint`, on microsecond edges."""
    base = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
    offsets_us = [-90_000_000, -1, 0, 1, 59_999_999, 60_000_000, 3 * 86_400_000_000,
                  3 * 86_400_000_000 + 1, 30 * 86_400_000_000, 123_456_789_012]  # fmt: skip
    micros = [(base - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) + o
              for o in offsets_us]  # fmt: skip
    start = micros[2]
    rows = _query(
        f"SELECT {within_sql('t', str(start), 3)}, {minutes_sql('t', str(start))} "
        f"FROM (SELECT arrayJoin({micros}::Array(Int64)) AS t)"
    )
    for offset, (within, minutes) in zip(offsets_us, rows, strict=True):
        later = base + timedelta(microseconds=offset - offsets_us[2])
        assert bool(within) == (timedelta(0) <= later - base <= timedelta(days=3))
        assert minutes == max(int((later - base).total_seconds() // 60), 0)


def test_schema_tables_match_the_event_models() -> None:
    """The SQL checks' view of the schema follows schemas/events.py."""
    assert set(JSON_KINDS) == {n for m in EVENT_MODELS.values() for n in m.model_fields}
    for name, values in LITERALS.items():
        for model in EVENT_MODELS.values():
            if name in model.model_fields:
                assert _literal_values(model.model_fields[name].annotation) == set(values), name


def _literal_values(annotation: Any) -> set[Any]:
    """The values of `Literal[...]` or `Literal[...] | None`."""
    if get_origin(annotation) is Literal:
        return set(get_args(annotation))
    return {v for a in get_args(annotation) if get_origin(a) is Literal for v in get_args(a)}


# --- the messy file -------------------------------------------------------------------------


@dataclass(frozen=True)
class Messy:
    path: Path
    registry: DealerRegistry


def _events() -> Iterator[dict[str, Any]]:
    for seed in SEEDS:  # three networks, dealers S1D001, S2D001, ...
        for event in simulate(4, 50, end=END, seed=seed):
            event["dealer_id"] = f"S{seed}{event['dealer_id']}"
            yield event


def _new_id(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _odd_forms(rng: random.Random, events: list[dict[str, Any]]) -> list[bytes]:
    """Valid events in forms the SQL checks leave to pydantic (or read as they are)."""
    lines = []
    for k in range(60):
        event = dict(rng.choice(events), event_id=_new_id(rng))
        form = k % 6
        if form == 0:
            event["occurred_at"] = event["occurred_at"].replace("Z", "+08:00")
        elif form == 1:
            event["occurred_at"] = event["occurred_at"].replace("Z", ".25-03:30")
        elif form == 2:
            event["customer_ref"] = "12345678"  # digits only: pydantic decides
        elif form == 3:
            event["comment"] = "caf\u00e9 " * 200  # long, and escaped below
        elif form == 4:
            event["department"] = "sales"
        lines.append(json.dumps(event, ensure_ascii=form == 3).encode())  # ", " and ": "
    return lines


def _tricky_joins(
    rng: random.Random, events: list[dict[str, Any]]
) -> tuple[list[bytes], list[bytes]]:
    """A reused visit id, a comeback before its visit, a comeback of itself."""
    visits = [e for e in events if e["event_type"] == "visit" and e["delivered_at"]]
    first, last = [], []
    for visit in rng.sample(visits, 6):
        again = dict(visit, event_id=_new_id(rng))  # the same visit id, a second visit
        early = dict(visit, event_id=_new_id(rng), visit_id=f"{visit['visit_id']}-x",
                     comeback_of=visit["visit_id"])  # fmt: skip
        itself = dict(visit, event_id=_new_id(rng), visit_id=f"{visit['visit_id']}-y",
                      comeback_of=f"{visit['visit_id']}-y")  # fmt: skip
        first.append(orjson.dumps(early))  # before the visit it repeats: a pending note
        last += [orjson.dumps(again), orjson.dumps(itself)]
    return first, last


def write_messy_file(directory: Path) -> Messy:
    rng = random.Random(6)
    events = list(_events())
    events.sort(key=lambda e: e["occurred_at"])
    lines = [orjson.dumps(e) for e in events]
    for i in range(0, len(lines) - 60, 5):  # calls before visits, complaints out of order
        j = i + rng.randrange(60)
        lines[i], lines[j] = lines[j], lines[i]
    for _ in range(40):  # replays
        lines.insert(rng.randrange(len(lines)), rng.choice(lines))
    for _ in range(15):  # the same event id on another day: another bucket, counted again
        moved = orjson.loads(rng.choice(lines))
        moved["occurred_at"] = moved["occurred_at"].replace("T", "T").replace(":", ":", 1)
        day = date.fromisoformat(moved["occurred_at"][:10]) - timedelta(days=1)
        moved["occurred_at"] = day.isoformat() + moved["occurred_at"][10:]
        lines.insert(rng.randrange(len(lines) // 2, len(lines)), orjson.dumps(moved))
    late_ones = []
    for _ in range(20):  # too late: new ids, 60 days before the end
        late = orjson.loads(rng.choice(lines[-500:]))
        late.update(event_id=_new_id(rng), occurred_at="2026-09-01T10:00:00Z")
        late_ones.append(orjson.dumps(late))
    first, last = _tricky_joins(rng, events)
    lines = first + lines + late_ones + _odd_forms(rng, events) + last
    for path in sorted(NASTY.iterdir()):
        lines += path.read_bytes().split(b"\n")
    lines += [b"", b"   ", b'{"action_id": "x", "case_id": "y"}', b"\t"]
    lines.insert(7, b"")
    path = directory / "events.jsonl"
    path.write_bytes(b"\n".join(lines))  # the last line without a newline
    dealers = [
        d.__class__(f"S{seed}{d.dealer_id}", d.name, d.region, d.brand, d.group)
        for seed in SEEDS
        for d in simulated_registry(4, seed=seed)
    ]
    registry = DealerRegistry(d for d in dealers if d.dealer_id != "S3D004")  # one unregistered
    write_registry(registry.values(), directory / "dealers.csv")
    return Messy(path, registry)


# --- the comparison -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> Messy:
    return write_messy_file(tmp_path_factory.mktemp("batch-sql"))


@pytest.fixture(scope="module")
def engines(messy: Messy) -> tuple[BatchState, BatchState]:
    catalogue = load_catalogue()
    with messy.path.open("rb") as lines:
        python = run_batch(lines, catalogue, registry=messy.registry)
    return python, run_sql_batch(messy.path, catalogue, registry=messy.registry)


def _buckets(state: BatchState, roll_up: bool) -> dict[str, dict[str, float]]:
    store = state.rollups if roll_up else state.dealers
    scopes = ("region", "brand", "network") if roll_up else ("dealer",)
    return {
        key: value["stats"]
        for key, value in store.data.items()
        if key.split("|")[0] in scopes and key.count("|") == 3
    }


def _close(left: float, right: float) -> bool:
    return math.isclose(left, right, rel_tol=1e-9, abs_tol=1e-9)


def differences(left: Any, right: Any, where: str = "") -> list[str]:
    if isinstance(left, dict) and isinstance(right, dict):
        if set(left) != set(right):
            return [f"{where}: keys {sorted(set(left) ^ set(right))}"]
        return [d for k in left for d in differences(left[k], right[k], f"{where}.{k}")]
    if isinstance(left, list) and isinstance(right, list) and len(left) == len(right):
        return [d for i, pair in enumerate(zip(left, right, strict=True))
                for d in differences(*pair, f"{where}[{i}]")]  # fmt: skip
    if isinstance(left, float) and isinstance(right, float):
        return [] if _close(left, right) else [f"{where}: {left} != {right}"]
    return [] if left == right else [f"{where}: {left!r} != {right!r}"]


def test_the_file_exercises_every_path(engines: tuple[BatchState, BatchState]) -> None:
    python, _ = engines
    reasons = " ".join(d.reason for d in python.dead_letters)
    for expected in ("too late", "not valid JSON", "not in the dealer registry", "must be"):
        assert expected in reasons
    stats = {name for bucket in _buckets(python, False).values() for name in bucket}
    for joined in ("followed_up", "comebacks_against", "backlog_delta", "loyalty_n:none|satisfied",
                   "first_response_n", "resolution_past_due", "recovered", "audit_pass_w:reception",
                   "css_exceeded", "servqual_sum:tangibles", "acsi_sum:ideal"):  # fmt: skip
        assert joined in stats, joined


def test_dealer_buckets_are_equal(engines: tuple[BatchState, BatchState]) -> None:
    python, sql = engines
    assert python.events == sql.events
    assert differences(_buckets(sql, False), _buckets(python, False)) == []


def test_roll_up_buckets_are_equal(engines: tuple[BatchState, BatchState]) -> None:
    """Zeros aside: whether a roll-up keeps a statistic that is 0 depends on the stream's
    batch boundaries (see the module docstring of pipeline.batch_sql)."""
    python, sql = engines

    def non_zero(buckets: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        return {key: {k: v for k, v in stats.items() if v} for key, stats in buckets.items()}

    assert differences(non_zero(_buckets(sql, True)), non_zero(_buckets(python, True))) == []


def test_backlog_indexes_are_equal(engines: tuple[BatchState, BatchState]) -> None:
    python, sql = engines
    for store in ("dealers", "rollups"):
        indexes = [
            {k: v for k, v in getattr(state, store).data.items() if k.startswith("backlog_days|")}
            for state in (sql, python)
        ]
        assert indexes[0] == indexes[1]


def test_dead_letters_are_equal(engines: tuple[BatchState, BatchState]) -> None:
    python, sql = engines

    def lines(state: BatchState) -> list[tuple[int, str]]:  # each engine reads its own clock
        return [(d.offset, re.sub(r"now [^)]*\)", "now …)", d.reason)) for d in state.dead_letters]

    assert lines(sql) == lines(python)
    assert all(d.raw for d in sql.dead_letters if "too late" not in d.reason)


@pytest.mark.parametrize("department", ["service", "sales"])
def test_every_report_is_equal(engines: tuple[BatchState, BatchState], department: str) -> None:
    python, sql = engines
    catalogue = load_catalogue()
    for window in WINDOWS:
        for scope in SCOPES:
            reports = [
                metrics_report(
                    state, catalogue, scope=scope, window=window, as_of=END, department=department
                )
                for state in (sql, python)
            ]
            assert reports[1], (scope, window)
            assert differences(reports[0], reports[1]) == [], (scope, window)


def test_reports_from_the_window_days_only_are_equal(
    messy: Messy, engines: tuple[BatchState, BatchState]
) -> None:
    """What `csi metrics --engine sql` builds: the window's days, the rest summed."""
    python, _ = engines
    catalogue = load_catalogue()
    as_of, window = END - timedelta(days=5), "30d"
    sql = run_sql_batch(
        messy.path, catalogue, registry=messy.registry,
        since=window_start(window, as_of), departments=("service",),
    )  # fmt: skip
    assert len(sql.dealers.data) < len(python.dealers.data) / 3
    for scope in SCOPES:
        reports = [
            metrics_report(state, catalogue, scope=scope, window=window, as_of=as_of)
            for state in (sql, python)
        ]
        assert differences(reports[0], reports[1]) == [], scope


def test_csi_metrics_prints_the_same_with_either_engine(tmp_path: Path) -> None:
    """The command as a user runs it: same report, same invalid lines, same exit status."""
    events = tmp_path / "events.jsonl"
    write_jsonl(simulate(3, 20, end=END, seed=4), events)
    with events.open("ab") as out:
        out.write(b"not json\n" + (NASTY / "rating_out_of_scale.json").read_bytes().strip() + b"\n")
    command = [sys.executable, "-m", "pipeline.cli", "metrics", str(events), "--as-of", str(END)]
    runs = {
        engine: subprocess.run(
            [*command, "--window", "30d", "--by", "region", "--engine", engine],
            capture_output=True,
            timeout=120,
            check=False,
        )
        for engine in ("sql", "python")
    }
    assert runs["sql"].returncode == runs["python"].returncode == 1, runs["sql"].stderr
    assert runs["sql"].stderr == runs["python"].stderr
    assert differences(orjson.loads(runs["sql"].stdout), orjson.loads(runs["python"].stdout)) == []


def test_a_schema_rule_the_checks_lack_stops_the_run(
    messy: Messy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The safety net: were every line plain, the sample validated by pydantic would
    catch the invalid ones instead of counting them."""
    monkeypatch.setattr(batch_sql, "SAMPLE_EVERY", 1)
    monkeypatch.setattr(batch_sql, "plain_sql", lambda *args, **kwargs: "1")
    with pytest.raises(batch_sql.SqlChecksOutdated, match="passed the SQL checks"):
        run_sql_batch(messy.path, load_catalogue(), registry=messy.registry)
