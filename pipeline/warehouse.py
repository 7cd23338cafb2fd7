"""ClickHouse storage: the `csi` schema, two interchangeable backends and a batching sink.

Backends, chosen by URL in :func:`open_warehouse`:

* ``chdb://PATH`` — embedded ClickHouse (chdb) keeping its data in ``PATH``. ClickHouse
  locks a data directory for one process, and chdb runs one data directory per process.
* ``clickhouse://[user[:password]@]HOST:PORT/DB[?secure=1&verify=1&ca_certs=PATH]`` — a
  ClickHouse server over the native protocol (clickhouse-driver), TLS with ``secure=1``;
  the password may instead come from CSI_WAREHOUSE_PASSWORD(_FILE), see open_warehouse.

Both take rows of plain Python values and return rows of plain Python values, so the
worker, the tests and the dashboards' helpers do not care which one is behind a URL.
"""

from __future__ import annotations

import base64
import dataclasses
import errno
import fcntl
import hashlib
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, tzinfo
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qsl, unquote, urlsplit
from zoneinfo import ZoneInfo

import orjson

from pipeline.alerts import Alert, Case
from pipeline.config import (
    ENV_WAREHOUSE_PASSWORD,
    REDACTED,
    redact_url,
    warehouse_password_from_env,
)
from pipeline.metrics import Figures

CSI_DATABASE = "csi"
EVENTS_TABLE = f"{CSI_DATABASE}.events"
METRIC_SNAPSHOTS_TABLE = f"{CSI_DATABASE}.metric_snapshots"
DEAD_LETTERS_TABLE = f"{CSI_DATABASE}.dead_letters"
ALERTS_TABLE = f"{CSI_DATABASE}.alerts"
CASES_TABLE = f"{CSI_DATABASE}.cases"
PIPELINE_HEALTH_TABLE = f"{CSI_DATABASE}.pipeline_health"

DEAD_LETTER_PREVIEW_CHARS = 500
"""How much of a rejected message's text `raw_preview` keeps; `raw_b64` keeps it all."""

# Each table is described once as (column, type) pairs; the DDL and the column-order
# constants the worker builds rows with are both derived from it, so they cannot drift.
EVENTS_SCHEMA: tuple[tuple[str, str], ...] = (
    ("event_id", "UUID"),
    ("event_type", "LowCardinality(String)"),
    ("schema_version", "UInt16"),
    ("dealer_id", "String"),
    ("department", "LowCardinality(String)"),
    ("occurred_at", "DateTime64(3, 'UTC')"),
    ("customer_ref", "String"),
    ("source", "LowCardinality(String)"),
    ("payload", "String"),
    ("topic", "String"),
    ("partition", "UInt32"),
    ("offset", "Int64"),
    ("ingested_at", "DateTime64(3, 'UTC')"),
)
# ClickHouse type of each kind of figure in `pipeline.metrics.Figures`.
_FIGURE_TYPES = {
    "int": "UInt32",
    "float | None": "Nullable(Float64)",
    "int | None": "Nullable(Int32)",  # a roll-up may pass through a negative backlog
    "dict[str, float]": "Map(String, Float64)",
    "dict[str, int]": "Map(String, UInt32)",
    "str": "LowCardinality(String)",
}
FIGURE_SCHEMA: tuple[tuple[str, str], ...] = tuple(
    (f.name, _FIGURE_TYPES[str(f.type)]) for f in dataclasses.fields(Figures)
)
"""One column per metric, derived from `Figures`, so the table follows the formulas."""

METRIC_SNAPSHOTS_SCHEMA: tuple[tuple[str, str], ...] = (
    ("scope", "LowCardinality(String)"),  # dealer, region, brand, network
    ("key", "String"),
    ("region", "LowCardinality(String)"),  # of the dealer or region; '' above it
    ("brand", "LowCardinality(String)"),  # of the dealer or brand; '' above it
    ("department", "LowCardinality(String)"),
    ("window", "LowCardinality(String)"),  # day, 7d, 30d, 90d, month
    ("window_start", "Date"),
    ("window_end", "Date"),
    *FIGURE_SCHEMA,
    ("computed_at", "DateTime64(3, 'UTC')"),
    ("version", "UInt64"),
)
DEAD_LETTERS_SCHEMA: tuple[tuple[str, str], ...] = (
    ("dead_letter_id", "String"),
    ("received_at", "DateTime64(3, 'UTC')"),
    ("source_topic", "String"),
    ("partition", "UInt32"),
    ("offset", "Int64"),
    ("key", "String"),
    ("reason", "String"),
    ("raw_b64", "String"),
    ("raw_preview", "String"),
)

# ClickHouse type of each kind of field of `pipeline.alerts.Alert` and `Case`.
_RECORD_TYPES = {
    "str": "String",
    "int": "UInt32",
    "datetime": "DateTime64(3, 'UTC')",
    "datetime | None": "Nullable(DateTime64(3, 'UTC'))",
    "float | None": "Nullable(Float64)",
    "list[str]": "Array(String)",
}
ALERTS_SCHEMA: tuple[tuple[str, str], ...] = (
    *((f.name, _RECORD_TYPES[str(f.type)]) for f in dataclasses.fields(Alert)),
    ("version", "UInt8"),  # 1 open, 2 closed: the closed row wins under FINAL
)
"""One row per alert and status, derived from `Alert`."""
CASES_SCHEMA: tuple[tuple[str, str], ...] = tuple(
    (f.name, _RECORD_TYPES[str(f.type)])
    for f in dataclasses.fields(Case)
    # state the worker keeps for itself: replayed actions, hot alerts to close
    if f.name not in ("action_ids", "open_hot_alerts")
)
"""One row per case change, derived from `Case`; `seq` is the version."""

PIPELINE_HEALTH_SCHEMA: tuple[tuple[str, str], ...] = (
    ("measured_at", "DateTime64(3, 'UTC')"),
    ("worker", "String"),
    # events_processed (key: event type), dead_letters, consumer_lag (key: topic),
    # sink_flush_seconds, sink_rows_written, sink_pending_rows (key: table)
    ("metric", "LowCardinality(String)"),
    ("key", "String"),
    ("value", "Float64"),
)
"""The worker's own measurements, every few seconds, for the pipeline-health dashboard."""

EVENTS_COLUMNS: tuple[str, ...] = tuple(name for name, _ in EVENTS_SCHEMA)
METRIC_SNAPSHOTS_COLUMNS: tuple[str, ...] = tuple(name for name, _ in METRIC_SNAPSHOTS_SCHEMA)
DEAD_LETTERS_COLUMNS: tuple[str, ...] = tuple(name for name, _ in DEAD_LETTERS_SCHEMA)
ALERTS_COLUMNS: tuple[str, ...] = tuple(name for name, _ in ALERTS_SCHEMA)
CASES_COLUMNS: tuple[str, ...] = tuple(name for name, _ in CASES_SCHEMA)
PIPELINE_HEALTH_COLUMNS: tuple[str, ...] = tuple(name for name, _ in PIPELINE_HEALTH_SCHEMA)

log = logging.getLogger("csi.warehouse")


def alert_row(alert: Alert) -> tuple[Any, ...]:
    return tuple(getattr(alert, column) for column in ALERTS_COLUMNS)


def case_row(case: Case) -> tuple[Any, ...]:
    return tuple(getattr(case, column) for column in CASES_COLUMNS)


def quote_identifier(name: str) -> str:
    """Backtick-quote one identifier (`window`, `partition`, `offset` are keywords)."""
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def quote_table(table: str) -> str:
    """Quote ``table`` or ``database.table`` for use in SQL."""
    return ".".join(quote_identifier(part) for part in table.split("."))


def _create_table_ddl(table: str, schema: Sequence[tuple[str, str]], engine_clause: str) -> str:
    column_lines = ",\n".join(f"    {quote_identifier(name)} {type_}" for name, type_ in schema)
    return f"CREATE TABLE IF NOT EXISTS {quote_table(table)}\n(\n{column_lines}\n)\n{engine_clause}"


# Needs ClickHouse >= 23.8 (Map columns, DateTime64 time zones, LowCardinality defaults).
SCHEMA_DDL: list[str] = [
    f"CREATE DATABASE IF NOT EXISTS {quote_identifier(CSI_DATABASE)}",
    # ReplacingMergeTree collapses rows with the same sorting key within a partition, so a
    # replayed event (same event_id, same occurred_at, hence same month) counts once under
    # FINAL; the most recently ingested copy is the one kept.
    _create_table_ddl(
        EVENTS_TABLE,
        EVENTS_SCHEMA,
        "ENGINE = ReplacingMergeTree(ingested_at)\n"
        "PARTITION BY toYYYYMM(occurred_at)\n"
        "ORDER BY event_id",
    ),
    # One row per (scope, key, department, window, window_end); recomputations insert a new
    # row with a higher version and FINAL shows only the latest.
    _create_table_ddl(
        METRIC_SNAPSHOTS_TABLE,
        METRIC_SNAPSHOTS_SCHEMA,
        "ENGINE = ReplacingMergeTree(version)\n"
        # key last: the league table reads one row per dealer for one window end,
        # which this order keeps together (benchmarks/dashboards_speed.py: league
        # table p95 from ~1.1 s to ~0.2 s on 3 years x 1,000 dealers)
        "ORDER BY (scope, department, `window`, window_end, key)",
    ),
    # dead_letter_id is topic:partition:offset, so re-consuming a bad message after a
    # restart does not count it twice.
    _create_table_ddl(
        DEAD_LETTERS_TABLE,
        DEAD_LETTERS_SCHEMA,
        "ENGINE = ReplacingMergeTree()\nORDER BY dead_letter_id",
    ),
    # An alert's ids are deterministic, so a replayed batch rewrites the same rows;
    # the closed record (version 2) replaces the open one under FINAL.
    _create_table_ddl(
        ALERTS_TABLE,
        ALERTS_SCHEMA,
        "ENGINE = ReplacingMergeTree(version)\n"
        "PARTITION BY toYYYYMM(detected_at)\n"
        "ORDER BY alert_id",
    ),
    # One row per case change; FINAL keeps the latest (highest seq).
    _create_table_ddl(
        CASES_TABLE, CASES_SCHEMA, "ENGINE = ReplacingMergeTree(seq)\nORDER BY case_id"
    ),
    # the worker's own measurements; kept 90 days
    _create_table_ddl(
        PIPELINE_HEALTH_TABLE,
        PIPELINE_HEALTH_SCHEMA,
        "ENGINE = MergeTree\nORDER BY (metric, measured_at)\n"
        "TTL toDateTime(measured_at) + INTERVAL 90 DAY",
    ),
]


class WarehouseError(RuntimeError):
    """The warehouse rejected a statement or could not be reached."""


class WarehouseLockedError(WarehouseError):
    """A chdb data directory is in use by another process."""


@runtime_checkable
class Warehouse(Protocol):
    """What the pipeline needs from ClickHouse, whichever backend provides it."""

    def execute(self, sql: str) -> None:
        """Run a statement and discard any result."""
        ...

    def query(self, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run a query; return its column names and its rows as Python values."""
        ...

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Insert ``rows`` (values in ``columns`` order) into ``table`` in one INSERT."""
        ...

    def close(self) -> None:
        """Release the connection or the embedded engine; idempotent."""
        ...


def create_schema(warehouse: Warehouse) -> None:
    """Create the `csi` database and its tables if they do not exist yet."""
    for statement in SCHEMA_DDL:
        warehouse.execute(statement)


def dead_letter_row(
    *,
    source_topic: str,
    partition: int,
    offset: int,
    key: bytes | str | None,
    reason: str,
    raw: bytes,
    received_at: datetime,
) -> tuple[Any, ...]:
    """A `csi.dead_letters` row in DEAD_LETTERS_COLUMNS order for one rejected message.

    ``raw_b64`` keeps the original bytes exactly (invalid UTF-8 and NUL included);
    ``raw_preview`` is only for people reading the table.
    """
    key_text = key.decode("utf-8", errors="replace") if isinstance(key, bytes) else key or ""
    return (
        f"{source_topic}:{partition}:{offset}",
        received_at,
        source_topic,
        partition,
        offset,
        key_text,
        reason,
        base64.b64encode(raw).decode("ascii"),
        raw.decode("utf-8", errors="replace")[:DEAD_LETTER_PREVIEW_CHARS],
    )


def refused_row_dead_letter(
    table: str, row: Sequence[Any], columns: Sequence[str], reason: str
) -> tuple[Any, ...]:
    """A dead letter for a row the warehouse refused: its values as JSON, the
    warehouse's reason; the offset is a hash of the row, so a retried row is
    one dead letter."""
    raw = orjson.dumps(dict(zip(columns, row, strict=True)), default=str)
    offset = int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big", signed=True)
    return dead_letter_row(
        source_topic=f"sink:{table}", partition=0, offset=offset, key=None,
        reason=f"the warehouse refused this {table} row: {reason}"[:2000], raw=raw,
        received_at=datetime.now(UTC),
    )  # fmt: skip


def _check_row_widths(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    width = len(columns)
    for index, row in enumerate(rows):
        if len(row) != width:
            raise ValueError(
                f"row {index} has {len(row)} values but there are {width} columns {list(columns)}"
            )


# --------------------------------------------------------------------------- chdb backend

# JSON output settings for query(): NaN/inf as "nan"/"inf" instead of null (which would
# read back as NULL); big integers and decimals as strings (exact); invalid UTF-8 in
# String columns replaced, so one bad value cannot make a whole result undecodable;
# tuples as arrays.
_CHDB_SESSION_SETTINGS = (
    "SET output_format_json_quote_denormals = 1, "
    "output_format_json_quote_64bit_integers = 1, "
    "output_format_json_quote_decimals = 1, "
    "output_format_json_validate_utf8 = 1, "
    "output_format_json_named_tuples_as_objects = 0"
)
# best_effort parses the ISO 8601 with offset that orjson writes for aware datetimes;
# Python tuples arrive as JSON arrays, also for named Tuple columns.
_CHDB_INSERT_SETTINGS = (
    "SETTINGS date_time_input_format = 'best_effort', input_format_json_named_tuples_as_objects = 0"
)
_CHDB_INSERT_FORMAT = "JSONCompactColumns"
_JSON_OPTIONS = orjson.OPT_NAIVE_UTC | orjson.OPT_NON_STR_KEYS


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    raise TypeError(f"cannot store a {type(value).__name__} value in ClickHouse: {value!r}")


def _has_non_finite_float(value: Any) -> bool:
    if value.__class__ is float:
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_has_non_finite_float(item) for item in value.values())
    if isinstance(value, list | tuple):
        return any(_has_non_finite_float(item) for item in value)
    return False


def _column_has_non_finite_float(column: Sequence[Any]) -> bool:
    # Columns are typed, so most hold no floats at all; the set of value types (built at C
    # speed) lets the scan skip them, and plain float columns are checked without recursion.
    kinds = set(map(type, column))
    if kinds & {dict, list, tuple}:
        return any(_has_non_finite_float(value) for value in column)
    if float not in kinds:
        return False
    return not all(map(math.isfinite, (value for value in column if value.__class__ is float)))


def _with_non_finite_as_text(value: Any) -> Any:
    # ClickHouse parses "nan", "inf" and "-inf" (quoted) into Float columns; orjson would
    # otherwise write null, which a Nullable(Float64) column reads as NULL.
    if value.__class__ is float:
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {key: _with_non_finite_as_text(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_with_non_finite_as_text(item) for item in value]
    return value


def encode_columns_json(column_values: Sequence[Sequence[Any]]) -> bytes:
    """JSONCompactColumns body (one JSON array per column) for a chdb INSERT.

    Values travel as JSON data, never as SQL text, so no string content can change the
    statement; quotes, backslashes, newlines, NUL and any Unicode arrive unchanged.
    """
    body = orjson.dumps(column_values, default=_json_default, option=_JSON_OPTIONS)
    # orjson writes NaN/inf as null; only look for them when a null is present at all.
    if b"null" in body and any(_column_has_non_finite_float(column) for column in column_values):
        body = orjson.dumps(
            [_with_non_finite_as_text(column) for column in column_values],
            default=_json_default,
            option=_JSON_OPTIONS,
        )
    return body


def split_top_level(arguments: str) -> list[str]:
    """Split ``"String, Map(String, UInt8), 'a,b'"`` at its top-level commas
    (parentheses and quotes respected): type arguments here, macro arguments in
    `dashboards.macros`."""
    parts: list[str] = []
    depth = 0
    quote: str | None = None
    start = 0
    index = 0
    while index < len(arguments):
        char = arguments[index]
        if quote is not None:
            if char == "\\":
                index += 1
            elif char == quote:
                quote = None
        elif char in "'`\"":
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(arguments[start:index].strip())
            start = index + 1
        index += 1
    tail = arguments[start:].strip()
    if tail:
        parts.append(tail)
    return parts


def _parse_type(type_name: str) -> tuple[str, list[str]]:
    type_name = type_name.strip()
    opening = type_name.find("(")
    if opening < 0 or not type_name.endswith(")"):
        return type_name, []
    return type_name[:opening], split_top_level(type_name[opening + 1 : -1])


def _time_zone(quoted_name: str) -> tzinfo:
    name = quoted_name.strip().strip("'")
    return UTC if name in ("UTC", "Etc/UTC") else ZoneInfo(name)


def _identity(value: Any) -> Any:
    return value


def _to_date(value: Any) -> date:
    return date.fromisoformat(value)


def _datetime_converter(zone: tzinfo | None) -> Callable[[Any], Any]:
    def convert(value: Any) -> datetime:
        parsed = datetime.fromisoformat(value)
        # Like clickhouse-driver: aware in the column's zone when it names one, otherwise
        # naive wall-clock time of the session's zone.
        return parsed if zone is None else parsed.replace(tzinfo=zone)

    return convert


def _nullable_converter(inner: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else inner(value)


def _array_converter(item: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: [item(element) for element in value]


def _map_converter(key: Callable[[Any], Any], item: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: {key(name): item(element) for name, element in value.items()}


def _tuple_converter(items: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    def convert(value: Any) -> tuple[Any, ...]:
        return tuple(item(element) for item, element in zip(items, value, strict=True))

    return convert


def _tuple_element_type(argument: str) -> str:
    # Named tuple elements are written "name Type"; unnamed ones are just "Type".
    first_word, _, rest = argument.partition(" ")
    return rest if rest and "(" not in first_word else argument


@lru_cache(maxsize=256)
def python_converter(type_name: str) -> Callable[[Any], Any]:
    """Function turning one JSONCompact value of ClickHouse type ``type_name`` into Python."""
    base, arguments = _parse_type(type_name)
    if base in ("LowCardinality", "SimpleAggregateFunction"):
        return python_converter(arguments[-1])
    if base == "Nullable":
        return _nullable_converter(python_converter(arguments[0]))
    if base == "Array":
        return _array_converter(python_converter(arguments[0]))
    if base == "Map":
        return _map_converter(python_converter(arguments[0]), python_converter(arguments[1]))
    if base == "Tuple":
        return _tuple_converter(
            [python_converter(_tuple_element_type(argument)) for argument in arguments]
        )
    if base.startswith(("Int", "UInt")):
        return int
    if base.startswith("Float"):
        return float
    if base.startswith("Decimal"):
        return lambda value: Decimal(str(value))
    if base == "Bool":
        return bool
    if base == "UUID":
        return uuid.UUID
    if base in ("Date", "Date32"):
        return _to_date
    if base == "DateTime":
        return _datetime_converter(_time_zone(arguments[0]) if arguments else None)
    if base == "DateTime64":
        return _datetime_converter(_time_zone(arguments[1]) if len(arguments) > 1 else None)
    return _identity


def _status_file_owner_pid(status_file: Path) -> int | None:
    # ClickHouse writes "PID: 1234" as the first line of <data dir>/status.
    try:
        first_line = status_file.read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return None
    label, _, value = first_line.partition(":")
    if label.strip() != "PID":
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


def chdb_dir_owner_pid(data_dir: Path) -> int | None:
    """PID of another process holding the ClickHouse lock on ``data_dir``, else None.

    ClickHouse takes an exclusive flock on ``<data dir>/status`` for as long as it runs.
    chdb shares one engine between the sessions of a process, so a lock held by this
    very process is not a conflict.
    """
    status_file = data_dir / "status"
    try:
        descriptor = os.open(status_file, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        owner_pid = _status_file_owner_pid(status_file)
        if owner_pid == os.getpid():
            return None
        # Unknown owner (unreadable status file) is still another process's lock.
        return owner_pid if owner_pid is not None else -1
    else:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return None
    finally:
        os.close(descriptor)


def _locked_error(data_dir: Path, owner_pid: int) -> WarehouseLockedError:
    owner = f"process {owner_pid}" if owner_pid > 0 else "another process"
    return WarehouseLockedError(
        f"chdb data dir {data_dir} is locked by {owner}: one process owns a chdb data dir "
        "at a time. Stop that process, use another chdb:// path, or point every process at "
        "a ClickHouse server (clickhouse://HOST:PORT/DB)."
    )


class ChdbWarehouse:
    """Embedded ClickHouse (chdb) on a data directory, or in memory for ``:memory:``."""

    def __init__(self, path: str) -> None:
        # chdb is the optional "embedded" extra; import it only when a chdb:// URL is used.
        from chdb import session as chdb_session

        # chdb ships py.typed but leaves Session's signature untyped.
        open_session: Callable[[str], Any] = chdb_session.Session
        self.path = path
        data_dir = None if path == ":memory:" else Path(path)
        if data_dir is not None:
            data_dir.mkdir(parents=True, exist_ok=True)
            owner_pid = chdb_dir_owner_pid(data_dir)
            if owner_pid is not None:
                raise _locked_error(data_dir, owner_pid)
        try:
            self._session: Any = open_session(path)
        except RuntimeError as error:
            # chdb reports a foreign lock only as "Error initializing EmbeddedServer" (the
            # real cause goes to stderr), so look again: another process may have won.
            if data_dir is not None:
                owner_pid = chdb_dir_owner_pid(data_dir)
                if owner_pid is not None:
                    raise _locked_error(data_dir, owner_pid) from error
            raise WarehouseError(
                f"cannot open chdb data dir {path}: {error} (chdb runs one data dir per "
                "process; close other warehouses on a different path first)"
            ) from error
        # One statement at a time: a streaming insert holds the connection until finish().
        self._lock = threading.Lock()
        self._closed = False
        self._run(_CHDB_SESSION_SETTINGS, "Null")

    def _run(self, sql: str, output_format: str) -> bytes:
        with self._lock:
            if self._closed:
                raise WarehouseError(f"chdb warehouse {self.path} is closed")
            try:
                result = self._session.query(sql, output_format)
            except RuntimeError as error:
                raise WarehouseError(str(error)) from error
        data: bytes = result.bytes()
        return data

    def execute(self, sql: str) -> None:
        self._run(sql, "Null")

    def query(self, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        output = self._run(sql, "JSONCompact")
        if not output:
            return [], []
        document = orjson.loads(output)
        names = [column["name"] for column in document["meta"]]
        converters = [python_converter(column["type"]) for column in document["meta"]]
        rows = [
            tuple(convert(value) for convert, value in zip(converters, row, strict=True))
            for row in document["data"]
        ]
        return names, rows

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        _check_row_widths(columns, rows)
        body = encode_columns_json(list(zip(*rows, strict=True)))
        column_list = ", ".join(quote_identifier(column) for column in columns)
        statement = f"INSERT INTO {quote_table(table)} ({column_list}) {_CHDB_INSERT_SETTINGS}"
        with self._lock:
            if self._closed:
                raise WarehouseError(f"chdb warehouse {self.path} is closed")
            try:
                with self._session.send_insert(statement, _CHDB_INSERT_FORMAT) as inserter:
                    inserter.append(body)
                    inserter.finish()
            except RuntimeError as error:
                raise WarehouseError(f"insert into {table} failed: {error}") from error

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._session.close()


# ---------------------------------------------------------------- ClickHouse server backend

_UNKNOWN_DATABASE = 81
_AUTHENTICATION_FAILED = frozenset({192, 193, 194, 516})
"""UNKNOWN_USER, WRONG_PASSWORD, REQUIRED_PASSWORD (older servers); AUTHENTICATION_FAILED."""
CLICKHOUSE_PORT = 9000
CLICKHOUSE_SECURE_PORT = 9440
"""ClickHouse's default native-protocol ports, plain and TLS (``tcp_port_secure``)."""
_TLS_OPTIONS = ("verify", "ca_certs", "certfile", "keyfile")
CLICKHOUSE_URL_OPTIONS = ("secure", *_TLS_OPTIONS)
"""Query-string options of a clickhouse:// URL (clickhouse-driver's names)."""


@dataclass(frozen=True, repr=False)
class ClickHouseAddress:
    """Where a clickhouse:// URL points and how to connect; its repr masks the password."""

    host: str
    port: int
    database: str
    user: str
    password: str
    secure: bool = False
    """TLS (``?secure=1``), to the server's ``tcp_port_secure`` (9440 by default)."""
    verify: bool = True
    """Verify the server's certificate and host name (``?verify=0`` turns both off)."""
    ca_certs: str | None = None
    """PEM file of the CA that signed the server's certificate; unset: certifi's/system CAs."""
    certfile: str | None = None
    """Client certificate (PEM) for servers that require one."""
    keyfile: str | None = None
    """The client certificate's key, if not in ``certfile``."""

    def __repr__(self) -> str:
        shown = {
            item.name: REDACTED if item.name == "password" and self.password else repr(value)
            for item in dataclasses.fields(self)
            if (value := getattr(self, item.name)) is not None or item.name == "password"
        }
        return f"ClickHouseAddress({', '.join(f'{k}={v}' for k, v in shown.items())})"

    @property
    def endpoint(self) -> str:
        """``host:port``, plus `` (TLS)`` when secure: how error messages name the server."""
        return f"{self.host}:{self.port}" + (" (TLS)" if self.secure else "")


def _server_message(error: BaseException | None) -> str:
    """A ClickHouse server error's message without the server's stack trace."""
    text = str(getattr(error, "message", None) or error)
    return " ".join(text.split("Stack trace:", 1)[0].split()).removeprefix("DB::Exception: ")


def _url_flag(url: str, name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"clickhouse:// URL option {name}={value!r} is not 0 or 1: {redact_url(url)}")


def parse_clickhouse_url(url: str) -> ClickHouseAddress:
    """Parse ``clickhouse://[user[:password]@]HOST[:PORT][/DB][?OPTIONS]`` (DB default).

    User and password may be percent-encoded (``p%40ss`` for ``p@ss``). OPTIONS are
    clickhouse-driver's TLS settings: ``secure=1`` (TLS; the port then defaults to 9440
    instead of 9000), ``verify=0`` (do not verify the server's certificate: testing
    only), ``ca_certs=PATH``, ``certfile=PATH``, ``keyfile=PATH``. Error messages show the
    URL with its password masked.
    """
    shown = redact_url(url)
    parts = urlsplit(url)
    if parts.scheme != "clickhouse":
        raise ValueError(f"not a clickhouse:// URL: {shown!r}")
    if parts.fragment:
        raise ValueError(f"clickhouse:// URLs take no fragment: {shown!r}")
    if not parts.hostname:
        raise ValueError(f"clickhouse:// URL has no host: {shown!r}")
    try:
        explicit_port = parts.port
    except ValueError as error:
        raise ValueError(f"clickhouse:// URL has an invalid port: {shown!r}") from error
    database = parts.path.strip("/") or "default"
    if "/" in database:
        raise ValueError(f"clickhouse:// URL path must be one database name: {shown!r}")
    options: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in CLICKHOUSE_URL_OPTIONS:
            raise ValueError(
                f"clickhouse:// URL option {name!r} is unknown; the options are "
                f"{', '.join(CLICKHOUSE_URL_OPTIONS)} (the password goes before the host or "
                f"in CSI_WAREHOUSE_PASSWORD): {shown!r}"
            )
        if name in options:
            raise ValueError(f"clickhouse:// URL option {name!r} is given twice: {shown!r}")
        options[name] = value
    secure = _url_flag(url, "secure", options["secure"]) if "secure" in options else False
    if not secure and (stray := [name for name in _TLS_OPTIONS if name in options]):
        raise ValueError(
            f"clickhouse:// URL option(s) {', '.join(stray)} apply to TLS only: add secure=1 "
            f"({shown!r})"
        )
    for name in ("ca_certs", "certfile", "keyfile"):
        if name in options and not options[name]:
            raise ValueError(f"clickhouse:// URL option {name} is empty: {shown!r}")
    if "keyfile" in options and "certfile" not in options:
        raise ValueError(f"clickhouse:// URL option keyfile needs certfile: {shown!r}")
    default_port = CLICKHOUSE_SECURE_PORT if secure else CLICKHOUSE_PORT
    return ClickHouseAddress(
        host=parts.hostname,
        port=explicit_port or default_port,
        database=unquote(database),
        user=unquote(parts.username) if parts.username else "default",
        password=unquote(parts.password) if parts.password else "",
        secure=secure,
        verify=_url_flag(url, "verify", options["verify"]) if "verify" in options else True,
        ca_certs=options.get("ca_certs"),
        certfile=options.get("certfile"),
        keyfile=options.get("keyfile"),
    )


class ClickHouseServerWarehouse:
    """A ClickHouse server over the native TCP protocol (clickhouse-driver), TLS optional."""

    def __init__(self, address: ClickHouseAddress) -> None:
        from clickhouse_driver import Client
        from clickhouse_driver import errors as driver_errors

        self.address = address
        self._driver_errors: tuple[type[BaseException], ...] = (
            driver_errors.Error,
            OSError,
            EOFError,
        )
        for name in ("ca_certs", "certfile", "keyfile"):
            path = getattr(address, name)
            if path is not None and not Path(path).is_file():
                raise WarehouseError(
                    f"ClickHouse at {address.endpoint}: {name} file {path} does not exist"
                )
        tls: dict[str, Any] = {}
        if address.secure:
            tls = {"secure": True, "verify": address.verify}
            tls |= {
                name: getattr(address, name)
                for name in ("ca_certs", "certfile", "keyfile")
                if getattr(address, name) is not None
            }
        self._client: Any = Client(
            host=address.host,
            port=address.port,
            database=address.database,
            user=address.user,
            password=address.password,
            **tls,
        )
        # One client is one connection; the lock lets a worker flush from a thread.
        self._lock = threading.Lock()
        # Connect now, so a wrong address fails here and not at the first flush.
        try:
            self._call("SELECT 1")
        except WarehouseError as error:
            cause = error.__cause__
            code = getattr(cause, "code", None)
            if code == _UNKNOWN_DATABASE:
                raise WarehouseError(
                    f"database {address.database!r} does not exist on {address.endpoint}; "
                    "connect to /default (the csi tables are always qualified with their "
                    "database) or create it first"
                ) from cause
            if code in _AUTHENTICATION_FAILED:
                given = "a password" if address.password else "no password"
                raise WarehouseError(
                    f"ClickHouse at {address.endpoint} refused user {address.user!r} ({given} "
                    "given): wrong password or unknown user. The password comes from the "
                    "clickhouse:// URL or, when the URL has none, from CSI_WAREHOUSE_PASSWORD "
                    f"or CSI_WAREHOUSE_PASSWORD_FILE. Server said: {_server_message(cause)}"
                ) from cause
            raise

    def _call(self, sql: str, rows: Sequence[Sequence[Any]] | None = None) -> Any:
        with self._lock:
            try:
                if rows is None:
                    return self._client.execute(sql, with_column_types=True)
                return self._client.execute(sql, rows)
            except self._driver_errors as error:
                raise WarehouseError(f"ClickHouse at {self.address.endpoint}: {error}") from error

    def execute(self, sql: str) -> None:
        self._call(sql)

    def query(self, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
        rows, column_types = self._call(sql)
        return [name for name, _ in column_types], [tuple(row) for row in rows]

    def insert(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        _check_row_widths(columns, rows)
        column_list = ", ".join(quote_identifier(column) for column in columns)
        self._call(f"INSERT INTO {quote_table(table)} ({column_list}) VALUES", rows)

    def close(self) -> None:
        with self._lock:
            self._client.disconnect()


WAREHOUSE_URL_FORMS = (
    "chdb://PATH (embedded chdb; relative or absolute path, or chdb://:memory:)",
    "clickhouse://[user[:password]@]HOST:PORT/DB[?secure=1&ca_certs=PATH] (ClickHouse server, "
    "native protocol; TLS with secure=1)",
)


def open_warehouse(url: str, *, password: str | None = None) -> Warehouse:
    """Open the warehouse a URL names; see WAREHOUSE_URL_FORMS.

    A clickhouse:// URL without a password takes ``password``, or when that is None the
    one in CSI_WAREHOUSE_PASSWORD / CSI_WAREHOUSE_PASSWORD_FILE, so the password need not
    be in the URL. Two different passwords (URL and the other source) are a ValueError
    rather than a silent choice. Errors show the URL with its password masked.
    """
    if url.startswith("chdb://"):
        location = url.removeprefix("chdb://")
        if not location:
            raise ValueError(f"chdb:// URL has no path: {url!r}")
        if "?" in location:
            raise ValueError(f"chdb:// URLs take no query string: {url!r}")
        if location == ":memory:":
            return ChdbWarehouse(location)
        return ChdbWarehouse(str(Path(location).expanduser().resolve()))
    if url.startswith("clickhouse://"):
        address = parse_clickhouse_url(url)
        supplied = password if password is not None else warehouse_password_from_env()
        if supplied and address.password and supplied != address.password:
            source = "the password argument" if password is not None else ENV_WAREHOUSE_PASSWORD
            raise ValueError(
                f"two different ClickHouse passwords: one in the warehouse URL "
                f"{redact_url(url)!r} and one in {source} (or its _FILE); keep one"
            )
        if supplied and not address.password:
            address = dataclasses.replace(address, password=supplied)
        return ClickHouseServerWarehouse(address)
    raise ValueError(
        f"unsupported warehouse URL {redact_url(url)!r}; accepted forms: "
        + "; ".join(WAREHOUSE_URL_FORMS)
    )


# ------------------------------------------------------------------------- batching sink


class BatchingSink:
    """Buffers rows for one table and writes them in one INSERT per batch.

    The sink contract of Quix Streams: ``write(batch)`` hands rows over, and they reach
    ClickHouse once the buffer holds ``max_rows`` rows or its oldest row is ``max_age_s``
    old. A failed flush keeps every row buffered, so the caller may retry without loss;
    commit consumer offsets only after a flush has returned.
    """

    def __init__(
        self,
        warehouse: Warehouse,
        table: str,
        columns: Sequence[str],
        *,
        max_rows: int = 1000,
        max_age_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        if max_age_s < 0:
            raise ValueError(f"max_age_s must not be negative, got {max_age_s}")
        self.warehouse = warehouse
        self.table = table
        self.columns: tuple[str, ...] = tuple(columns)
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self._clock = clock
        self._rows: list[Sequence[Any]] = []
        self._oldest_added_at: float | None = None
        self._rows_written = 0
        self._batches_written = 0
        self._last_flush_seconds = 0.0
        # The buffer lock keeps add() cheap while a flush runs in another thread; the
        # flush lock keeps batches in order.
        self._buffer_lock = threading.Lock()
        self._flush_lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Rows buffered and not yet written."""
        return len(self._rows)

    @property
    def rows_written(self) -> int:
        return self._rows_written

    @property
    def batches_written(self) -> int:
        return self._batches_written

    @property
    def last_flush_seconds(self) -> float:
        """Wall time of the last successful flush's INSERT."""
        return self._last_flush_seconds

    def add(self, rows: Iterable[Sequence[Any]]) -> None:
        """Buffer rows (values in ``columns`` order)."""
        new_rows = list(rows)
        if not new_rows:
            return
        # A malformed row is refused here, before it can poison every later batch.
        _check_row_widths(self.columns, new_rows)
        with self._buffer_lock:
            if not self._rows:
                self._oldest_added_at = self._clock()
            self._rows.extend(new_rows)

    def due(self) -> bool:
        """Whether the buffer is full or its oldest row has waited ``max_age_s``."""
        with self._buffer_lock:
            if not self._rows:
                return False
            if len(self._rows) >= self.max_rows:
                return True
            assert self._oldest_added_at is not None
            return self._clock() - self._oldest_added_at >= self.max_age_s

    def flush(self) -> int:
        """Write everything buffered in one INSERT; return the number of rows written."""
        with self._flush_lock:
            with self._buffer_lock:
                batch = self._rows
                oldest_added_at = self._oldest_added_at
                self._rows = []
                self._oldest_added_at = None
            if not batch:
                return 0
            started = time.perf_counter()
            try:
                self.warehouse.insert(self.table, self.columns, batch)
            except BaseException:
                with self._buffer_lock:
                    # Rows added meanwhile are younger; the batch goes back in front.
                    self._rows = batch + self._rows
                    self._oldest_added_at = oldest_added_at
                raise
            self._last_flush_seconds = time.perf_counter() - started
            self._rows_written += len(batch)
            self._batches_written += 1
            return len(batch)

    def flush_setting_aside(self) -> tuple[int, list[tuple[Sequence[Any], str]]]:
        """After a failed flush: insert the buffer by halves and return the rows
        the warehouse refused on their own, with its reason (a poison row must
        not block every later batch). When every row is refused the fault is not
        in the rows (table gone, warehouse down): they stay buffered, nothing is
        returned. Returns (rows written, refused rows)."""
        with self._flush_lock:
            with self._buffer_lock:
                batch, oldest_added_at = self._rows, self._oldest_added_at
                self._rows, self._oldest_added_at = [], None
            written: list[Sequence[Any]] = []
            refused: list[tuple[Sequence[Any], str]] = []

            def insert(rows: list[Sequence[Any]]) -> None:
                try:
                    self.warehouse.insert(self.table, self.columns, rows)
                    written.extend(rows)
                except Exception as error:
                    if len(rows) == 1:
                        refused.append((rows[0], str(error)))
                        return
                    insert(rows[: len(rows) // 2])
                    insert(rows[len(rows) // 2 :])

            # the whole batch was just refused (the caller's flush): start from its halves
            if len(batch) > 1:
                insert(batch[: len(batch) // 2])
                insert(batch[len(batch) // 2 :])
            if not written:
                with self._buffer_lock:
                    self._rows = batch + self._rows
                    self._oldest_added_at = oldest_added_at
                return 0, []
            self._rows_written += len(written)
            self._batches_written += 1
            return len(written), refused

    def write(self, batch: Iterable[Sequence[Any]]) -> int:
        """Add rows and flush if that made the buffer due; return rows written now."""
        self.add(batch)
        return self.flush() if self.due() else 0


class SinkSet:
    """One BatchingSink per `csi` table, so the worker flushes with one call."""

    def __init__(
        self,
        warehouse: Warehouse,
        *,
        max_rows: int = 1000,
        max_age_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        def sink(table: str, columns: Sequence[str]) -> BatchingSink:
            return BatchingSink(
                warehouse, table, columns, max_rows=max_rows, max_age_s=max_age_s, clock=clock
            )

        self.events = sink(EVENTS_TABLE, EVENTS_COLUMNS)
        self.metric_snapshots = sink(METRIC_SNAPSHOTS_TABLE, METRIC_SNAPSHOTS_COLUMNS)
        self.dead_letters = sink(DEAD_LETTERS_TABLE, DEAD_LETTERS_COLUMNS)
        self.alerts = sink(ALERTS_TABLE, ALERTS_COLUMNS)
        self.cases = sink(CASES_TABLE, CASES_COLUMNS)
        self.pipeline_health = sink(PIPELINE_HEALTH_TABLE, PIPELINE_HEALTH_COLUMNS)

    @property
    def snapshots(self) -> BatchingSink:
        """The metric_snapshots sink under the shorter name pipeline.worker uses."""
        return self.metric_snapshots

    @property
    def sinks(self) -> tuple[BatchingSink, ...]:
        return (
            self.events, self.metric_snapshots, self.dead_letters, self.alerts, self.cases,
            self.pipeline_health,
        )  # fmt: skip

    def health_rows(self, at: datetime, worker: str) -> list[tuple[Any, ...]]:
        """Each sink's last flush time, rows written and rows waiting."""
        rows: list[tuple[Any, ...]] = []
        for sink in self.sinks:
            table = sink.table.split(".")[-1]
            rows += [
                (at, worker, "sink_flush_seconds", table, sink.last_flush_seconds),
                (at, worker, "sink_rows_written", table, float(sink.rows_written)),
                (at, worker, "sink_pending_rows", table, float(sink.pending)),
            ]
        return rows

    @property
    def pending(self) -> int:
        return sum(sink.pending for sink in self.sinks)

    def flush_due(self) -> int:
        """Flush the sinks that are due; return the rows written."""
        return self._flush(only_due=True)

    def flush_all(self) -> int:
        """Flush every sink that holds rows; return the rows written."""
        return self._flush(only_due=False)

    def _flush(self, *, only_due: bool) -> int:
        # Tables are independent: one failing table must not hold back the others. The
        # first failure is raised after all were tried; failed rows stay buffered.
        written = 0
        failures: list[Exception] = []
        for sink in self.sinks:
            if only_due and not sink.due():
                continue
            try:
                written += sink.flush()
            except Exception as error:
                if sink is self.dead_letters:
                    failures.append(error)
                    continue
                done, refused = sink.flush_setting_aside()
                if not done:
                    failures.append(error)
                    continue
                written += done
                self.dead_letters.add(refused_row_dead_letter(sink.table, row, sink.columns, reason)
                                      for row, reason in refused)  # fmt: skip
                log.error(
                    "%s refused %d rows on their own: kept in csi.dead_letters (source "
                    "'sink:%s'); %d rows written", sink.table, len(refused), sink.table, done,
                )  # fmt: skip
        if failures:
            first = failures[0]
            for other in failures[1:]:
                first.add_note(f"also failed: {other}")
            raise first
        return written
