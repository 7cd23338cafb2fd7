"""pipeline.warehouse on embedded ClickHouse (chdb) in a temporary data directory.

chdb runs one data directory per process, so every test closes its warehouse before the
next one opens another directory (the fixtures do it in `finally`).
"""

from __future__ import annotations

import base64
import dataclasses
import math
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from pipeline.catalogue import load_catalogue
from pipeline.metrics import Bucket, figures
from pipeline.stream import Snapshot
from pipeline.warehouse import (
    DEAD_LETTERS_COLUMNS,
    DEAD_LETTERS_SCHEMA,
    DEAD_LETTERS_TABLE,
    EVENTS_COLUMNS,
    EVENTS_SCHEMA,
    EVENTS_TABLE,
    METRIC_SNAPSHOTS_COLUMNS,
    METRIC_SNAPSHOTS_SCHEMA,
    METRIC_SNAPSHOTS_TABLE,
    BatchingSink,
    ChdbWarehouse,
    SinkSet,
    Warehouse,
    WarehouseError,
    WarehouseLockedError,
    create_schema,
    dead_letter_row,
    open_warehouse,
    parse_clickhouse_url,
    python_converter,
)

OCCURRED_AT = datetime(2026, 5, 4, 9, 15, 30, 250000, tzinfo=UTC)
INGESTED_AT = datetime(2026, 5, 4, 9, 15, 31, 500000, tzinfo=UTC)

AWKWARD_STRINGS = [
    "it's",
    'say "hi"',
    "back\\slash \\N \\t",
    "line one\nline two\r\nthree",
    "tab\there",
    "NUL\x00inside",
    "客户满意度很高，服务顾问很专业",
    "emoji 🚗🔧 and \u2028 separator",
    "'); DROP TABLE csi.events; --",
    '{"json": "],[", "x": null}',
    "null",
    "",
]


class ManualClock:
    """A clock the test moves by hand, so age-based flushing needs no sleeping."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def bare_warehouse(tmp_path: Path) -> Iterator[Warehouse]:
    warehouse = open_warehouse(f"chdb://{tmp_path / 'warehouse'}")
    try:
        yield warehouse
    finally:
        warehouse.close()


@pytest.fixture
def warehouse(bare_warehouse: Warehouse) -> Warehouse:
    create_schema(bare_warehouse)
    return bare_warehouse


def event_row(
    event_id: uuid.UUID | str,
    *,
    offset: int = 0,
    dealer_id: str = "D001",
    customer_ref: str = "c0ffee",
    payload: str = '{"overall": 9}',
    occurred_at: datetime = OCCURRED_AT,
    ingested_at: datetime = INGESTED_AT,
) -> tuple[Any, ...]:
    values = {
        "event_id": event_id,
        "event_type": "survey",
        "schema_version": 1,
        "dealer_id": dealer_id,
        "department": "service",
        "occurred_at": occurred_at,
        "customer_ref": customer_ref,
        "source": "survey_vendor",
        "payload": payload,
        "topic": "csi.events.survey",
        "partition": offset % 4,
        "offset": offset,
        "ingested_at": ingested_at,
    }
    return tuple(values[column] for column in EVENTS_COLUMNS)


def snapshot_row(*, version: int, csi: float | None, nps: float | None) -> tuple[Any, ...]:
    """A row built the way the worker builds it (`Snapshot.to_row`)."""
    empty = figures(Bucket(), load_catalogue())
    result = dataclasses.replace(
        empty,
        n_responses=40 + version,
        n_visits=120,
        csi=csi,
        factors={"service_advisor": 812.5, "service_quality": 790.0 + version},
        factor_n={"service_advisor": 38, "service_quality": 40},
        nps=nps,
        nps_n=40,
    )
    return Snapshot(
        "dealer", "D001", "North", "Brand A", "service", "30d", date(2026, 4, 5),
        date(2026, 5, 4), result, INGESTED_AT + timedelta(seconds=version), version,
    ).to_row()  # fmt: skip


def count(warehouse: Warehouse, sql: str) -> int:
    _, rows = warehouse.query(sql)
    value: int = rows[0][0]
    return value


# ------------------------------------------------------------------------------- schema


def test_create_schema_twice_creates_the_six_tables(warehouse: Warehouse) -> None:
    create_schema(warehouse)  # second time: must be a no-op

    names, rows = warehouse.query(
        "SELECT name, engine, sorting_key, partition_key FROM system.tables "
        "WHERE database = 'csi' ORDER BY name"
    )
    assert names == ["name", "engine", "sorting_key", "partition_key"]
    assert rows == [
        ("alerts", "ReplacingMergeTree", "alert_id", "toYYYYMM(detected_at)"),
        ("cases", "ReplacingMergeTree", "case_id", ""),
        ("dead_letters", "ReplacingMergeTree", "dead_letter_id", ""),
        ("events", "ReplacingMergeTree", "event_id", "toYYYYMM(occurred_at)"),
        (
            "metric_snapshots",
            "ReplacingMergeTree",
            "scope, department, window, window_end, key",
            "",
        ),
        ("pipeline_health", "MergeTree", "metric, measured_at", ""),
    ]
    for table, schema in (
        ("events", EVENTS_SCHEMA),
        ("metric_snapshots", METRIC_SNAPSHOTS_SCHEMA),
        ("dead_letters", DEAD_LETTERS_SCHEMA),
    ):
        _, columns = warehouse.query(
            "SELECT name, type FROM system.columns "
            f"WHERE database = 'csi' AND table = '{table}' ORDER BY position"
        )
        assert columns == list(schema)


def test_warehouse_satisfies_protocol(warehouse: Warehouse) -> None:
    assert isinstance(warehouse, Warehouse)
    assert isinstance(warehouse, ChdbWarehouse)


# ------------------------------------------------------------------------------- tables


def test_replayed_event_id_counts_once_under_final(warehouse: Warehouse) -> None:
    replayed = uuid.uuid4()
    other = uuid.uuid4()
    warehouse.insert(
        EVENTS_TABLE,
        EVENTS_COLUMNS,
        [event_row(replayed, offset=7), event_row(str(other), offset=8)],
    )
    # The replay arrives later with a newer ingested_at, as after a consumer restart.
    warehouse.insert(
        EVENTS_TABLE,
        EVENTS_COLUMNS,
        [event_row(replayed, offset=7, ingested_at=INGESTED_AT + timedelta(minutes=5))],
    )

    assert count(warehouse, "SELECT count() FROM csi.events") == 3
    assert count(warehouse, "SELECT count() FROM csi.events FINAL") == 2
    _, rows = warehouse.query(
        f"SELECT event_id, occurred_at, ingested_at FROM csi.events FINAL "
        f"WHERE event_id = '{replayed}'"
    )
    assert rows == [(replayed, OCCURRED_AT, INGESTED_AT + timedelta(minutes=5))]


def test_newer_snapshot_version_wins_under_final(warehouse: Warehouse) -> None:
    warehouse.insert(
        METRIC_SNAPSHOTS_TABLE,
        METRIC_SNAPSHOTS_COLUMNS,
        [snapshot_row(version=2, csi=801.25, nps=None)],
    )
    warehouse.insert(
        METRIC_SNAPSHOTS_TABLE,
        METRIC_SNAPSHOTS_COLUMNS,
        [snapshot_row(version=1, csi=None, nps=35.0)],
    )

    assert count(warehouse, "SELECT count() FROM csi.metric_snapshots") == 2
    names, rows = warehouse.query("SELECT * FROM csi.metric_snapshots FINAL")
    assert names == list(METRIC_SNAPSHOTS_COLUMNS)
    assert rows == [snapshot_row(version=2, csi=801.25, nps=None)]
    stored = dict(zip(names, rows[0], strict=True))
    assert stored["factors"] == {"service_advisor": 812.5, "service_quality": 792.0}
    assert stored["factor_n"] == {"service_advisor": 38, "service_quality": 40}
    assert stored["nps"] is None
    assert stored["computed_at"].tzinfo is not None


def test_dead_letter_bytes_round_trip_exactly(warehouse: Warehouse) -> None:
    raw = b'{"event_id": \x00\xff\xfe "bad\n' + "好".encode()[:2] + b"\x80" * 600
    row = dead_letter_row(
        source_topic="csi.events.survey",
        partition=2,
        offset=41,
        key=b"D001\xff",
        reason="invalid JSON: unexpected byte 0x00 at 14",
        raw=raw,
        received_at=INGESTED_AT,
    )
    # Consuming the same bad message again after a restart keeps one dead letter.
    warehouse.insert(DEAD_LETTERS_TABLE, DEAD_LETTERS_COLUMNS, [row, row])

    names, rows = warehouse.query("SELECT * FROM csi.dead_letters FINAL")
    assert len(rows) == 1
    stored = dict(zip(names, rows[0], strict=True))
    assert base64.b64decode(stored["raw_b64"]) == raw
    assert stored["dead_letter_id"] == "csi.events.survey:2:41"
    assert stored["key"] == "D001\ufffd"
    assert stored["raw_preview"] == raw.decode("utf-8", errors="replace")[:500]
    assert len(stored["raw_preview"]) == 500
    assert "\x00" in stored["raw_preview"]
    assert stored["reason"] == "invalid JSON: unexpected byte 0x00 at 14"
    assert (stored["partition"], stored["offset"]) == (2, 41)


def test_awkward_strings_round_trip_unchanged(warehouse: Warehouse) -> None:
    rows = [
        event_row(uuid.uuid4(), offset=index, dealer_id=text, customer_ref=text, payload=text)
        for index, text in enumerate(AWKWARD_STRINGS)
    ]
    warehouse.insert(EVENTS_TABLE, EVENTS_COLUMNS, rows)

    _, stored = warehouse.query(
        "SELECT dealer_id, customer_ref, payload FROM csi.events ORDER BY `offset`"
    )
    assert stored == [(text, text, text) for text in AWKWARD_STRINGS]
    assert count(warehouse, "SELECT count() FROM csi.events") == len(AWKWARD_STRINGS)


def test_python_values_round_trip_with_their_types(warehouse: Warehouse) -> None:
    warehouse.execute(
        "CREATE TABLE csi.value_types (id UInt8, ratio Float64, maybe Nullable(Float64), "
        "weights Map(String, Float64), counts Map(UInt32, UInt32), ref UUID, day Date, "
        "at DateTime64(3, 'UTC'), flag Bool, tags Array(Nullable(String)), "
        "big UInt64, small Int64) ENGINE = MergeTree ORDER BY id"
    )
    columns = [
        "id", "ratio", "maybe", "weights", "counts", "ref", "day", "at", "flag", "tags", "big",
        "small",
    ]  # fmt: skip
    ref = uuid.uuid4()
    sent = [
        (
            1, math.inf, math.nan, {"a": -math.inf, "b": 0.1}, {7: 3}, ref, date(2026, 2, 28),
            datetime(2026, 2, 28, 23, 59, 59, 999999, tzinfo=UTC), True, ["x", None],
            2**64 - 1, -(2**63),
        ),
        (
            2, -0.5, None, {}, {}, str(ref), date(1970, 1, 1),
            datetime(2026, 3, 1, 8, 0, tzinfo=UTC), False, [], 0, 0,
        ),
    ]  # fmt: skip
    warehouse.insert("csi.value_types", columns, sent)

    names, rows = warehouse.query(f"SELECT {', '.join(columns)} FROM csi.value_types ORDER BY id")
    assert names == columns
    first, second = rows
    assert first[1] == math.inf
    assert math.isnan(first[2])  # NaN stays NaN, not NULL
    assert first[3]["a"] == -math.inf
    assert first[3]["b"] == 0.1
    assert first[4] == {7: 3}
    assert first[5] == ref
    assert first[6] == date(2026, 2, 28)
    # DateTime64(3) keeps milliseconds; microseconds are truncated, as clickhouse-driver does.
    assert first[7] == datetime(2026, 2, 28, 23, 59, 59, 999000, tzinfo=UTC)
    assert first[8:] == (True, ["x", None], 2**64 - 1, -(2**63))
    assert second == (2, -0.5, None, {}, {}, ref, date(1970, 1, 1), sent[1][7], False, [], 0, 0)


def test_query_without_rows_still_names_columns(warehouse: Warehouse) -> None:
    assert warehouse.query("SELECT event_id, dealer_id FROM csi.events") == (
        ["event_id", "dealer_id"],
        [],
    )
    assert warehouse.query("SELECT 1 AS one WHERE 0") == (["one"], [])


def test_ten_thousand_rows_go_in_one_fast_insert(warehouse: Warehouse) -> None:
    rows = [
        event_row(
            uuid.uuid4(),
            offset=index,
            dealer_id=f"D{index % 50:03d}",
            occurred_at=OCCURRED_AT - timedelta(minutes=index),
        )
        for index in range(10_000)
    ]
    sink = BatchingSink(warehouse, EVENTS_TABLE, EVENTS_COLUMNS, max_rows=10_000)

    assert sink.write(rows) == 10_000
    assert sink.batches_written == 1
    # About 0.03 s here; a row-at-a-time insert takes about 30 s, so 5 s only catches that.
    assert sink.last_flush_seconds < 5.0
    assert count(warehouse, "SELECT count() FROM csi.events FINAL") == 10_000
    assert count(warehouse, "SELECT uniqExact(dealer_id) FROM csi.events") == 50


def test_insert_refuses_rows_of_the_wrong_width(warehouse: Warehouse) -> None:
    with pytest.raises(ValueError, match="row 1 has 2 values but there are 13 columns"):
        warehouse.insert(EVENTS_TABLE, EVENTS_COLUMNS, [event_row(uuid.uuid4()), ("a", "b")])
    assert count(warehouse, "SELECT count() FROM csi.events") == 0


def test_server_side_failure_is_a_warehouse_error(warehouse: Warehouse) -> None:
    with pytest.raises(WarehouseError, match=r"csi\.missing"):
        warehouse.insert("csi.missing", ["id"], [(1,)])
    with pytest.raises(WarehouseError, match="UNKNOWN_TABLE"):
        warehouse.query("SELECT * FROM csi.missing")
    assert warehouse.query("SELECT 1 AS ok") == (["ok"], [(1,)])


def test_closed_warehouse_refuses_statements(tmp_path: Path) -> None:
    warehouse = open_warehouse(f"chdb://{tmp_path}")
    warehouse.close()
    warehouse.close()  # idempotent
    with pytest.raises(WarehouseError, match="closed"):
        warehouse.query("SELECT 1")


# ------------------------------------------------------------------------- batching sink


def test_sink_is_due_by_row_count(warehouse: Warehouse) -> None:
    sink = BatchingSink(warehouse, EVENTS_TABLE, EVENTS_COLUMNS, max_rows=3, max_age_s=60)
    assert not sink.due()
    assert sink.flush() == 0

    sink.add([event_row(uuid.uuid4(), offset=0), event_row(uuid.uuid4(), offset=1)])
    assert (sink.pending, sink.due()) == (2, False)
    sink.add([event_row(uuid.uuid4(), offset=2)])
    assert (sink.pending, sink.due()) == (3, True)

    assert sink.flush() == 3
    assert (sink.pending, sink.due(), sink.rows_written, sink.batches_written) == (0, False, 3, 1)
    assert count(warehouse, "SELECT count() FROM csi.events") == 3


def test_sink_is_due_by_age_of_oldest_row(warehouse: Warehouse) -> None:
    clock = ManualClock()
    sink = BatchingSink(
        warehouse, EVENTS_TABLE, EVENTS_COLUMNS, max_rows=100, max_age_s=1.0, clock=clock
    )
    sink.add([event_row(uuid.uuid4(), offset=0)])
    clock.now += 0.6
    sink.add([event_row(uuid.uuid4(), offset=1)])  # a younger row does not reset the age
    assert not sink.due()
    clock.now += 0.4
    assert sink.due()

    assert sink.flush() == 2
    clock.now += 5.0
    assert not sink.due()  # empty again: nothing is old
    sink.add([event_row(uuid.uuid4(), offset=2)])
    assert not sink.due()  # the age restarts with the first row of the new batch


def test_write_adds_and_flushes_only_when_due(warehouse: Warehouse) -> None:
    clock = ManualClock()
    sink = BatchingSink(
        warehouse, EVENTS_TABLE, EVENTS_COLUMNS, max_rows=10, max_age_s=2.0, clock=clock
    )
    assert sink.write([event_row(uuid.uuid4(), offset=0)]) == 0
    clock.now += 2.0
    assert sink.write([event_row(uuid.uuid4(), offset=1)]) == 2
    assert sink.write([]) == 0
    assert (sink.rows_written, sink.batches_written) == (2, 1)
    assert sink.last_flush_seconds > 0


def test_failed_flush_keeps_rows_for_the_retry(warehouse: Warehouse) -> None:
    sink = BatchingSink(warehouse, "csi.events_retry", EVENTS_COLUMNS, max_rows=2)
    first = [event_row(uuid.uuid4(), offset=0), event_row(uuid.uuid4(), offset=1)]
    sink.add(first)

    with pytest.raises(WarehouseError, match="events_retry"):
        sink.flush()  # the table does not exist yet
    assert (sink.pending, sink.rows_written, sink.batches_written) == (2, 0, 0)
    assert sink.due()

    late = event_row(uuid.uuid4(), offset=2)
    sink.add([late])
    warehouse.execute("CREATE TABLE csi.events_retry AS csi.events")
    assert sink.flush() == 3
    assert (sink.pending, sink.rows_written, sink.batches_written) == (0, 3, 1)
    _, rows = warehouse.query("SELECT `offset` FROM csi.events_retry ORDER BY `offset`")
    assert rows == [(0,), (1,), (2,)]


def test_sink_refuses_malformed_rows_when_added(warehouse: Warehouse) -> None:
    sink = BatchingSink(warehouse, EVENTS_TABLE, EVENTS_COLUMNS)
    with pytest.raises(ValueError, match="13 columns"):
        sink.add([("only", "three", "values")])
    assert sink.pending == 0
    with pytest.raises(ValueError, match="max_rows"):
        BatchingSink(warehouse, EVENTS_TABLE, EVENTS_COLUMNS, max_rows=0)


def test_sink_set_flushes_due_tables_then_everything(warehouse: Warehouse) -> None:
    clock = ManualClock()
    sinks = SinkSet(warehouse, max_rows=2, max_age_s=30, clock=clock)
    sinks.events.add([event_row(uuid.uuid4(), offset=0), event_row(uuid.uuid4(), offset=1)])
    sinks.dead_letters.add(
        [
            dead_letter_row(
                source_topic="csi.events.call",
                partition=0,
                offset=3,
                key=None,
                reason="unknown event_type",
                raw=b"{}",
                received_at=INGESTED_AT,
            )
        ]
    )
    assert sinks.pending == 3

    assert sinks.flush_due() == 2  # events hit max_rows; the dead letter is young
    assert (sinks.events.pending, sinks.dead_letters.pending) == (0, 1)
    clock.now += 30
    assert sinks.flush_due() == 1
    sinks.snapshots.add([snapshot_row(version=1, csi=700.0, nps=10.0)])
    assert sinks.metric_snapshots.pending == 1
    assert sinks.flush_all() == 1
    assert sinks.pending == 0
    assert count(warehouse, "SELECT count() FROM csi.events") == 2
    assert count(warehouse, "SELECT count() FROM csi.dead_letters") == 1
    assert count(warehouse, "SELECT count() FROM csi.metric_snapshots") == 1


def test_sink_set_keeps_all_rows_when_tables_are_missing(bare_warehouse: Warehouse) -> None:
    sinks = SinkSet(bare_warehouse)
    sinks.events.add([event_row(uuid.uuid4())])
    sinks.metric_snapshots.add([snapshot_row(version=1, csi=None, nps=None)])

    with pytest.raises(WarehouseError) as failure:
        sinks.flush_all()
    assert "events" in str(failure.value)
    assert any("metric_snapshots" in note for note in failure.value.__notes__)
    assert sinks.pending == 2

    create_schema(bare_warehouse)
    assert sinks.flush_all() == 2


# --------------------------------------------------------------------------------- URLs


@pytest.mark.parametrize("url", ["postgres://localhost/csi", "/var/lib/csi", "chdb:/x", ""])
def test_unknown_url_scheme_names_the_accepted_forms(url: str) -> None:
    with pytest.raises(ValueError, match=r"accepted forms: chdb://PATH.*clickhouse://"):
        open_warehouse(url)


@pytest.mark.parametrize("url", ["chdb://", "chdb://data?mode=ro"])
def test_malformed_chdb_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="chdb://"):
        open_warehouse(url)


def test_clickhouse_url_parts_are_decoded() -> None:
    address = parse_clickhouse_url("clickhouse://writer:p%40ss%3Aword@db.internal:9440/csi")
    assert (address.host, address.port, address.database) == ("db.internal", 9440, "csi")
    assert (address.user, address.password) == ("writer", "p@ss:word")

    defaults = parse_clickhouse_url("clickhouse://127.0.0.1")
    assert (defaults.port, defaults.database, defaults.user, defaults.password) == (
        9000,
        "default",
        "default",
        "",
    )


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("clickhouse://:9000/csi", "no host"),
        ("clickhouse://host:notaport/csi", "invalid port"),
        ("clickhouse://host:9000/csi?sekure=1", "is unknown"),
        ("clickhouse://host:9000/a/b", "one database name"),
    ],
)
def test_malformed_clickhouse_url_is_refused(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_clickhouse_url(url)


def test_relative_chdb_path_resolves_against_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    warehouse = open_warehouse("chdb://.csi/warehouse")
    try:
        assert isinstance(warehouse, ChdbWarehouse)
        assert warehouse.path == str(tmp_path / ".csi" / "warehouse")
        create_schema(warehouse)
        assert (tmp_path / ".csi" / "warehouse" / "metadata").is_dir()
    finally:
        warehouse.close()


def test_second_data_dir_in_one_process_is_explained(tmp_path: Path) -> None:
    first = open_warehouse(f"chdb://{tmp_path / 'first'}")
    try:
        with pytest.raises(WarehouseError, match="one data dir per process"):
            open_warehouse(f"chdb://{tmp_path / 'second'}")
        # The same directory again shares the running engine.
        again = open_warehouse(f"chdb://{tmp_path / 'first'}")
        assert again.query("SELECT 1 AS one") == (["one"], [(1,)])
        again.close()
    finally:
        first.close()


HOLD_DATA_DIR = """
import sys
from chdb.session import Session
session = Session(sys.argv[1])
print("ready", flush=True)
sys.stdin.read()
session.close()
"""


@contextmanager
def held_data_dir(data_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """A chdb data dir owned by another process (as a running worker owns its
    own) for the duration of the block; the holder process is yielded."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_DATA_DIR, str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        yield holder
    finally:
        holder.kill()
        holder.wait(timeout=30)


@pytest.mark.integration
def test_data_dir_locked_by_another_process_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "shared"
    with (
        held_data_dir(data_dir) as holder,  # bound before the next item is evaluated
        pytest.raises(WarehouseLockedError, match=f"locked by process {holder.pid}"),
    ):
        open_warehouse(f"chdb://{data_dir}")
    # Once the holder is gone the directory is free again.
    warehouse = open_warehouse(f"chdb://{data_dir}")
    try:
        assert warehouse.query("SELECT 1 AS one") == (["one"], [(1,)])
    finally:
        warehouse.close()


def test_python_converter_follows_nested_clickhouse_types() -> None:
    assert python_converter("LowCardinality(Nullable(String))")(None) is None
    assert python_converter("Tuple(name String, counts Map(String, UInt8))")(["a", {"x": "3"}]) == (
        "a",
        {"x": 3},
    )
    assert python_converter("Decimal(10, 2)")("12.30") == Decimal("12.30")
    assert python_converter("Enum8('a' = 1, 'b,c' = 2)")("b,c") == "b,c"
    # No zone in the type: naive wall-clock time, as clickhouse-driver returns it.
    assert python_converter("DateTime")("2026-01-02 03:04:05") == datetime(2026, 1, 2, 3, 4, 5)
    assert python_converter("DateTime64(6, 'Asia/Shanghai')")(
        "2026-01-02 03:04:05.123456"
    ) == datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=ZoneInfo("Asia/Shanghai"))
