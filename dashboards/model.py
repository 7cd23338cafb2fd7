"""Dashboards, panels and variables, and their Grafana JSON.

One description serves three readers: Grafana (the JSON written by
`dashboards.build`), the tests (every panel's SQL runs against chdb) and
`csi report` (the same SQL and titles rendered to PNG and HTML where no
Grafana runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

DATASOURCE_UID = "csi-clickhouse"
"""The provisioned ClickHouse datasource (deploy/grafana/provisioning/datasources)."""
DATASOURCE = {"type": "grafana-clickhouse-datasource", "uid": DATASOURCE_UID}
GRID_COLUMNS = 24

PanelKind = Literal["stat", "timeseries", "table", "barchart", "heatmap"]


@dataclass(frozen=True)
class Variable:
    """A template variable: options from SQL (or a fixed list), one or all selected."""

    name: str
    label: str
    sql: str | None = None
    """One column of options; may use other variables (e.g. dealers of ${region})."""
    options: tuple[str, ...] = ()
    include_all: bool = True
    default: str | None = None
    """Selected at load; None selects All (or the first option without All)."""

    def to_grafana(self) -> dict[str, Any]:
        current: dict[str, Any]
        if self.default is not None:
            current = {"selected": True, "text": self.default, "value": self.default}
        elif self.include_all:
            current = {"selected": True, "text": "All", "value": "$__all"}
        else:
            first = self.options[0] if self.options else ""
            current = {"selected": True, "text": first, "value": first}
        base: dict[str, Any] = {
            "name": self.name,
            "label": self.label,
            "hide": 0,
            "multi": False,
            "includeAll": self.include_all,
            "current": current,
        }
        if self.sql is not None:
            return {
                **base, "type": "query", "datasource": DATASOURCE, "definition": self.sql,
                "query": self.sql, "refresh": 1, "sort": 1,
            }  # fmt: skip
        return {
            **base, "type": "custom", "query": ",".join(self.options),
            "options": [
                {"selected": o == current["value"], "text": o, "value": o} for o in self.options
            ],
        }  # fmt: skip


@dataclass(frozen=True)
class Panel:
    """One panel: its SQL and the columns that SQL must return."""

    title: str
    kind: PanelKind
    sql: str
    columns: tuple[str, ...]
    """Result columns, in order (tests check them; `csi report` plots by them)."""
    w: int
    h: int
    x: int
    y: int
    description: str = ""
    unit: str | None = None
    """Grafana unit id, e.g. "percent", "s", "short"."""
    decimals: int | None = None
    thresholds: tuple[tuple[float, str], ...] = ()
    """(value, colour) steps above the base colour, e.g. ((800, "green"),)."""

    @property
    def time_series(self) -> bool:
        return self.kind in ("timeseries", "heatmap")

    def to_grafana(self, panel_id: int) -> dict[str, Any]:
        defaults: dict[str, Any] = {}
        if self.unit is not None:
            defaults["unit"] = self.unit
        if self.decimals is not None:
            defaults["decimals"] = self.decimals
        if self.thresholds:
            defaults["thresholds"] = {
                "mode": "absolute",
                "steps": [{"color": "red", "value": None}]
                + [{"color": c, "value": v} for v, c in self.thresholds],
            }
        return {
            "id": panel_id,
            "type": self.kind,
            "title": self.title,
            "description": self.description,
            "datasource": DATASOURCE,
            "gridPos": {"h": self.h, "w": self.w, "x": self.x, "y": self.y},
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {},
            "targets": [
                {
                    "refId": "A",
                    "datasource": DATASOURCE,
                    "editorType": "sql",
                    "queryType": "timeseries" if self.time_series else "table",
                    "format": 0 if self.time_series else 1,
                    "rawSql": self.sql,
                }
            ],
        }


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    folder: str
    """Grafana folder (one per dashboard group; the provider makes them from paths)."""
    panels: tuple[Panel, ...]
    variables: tuple[Variable, ...] = ()
    description: str = ""
    time_from: str = "now-90d"
    refresh: str = "1m"
    tags: tuple[str, ...] = field(default=("csi",))

    def to_grafana(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": list(self.tags),
            "timezone": "utc",
            "editable": True,
            "schemaVersion": 39,
            "version": 1,
            "refresh": self.refresh,
            "time": {"from": self.time_from, "to": "now"},
            "templating": {"list": [v.to_grafana() for v in self.variables]},
            "panels": [p.to_grafana(i) for i, p in enumerate(self.panels, start=1)],
            "annotations": {"list": []},
            "links": [],
        }
