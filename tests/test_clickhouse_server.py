"""The clickhouse:// backend against a real ClickHouse server (Debian's 18.16).

Debian ships ClickHouse 18.16, which predates Map columns and DateTime64, so the full `csi`
schema (needs ClickHouse >= 23.8) is exercised on chdb in test_warehouse.py; here a plain
MergeTree table with types 18.16 knows proves the driver path: connect, DDL, one-INSERT
batches through BatchingSink, typed read-back.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pipeline.warehouse import BatchingSink, Warehouse, WarehouseError, open_warehouse
from tests.clickhouse_server import (
    ClickHouseEndpoint,
    find_clickhouse_server,
    require_clickhouse_server,
    running_clickhouse_server,
)

# Imported (re-exported) so pytest finds the session fixture in this module.
from tests.clickhouse_server import clickhouse_server as clickhouse_server

ROUND_TRIP_COLUMNS = ("id", "dealer_id", "comment", "n_responses", "score", "nps", "occurred_at")
# Old-server syntax: no Map/DateTime64/LowCardinality-by-default, explicit PARTITION BY.
ROUND_TRIP_DDL = """
CREATE TABLE round_trip
(
    id UInt32,
    dealer_id String,
    comment String,
    n_responses UInt32,
    score Float64,
    nps Nullable(Float64),
    occurred_at DateTime('UTC')
)
ENGINE = MergeTree()
PARTITION BY toYYYYMM(occurred_at)
ORDER BY id
"""


@pytest.fixture
def server_warehouse(clickhouse_server: ClickHouseEndpoint) -> Iterator[Warehouse]:
    warehouse = open_warehouse(clickhouse_server.url("default"))
    try:
        yield warehouse
    finally:
        warehouse.close()


def _round_trip_rows(count: int) -> list[tuple[Any, ...]]:
    start = datetime(2026, 3, 1, 8, 30, tzinfo=UTC)
    awkward = ["plain", 'it\'s "quoted"', "back\\slash", "new\nline\ttab", "服务很好 👍", ""]
    return [
        (
            index,
            f"D{index % 37:03d}",
            awkward[index % len(awkward)],
            index % 11,
            index / 7,
            None if index % 5 == 0 else (index % 201) - 100.0,
            start + timedelta(minutes=index),
        )
        for index in range(count)
    ]


@pytest.mark.integration
def test_batching_sink_round_trips_2000_rows_on_clickhouse_server(
    server_warehouse: Warehouse,
) -> None:
    server_warehouse.execute("DROP TABLE IF EXISTS round_trip")
    server_warehouse.execute(ROUND_TRIP_DDL)
    rows = _round_trip_rows(2000)
    sink = BatchingSink(server_warehouse, "default.round_trip", ROUND_TRIP_COLUMNS, max_rows=2000)

    assert sink.write(rows[:1500]) == 0  # below max_rows and younger than max_age_s
    assert sink.pending == 1500
    assert sink.write(rows[1500:]) == 2000
    assert (sink.pending, sink.rows_written, sink.batches_written) == (0, 2000, 1)

    names, stored = server_warehouse.query(
        "SELECT id, dealer_id, comment, n_responses, score, nps, occurred_at "
        "FROM round_trip ORDER BY id"
    )
    assert names == list(ROUND_TRIP_COLUMNS)
    assert stored == rows
    assert stored[3][2] == "new\nline\ttab"
    assert stored[0][5] is None
    assert stored[0][6].tzinfo is not None


@pytest.mark.integration
def test_server_warehouse_reports_version_and_empty_results(server_warehouse: Warehouse) -> None:
    names, rows = server_warehouse.query("SELECT version() AS server_version")
    assert names == ["server_version"]
    assert rows[0][0].split(".")[0].isdigit()
    assert server_warehouse.query("SELECT 1 AS one WHERE 0") == (["one"], [])


@pytest.mark.integration
def test_missing_database_in_url_is_explained(clickhouse_server: ClickHouseEndpoint) -> None:
    with pytest.raises(WarehouseError, match="database 'no_such_db' does not exist"):
        open_warehouse(clickhouse_server.url("no_such_db"))


@pytest.mark.integration
def test_server_errors_surface_as_warehouse_error(server_warehouse: Warehouse) -> None:
    with pytest.raises(WarehouseError, match="no_such_table"):
        server_warehouse.insert("default.no_such_table", ["id"], [(1,)])
    # The connection is still usable after a failed statement.
    assert server_warehouse.query("SELECT 2") == (["2"], [(2,)])


@pytest.mark.integration
def test_running_clickhouse_server_stops_the_server(tmp_path: Path) -> None:
    binary = require_clickhouse_server()
    with running_clickhouse_server(binary, tmp_path) as endpoint:
        host, port = endpoint
        assert host == "127.0.0.1"
        warehouse = open_warehouse(endpoint.url())
        try:
            assert warehouse.query("SELECT 40 + 2 AS answer") == (["answer"], [(42,)])
        finally:
            warehouse.close()
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect((host, port))


def test_missing_binary_is_skipped_outside_ci() -> None:
    env = {"CLICKHOUSE_SERVER_BIN": "/nonexistent/clickhouse-server", "CI": ""}
    assert find_clickhouse_server(env) is None
    with pytest.raises(pytest.skip.Exception, match="clickhouse-server binary not found"):
        require_clickhouse_server(env)


@pytest.mark.parametrize("ci_value", ["true", "1", "yes"])
def test_missing_binary_fails_under_ci(ci_value: str) -> None:
    env = {"CLICKHOUSE_SERVER_BIN": "/nonexistent/clickhouse-server", "CI": ci_value}
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        require_clickhouse_server(env)


def test_binary_override_must_be_executable(tmp_path: Path) -> None:
    not_executable = tmp_path / "clickhouse-server"
    not_executable.write_text("")
    assert find_clickhouse_server({"CLICKHOUSE_SERVER_BIN": str(not_executable)}) is None
    not_executable.chmod(0o755)
    assert find_clickhouse_server({"CLICKHOUSE_SERVER_BIN": str(not_executable)}) == str(
        not_executable
    )
