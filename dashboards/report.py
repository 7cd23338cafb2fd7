"""`csi report`: the dashboards' own panels, rendered where no Grafana runs.

Each panel's SQL goes through `dashboards.macros.expand` exactly as the
Grafana plugin would send it, runs against the warehouse, and is drawn with
matplotlib by its kind (stat, time series, bar chart, heat map, table). Every
dashboard becomes one self-contained HTML page (charts inlined as PNG, tables
also as HTML), plus the PNG files themselves, and an index page.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no screen: render to files only

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from dashboards.macros import ALL, TimeRange, expand
from dashboards.model import Dashboard, Panel, Variable
from pipeline.warehouse import Warehouse

# Comments come in Chinese as often as in English: glyphs DejaVu Sans lacks
# fall back to WenQuanYi Micro Hei (Debian's fonts-wqy-microhei) when present.
matplotlib.rcParams["font.family"] = ["DejaVu Sans", "WenQuanYi Micro Hei", "sans-serif"]

TABLE_ROWS_SHOWN = 25
"""Rows drawn in a table's PNG; the HTML page shows up to HTML_ROWS_SHOWN."""
HTML_ROWS_SHOWN = 200
PX = 1 / 80  # inches per grid pixel at 80 dpi


@dataclass(frozen=True)
class PanelResult:
    panel: Panel
    sql: str
    columns: list[str]
    rows: list[tuple[Any, ...]]
    png: bytes
    error: str | None = None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "panel"


def default_time_range(warehouse: Warehouse, days: int = 90) -> TimeRange:
    """The `days` days up to the newest snapshot (simulated history need not end today)."""
    _, rows = warehouse.query("SELECT max(window_end) FROM csi.metric_snapshots")
    newest = rows[0][0] if rows and isinstance(rows[0][0], date) else None
    end_day = newest if newest is not None and newest.year > 1970 else datetime.now(UTC).date()
    end = datetime.combine(end_day + timedelta(days=1), datetime.min.time(), UTC)
    return TimeRange(end - timedelta(days=days), end, interval_s=86_400)


def resolve_variables(
    warehouse: Warehouse,
    dashboard: Dashboard,
    time_range: TimeRange,
    chosen: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Each variable's value: what was chosen, else its default, else All,
    else the first option its own query returns (as Grafana does at load)."""
    values: dict[str, str] = {}
    for variable in dashboard.variables:
        values[variable.name] = _variable_value(warehouse, variable, time_range, values, chosen)
    return values


def _variable_value(
    warehouse: Warehouse,
    variable: Variable,
    time_range: TimeRange,
    known: Mapping[str, str],
    chosen: Mapping[str, str] | None,
) -> str:
    if chosen and variable.name in chosen:
        return chosen[variable.name]
    if variable.default is not None:
        return variable.default
    if variable.include_all:
        return ALL
    if variable.sql is not None:
        _, rows = warehouse.query(expand(variable.sql, time_range, known))
        if rows:
            return str(rows[0][0])
    return variable.options[0] if variable.options else ""


def run_panel(
    warehouse: Warehouse, panel: Panel, time_range: TimeRange, variables: Mapping[str, str]
) -> PanelResult:
    sql = expand(panel.sql, time_range, variables)
    try:
        columns, rows = warehouse.query(sql)
    except Exception as exc:  # one broken panel must not hide the others
        return PanelResult(
            panel, sql, [], [], _message_png(panel, f"query failed: {exc}"), str(exc)
        )
    return PanelResult(panel, sql, list(columns), list(rows), render_png(panel, columns, rows))


# --- drawing ---------------------------------------------------------------------


def _figure(panel: Panel) -> Figure:
    width = max(panel.w * 40 * PX, 3.0)
    height = max(panel.h * 30 * PX, 2.0)
    fig = plt.figure(figsize=(width, height), dpi=80)
    fig.suptitle(panel.title, fontsize=10, x=0.01, ha="left")
    return fig


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _message_png(panel: Panel, message: str) -> bytes:
    fig = _figure(panel)
    fig.text(0.5, 0.5, message[:200], ha="center", va="center", wrap=True, color="grey")
    return _png(fig)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(float(value)) else None
    return None


def _format(value: Any, panel: Panel) -> str:
    number = _number(value)
    if number is None:
        return "–" if value is None else str(value)
    decimals = panel.decimals if panel.decimals is not None else (0 if abs(number) >= 100 else 1)
    text = f"{number:,.{decimals}f}"
    return text + ("%" if panel.unit == "percent" else "")


def render_png(panel: Panel, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> bytes:
    """One panel's result as a PNG, drawn the way its kind says."""
    if not rows:
        return _message_png(panel, "no data in this range")
    if panel.kind == "stat":
        return _stat(panel, columns, rows)
    if panel.kind == "timeseries":
        return _timeseries(panel, columns, rows)
    if panel.kind == "barchart":
        return _bars(panel, columns, rows)
    if panel.kind == "heatmap":
        return _heatmap(panel, columns, rows)
    return _table(panel, columns, rows)


def _stat(panel: Panel, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> bytes:
    fig = _figure(panel)
    row = rows[0]
    fig.text(0.5, 0.55, _format(row[0], panel), ha="center", va="center", fontsize=28)
    extras = [
        f"{name} {_format(value, replace_unit(panel))}"
        for name, value in zip(columns[1:], row[1:], strict=False)
    ]
    if extras:
        fig.text(0.5, 0.18, " · ".join(extras), ha="center", va="center", fontsize=9)
    return _png(fig)


def replace_unit(panel: Panel) -> Panel:
    """Extra stat columns (n, change) are plain numbers, whatever the value's unit."""
    return Panel(panel.title, panel.kind, panel.sql, panel.columns, panel.w, panel.h, 0, 0)


def _series(
    columns: Sequence[str], rows: Sequence[tuple[Any, ...]]
) -> dict[str, list[tuple[Any, float]]]:
    """Long (time, series, value) or wide (time, a, b, …) rows as named series."""
    series: dict[str, list[tuple[Any, float]]] = {}
    long = len(columns) >= 3 and all(isinstance(r[1], str) for r in rows)
    for row in rows:
        if long:
            value = _number(row[2])
            if value is not None:
                series.setdefault(str(row[1]), []).append((row[0], value))
        else:
            for name, cell in zip(columns[1:], row[1:], strict=False):
                value = _number(cell)
                if value is not None:
                    series.setdefault(name, []).append((row[0], value))
    return series


def _timeseries(panel: Panel, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> bytes:
    fig = _figure(panel)
    axes = fig.add_subplot(1, 1, 1)
    for name, points in sorted(_series(columns, rows).items()):
        points.sort(key=lambda p: p[0])
        axes.plot([p[0] for p in points], [p[1] for p in points], label=name, linewidth=1.4)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="best")
    fig.autofmt_xdate()
    return _png(fig)


def _bars(panel: Panel, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> bytes:
    fig = _figure(panel)
    axes = fig.add_subplot(1, 1, 1)
    labels = [str(r[0]) for r in rows]
    numeric = [i for i in range(1, len(columns)) if any(_number(r[i]) is not None for r in rows)]
    height = 0.8 / max(len(numeric), 1)
    for j, i in enumerate(numeric):
        values = [_number(r[i]) or 0.0 for r in rows]
        positions = [k + j * height for k in range(len(rows))]
        axes.barh(positions, values, height=height, label=columns[i])
    axes.set_yticks([k + height * (len(numeric) - 1) / 2 for k in range(len(rows))], labels)
    axes.invert_yaxis()
    axes.grid(axis="x", alpha=0.3)
    if len(numeric) > 1:
        axes.legend(fontsize=7)
    return _png(fig)


def _heatmap(panel: Panel, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> bytes:
    times = sorted({r[0] for r in rows})
    labels = sorted({str(r[1]) for r in rows})
    grid = [[math.nan] * len(times) for _ in labels]
    for row in rows:
        value = _number(row[2])
        if value is not None:
            grid[labels.index(str(row[1]))][times.index(row[0])] = value
    fig = _figure(panel)
    axes = fig.add_subplot(1, 1, 1)
    image = axes.imshow(grid, aspect="auto", cmap="RdYlGn", interpolation="nearest")
    axes.set_yticks(range(len(labels)), labels, fontsize=6)
    step = max(len(times) // 8, 1)
    axes.set_xticks(range(0, len(times), step), [str(t)[:10] for t in times[::step]], fontsize=6)
    fig.colorbar(image, ax=axes)
    return _png(fig)


def _table(panel: Panel, columns: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> bytes:
    shown = rows[:TABLE_ROWS_SHOWN]
    fig = _figure(panel)
    fig.set_figheight(max(fig.get_figheight(), 0.25 * (len(shown) + 2)))
    axes = fig.add_subplot(1, 1, 1)
    axes.axis("off")
    cells = [[_cell(v) for v in row] for row in shown]
    table = axes.table(cellText=cells, colLabels=list(columns), loc="upper center")
    table.auto_set_font_size(False)
    table.set_fontsize(6)
    if len(rows) > len(shown):
        fig.text(0.01, 0.01, f"first {len(shown)} of {len(rows)} rows", fontsize=7)
    return _png(fig)


def _cell(value: Any, limit: int = 60) -> str:
    if isinstance(value, float):
        return f"{value:.1f}" if math.isfinite(value) else "–"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    text = "–" if value is None else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- pages ------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
.grid{display:grid;grid-template-columns:repeat(24,1fr);gap:10px}
.panel{border:1px solid #ddd;border-radius:6px;padding:8px;overflow:auto}
.panel h2{font-size:14px;margin:0 0 4px} .panel p{font-size:12px;color:#555;margin:0 0 6px}
.panel img{max-width:100%} table{border-collapse:collapse;font-size:11px}
td,th{border-bottom:1px solid #eee;padding:2px 6px;text-align:left}
details{font-size:11px;color:#666} code{white-space:pre-wrap}
"""


def dashboard_html(
    dashboard: Dashboard,
    results: Sequence[PanelResult],
    time_range: TimeRange,
    variables: Mapping[str, str],
) -> str:
    chosen = ", ".join(f"{k} = {'All' if v == ALL else v}" for k, v in variables.items())
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(dashboard.title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(dashboard.title)}</h1>",
        f"<p>{html.escape(dashboard.description)}</p>",
        f"<p>{time_range.start:%Y-%m-%d} – {time_range.end:%Y-%m-%d} (UTC)"
        f"{' · ' + html.escape(chosen) if chosen else ''}</p><div class='grid'>",
    ]
    for result in results:
        panel = result.panel
        image = base64.b64encode(result.png).decode("ascii")
        parts.append(
            f"<div class='panel' style='grid-column:{panel.x + 1} / span {panel.w}'>"
            f"<h2>{html.escape(panel.title)}</h2><p>{html.escape(panel.description)}</p>"
            f"<img alt='{html.escape(panel.title)}' src='data:image/png;base64,{image}'>"
        )
        if panel.kind == "table" and result.rows:
            parts.append(_html_table(result.columns, result.rows))
        if result.error:
            parts.append(f"<p>error: {html.escape(result.error)}</p>")
        parts.append(
            f"<details><summary>SQL</summary><code>{html.escape(result.sql)}</code></details></div>"
        )
    parts.append("</div></body></html>")
    return "".join(parts)


def _html_table(columns: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(v, 300))}</td>" for v in row) + "</tr>"
        for row in rows[:HTML_ROWS_SHOWN]
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_report(
    warehouse: Warehouse,
    dashboards: Sequence[Dashboard],
    out_dir: Path,
    *,
    time_range: TimeRange | None = None,
    chosen: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write `<uid>.html` and `<uid>/<nn>-<title>.png` per dashboard, and index.html."""
    out_dir.mkdir(parents=True, exist_ok=True)
    time_range = time_range or default_time_range(warehouse)
    written: list[Path] = []
    links: list[str] = []
    for dashboard in dashboards:
        variables = resolve_variables(warehouse, dashboard, time_range, chosen)
        results = [run_panel(warehouse, p, time_range, variables) for p in dashboard.panels]
        folder = out_dir / dashboard.uid
        folder.mkdir(exist_ok=True)
        for number, result in enumerate(results, start=1):
            path = folder / f"{number:02d}-{slug(result.panel.title)}.png"
            path.write_bytes(result.png)
            written.append(path)
        page = out_dir / f"{dashboard.uid}.html"
        page.write_text(dashboard_html(dashboard, results, time_range, variables), "utf-8")
        written.append(page)
        failed = sum(1 for r in results if r.error)
        links.append(
            f"<li><a href='{dashboard.uid}.html'>{html.escape(dashboard.title)}</a>"
            f" ({len(results)} panels{f', {failed} failed' if failed else ''})</li>"
        )
    index = out_dir / "index.html"
    index.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>CSI report</title>"
        f"<style>{_STYLE}</style></head><body><h1>CSI report</h1>"
        f"<p>{time_range.start:%Y-%m-%d} – {time_range.end:%Y-%m-%d} (UTC)</p>"
        f"<ul>{''.join(links)}</ul></body></html>",
        "utf-8",
    )
    written.append(index)
    return written
