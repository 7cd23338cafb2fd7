"""The `grafana-clickhouse-datasource` plugin's macros and Grafana's variable
interpolation, done here the way they are done there, so that tests and
`csi report` run exactly the SQL Grafana sends to ClickHouse.

Supported (plugin v4 documentation, "Macros"): `$__timeFilter(col)`,
`$__timeFilter_ms(col)`, `$__dateFilter(col)`, `$__fromTime`, `$__toTime`,
`$__fromTime_ms`, `$__toTime_ms`, `$__timeInterval(col)`,
`$__timeInterval_ms(col)`, `$__interval_s`, `$__conditionalAll(cond, $var)`;
variables as `${name}`, `$name` and `${name:singlequote}`. The selection "All"
is `$__all`, which `$__conditionalAll` turns into `1=1`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from pipeline.warehouse import split_top_level

ALL = "$__all"


@dataclass(frozen=True)
class TimeRange:
    start: datetime
    end: datetime
    interval_s: int = 86_400
    """The panel's interval (Grafana derives it from width and range)."""


def _epoch(moment: datetime) -> int:
    return int(moment.astimezone(UTC).timestamp())


def _epoch_ms(moment: datetime) -> int:
    return int(moment.astimezone(UTC).timestamp() * 1000)


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _replace_calls(sql: str, name: str, render: Callable[[list[str]], str]) -> str:
    """Replace every `name(args…)` with render(args), matching parentheses."""
    out, pos, token = [], 0, f"{name}("
    while (start := sql.find(token, pos)) >= 0:
        depth, i = 1, start + len(token)
        while i < len(sql) and depth:
            depth += {"(": 1, ")": -1}.get(sql[i], 0)
            i += 1
        if depth:
            raise ValueError(f"unbalanced parentheses after {name} in: {sql[start : start + 80]}")
        out.append(sql[pos:start])
        out.append(render(split_top_level(sql[start + len(token) : i - 1])))
        pos = i
    out.append(sql[pos:])
    return "".join(out)


def expand(sql: str, time_range: TimeRange, variables: Mapping[str, str]) -> str:
    """The SQL the plugin sends for this panel, time range and variable values
    (a value of `ALL` means "All" is selected)."""
    start, end, step = time_range.start, time_range.end, time_range.interval_s

    def conditional_all(args: list[str]) -> str:
        if len(args) != 2:
            raise ValueError(f"$__conditionalAll takes two arguments, got {args}")
        name = args[1].lstrip("$").strip("{}")
        return "1=1" if variables.get(name, ALL) == ALL else args[0]

    sql = _replace_calls(sql, "$__conditionalAll", conditional_all)
    calls: dict[str, Callable[[list[str]], str]] = {
        "$__timeFilter_ms": lambda a: (
            f"{a[0]} >= fromUnixTimestamp64Milli({_epoch_ms(start)}) AND "
            f"{a[0]} <= fromUnixTimestamp64Milli({_epoch_ms(end)})"
        ),
        "$__timeFilter": lambda a: (
            f"{a[0]} >= toDateTime({_epoch(start)}) AND {a[0]} <= toDateTime({_epoch(end)})"
        ),
        "$__dateFilter": lambda a: (
            f"{a[0]} >= toDate('{start.date().isoformat()}') AND "
            f"{a[0]} <= toDate('{end.date().isoformat()}')"
        ),
        "$__timeInterval_ms": lambda a: (
            f"toStartOfInterval(toDateTime64({a[0]}, 3), INTERVAL {step * 1000} millisecond)"
        ),
        "$__timeInterval": lambda a: (
            f"toStartOfInterval(toDateTime({a[0]}), INTERVAL {step} second)"
        ),
    }
    for name, render in calls.items():
        sql = _replace_calls(sql, name, render)
    plain = {
        "$__fromTime_ms": f"fromUnixTimestamp64Milli({_epoch_ms(start)})",
        "$__toTime_ms": f"fromUnixTimestamp64Milli({_epoch_ms(end)})",
        "$__fromTime": f"toDateTime({_epoch(start)})",
        "$__toTime": f"toDateTime({_epoch(end)})",
        "$__interval_s": str(step),
    }
    for name, text in plain.items():
        sql = sql.replace(name, text)

    def variable(match: re.Match[str]) -> str:
        name, form = match.group("name") or match.group("bare"), match.group("form")
        if name not in variables:
            raise KeyError(f"variable ${name} is not defined")
        value = variables[name]
        if form == "singlequote":
            return _quote(value)
        if form not in (None, "raw"):
            raise ValueError(f"unsupported variable format :{form}")
        return value

    return re.sub(r"\$\{(?P<name>\w+)(?::(?P<form>\w+))?\}|\$(?P<bare>[A-Za-z_]\w*)", variable, sql)
