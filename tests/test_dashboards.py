"""The dashboards (dashboards/definitions.py) against real data, and their JSON.

Simulated dealers in two regions, one with a real CSI drop (so drop alerts
exist) and a few malformed lines (so dead letters exist), go through the
worker's own code (`load_warehouse`) into chdb. Every panel's SQL is expanded
the way the Grafana plugin expands it (`dashboards.macros.expand`) and must
run and return exactly its declared columns — with every variable at All (or
its default) and with a region, brand and dealer picked from the variables'
own option queries. The committed JSON must be what `dashboards.build` makes,
and laid out and wired the way Grafana needs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from dashboards.build import JSON_DIR, build_all, check, main
from dashboards.definitions import DASHBOARDS
from dashboards.macros import ALL, TimeRange, expand
from dashboards.model import DATASOURCE_UID, GRID_COLUMNS, Dashboard, Panel, Variable
from pipeline.batch import load_warehouse
from pipeline.catalogue import load_catalogue
from pipeline.registry import DealerRegistry
from pipeline.simulator import Drop, simulate, simulated_registry
from pipeline.warehouse import Warehouse, create_schema, open_warehouse

END = date(2026, 6, 30)
DAYS = 120
DEALERS = 6
DROPPED = "D002"
MALFORMED = [
    b"{not json",
    b'{"event_type": "survey", "dealer_id": "D001"}',
    b'{"event_type": "teleport", "dealer_id": "D003"}',
]
MAIN_PANELS = {
    ("csi-network-overview", "CSI trend by region"),
    ("csi-network-overview", "Dealer league table"),
    ("csi-alerts", "Open alerts"),
    ("csi-complaints-cases", "Case funnel"),
    ("csi-pipeline-health", "Events per second by type"),
}
"""Panels that must show rows in both scenarios (besides every stat)."""
BY_UID = {d.uid: d for d in DASHBOARDS}


@dataclass(frozen=True)
class Loaded:
    warehouse: Warehouse
    regions: int
    events: int
    dead_letters: int


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    # simulated_registry(6) puts all six in one region; the first six of twelve
    # span two regions and two brands (same codes D001..D006 as the simulation).
    registry = DealerRegistry(simulated_registry(2 * DEALERS)[:DEALERS])
    events = simulate(
        DEALERS, DAYS, end=END, seed=3, drops=[Drop(DROPPED, END - timedelta(days=45), 120.0)]
    )
    lines = [orjson.dumps(event) for event in events] + MALFORMED
    warehouse = open_warehouse(f"chdb://{tmp_path_factory.mktemp('dashboards') / 'warehouse'}")
    try:
        create_schema(warehouse)
        state = load_warehouse(lines, warehouse, load_catalogue(), registry=registry)
        yield Loaded(warehouse, len(registry.regions()), state.events, len(state.dead_letters))
    finally:
        warehouse.close()


def time_range(dashboard: Dashboard) -> TimeRange:
    """120 days ending with the simulated data; the pipeline's own measurements
    carry wall-clock times (when the fixture ran), so its range ends now."""
    if dashboard.folder == "Pipeline":
        end = datetime.now(UTC) + timedelta(minutes=1)
    else:
        end = datetime.combine(END + timedelta(days=1), datetime.min.time(), UTC)
    return TimeRange(end - timedelta(days=DAYS), end)


def options(
    warehouse: Warehouse, variable: Variable, span: TimeRange, values: Mapping[str, str]
) -> list[str]:
    """A variable's options as Grafana lists them: its query's first column."""
    if variable.sql is None:
        return list(variable.options)
    _, rows = warehouse.query(expand(variable.sql, span, values))
    return [str(row[0]) for row in rows]


def defaults(
    warehouse: Warehouse, dashboard: Dashboard, span: TimeRange, *, prefer_all: bool = False
) -> dict[str, str]:
    """What Grafana selects at load: the default, else All, else the first
    option; with `prefer_all`, All wherever a variable has it."""
    values: dict[str, str] = {}
    for variable in dashboard.variables:
        if variable.include_all and (prefer_all or variable.default is None):
            values[variable.name] = ALL
        elif variable.default is not None:
            values[variable.name] = variable.default
        else:
            values[variable.name] = options(warehouse, variable, span, values)[0]
    return values


def everything(warehouse: Warehouse, dashboard: Dashboard, span: TimeRange) -> dict[str, str]:
    """Every variable at All, or at its default where it has no All."""
    return defaults(warehouse, dashboard, span, prefer_all=True)


def chosen(warehouse: Warehouse, dashboard: Dashboard, span: TimeRange) -> dict[str, str]:
    """A specific region, brand and dealer, taken from the variables' own
    queries: the first region and brand that have a dealer, and its dealer."""
    values = defaults(warehouse, dashboard, span)
    names = {v.name: v for v in dashboard.variables}
    if "region" not in names:
        return values
    for region in options(warehouse, names["region"], span, values):
        for brand in options(warehouse, names["brand"], span, {**values, "region": region}):
            picked = {**values, "region": region, "brand": brand}
            if "dealer" not in names:
                return picked
            dealers = options(warehouse, names["dealer"], span, picked)
            if dealers:
                return {**picked, "dealer": dealers[-1]}
    raise AssertionError(f"{dashboard.uid}: no region and brand with a dealer")


def run(
    warehouse: Warehouse, panel: Panel, span: TimeRange, values: Mapping[str, str]
) -> tuple[list[str], list[tuple[Any, ...]]]:
    return warehouse.query(expand(panel.sql, span, values))


# --- every panel against the data ---------------------------------------------------


def test_fixture_has_two_regions_alerts_and_dead_letters(loaded: Loaded) -> None:
    assert loaded.regions >= 2
    assert loaded.events > 10_000
    assert loaded.dead_letters == len(MALFORMED)
    _, rows = loaded.warehouse.query(
        "SELECT kind, count() FROM csi.alerts FINAL GROUP BY kind ORDER BY kind"
    )
    kinds = dict(rows)
    assert kinds.get("drop", 0) >= 1 and kinds.get("hot", 0) >= 1


@pytest.mark.parametrize("scenario", ["all", "chosen"])
@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda d: d.uid)
def test_every_panel_runs_and_returns_its_columns(
    loaded: Loaded, dashboard: Dashboard, scenario: str
) -> None:
    span = time_range(dashboard)
    pick = everything if scenario == "all" else chosen
    values = pick(loaded.warehouse, dashboard, span)
    if scenario == "chosen" and "region" in values:
        assert ALL not in (values["region"], values["brand"], values.get("dealer"))
    problems = []
    for panel in dashboard.panels:
        columns, rows = run(loaded.warehouse, panel, span, values)
        if tuple(columns) != panel.columns:
            problems.append(f"{panel.title}: columns {columns}, declared {list(panel.columns)}")
        if panel.kind == "stat" and len(rows) != 1:
            problems.append(f"{panel.title}: a stat returned {len(rows)} rows")
        if panel.kind == "stat" and rows and rows[0][0] is None:
            problems.append(f"{panel.title}: the stat's value is NULL")
        if (dashboard.uid, panel.title) in MAIN_PANELS and not rows:
            problems.append(f"{panel.title}: no rows")
    assert problems == [], f"{dashboard.uid} with {values}"


def test_variables_list_the_loaded_units(loaded: Loaded) -> None:
    overview = BY_UID["csi-network-overview"]
    span = time_range(overview)
    names = {v.name: v for v in BY_UID["csi-complaints-cases"].variables}
    all_values = defaults(loaded.warehouse, BY_UID["csi-complaints-cases"], span)
    regions = options(loaded.warehouse, names["region"], span, all_values)
    assert len(regions) == loaded.regions and regions == sorted(regions)
    dealers = options(loaded.warehouse, names["dealer"], span, all_values)
    assert dealers == [f"D{i:03d}" for i in range(1, DEALERS + 1)]
    in_first = options(
        loaded.warehouse, names["dealer"], span, {**all_values, "region": regions[0]}
    )
    assert in_first and set(in_first) < set(dealers)
    drilldown = defaults(loaded.warehouse, BY_UID["csi-dealer-drilldown"], span)
    assert drilldown["dealer"] == "D001"  # no All: the first dealer


def _snapshot(
    warehouse: Warehouse, scope: str, key: str, metric: str = "csi", window: str = "30d"
) -> list[tuple[Any, ...]]:
    _, rows = warehouse.query(
        f"SELECT window_end, {metric}, n_responses FROM csi.metric_snapshots FINAL "
        f"WHERE scope = '{scope}' AND key = '{key}' AND department = 'service' "
        f"AND `window` = '{window}' AND window_end <= '{END}' ORDER BY window_end DESC"
    )
    return rows


@pytest.mark.parametrize(
    ("uid", "choice", "scope"),
    [
        ("csi-network-overview", {}, "network"),
        ("csi-network-overview", {"region": "first"}, "region"),
        ("csi-network-overview", {"brand": "first"}, "brand"),
        ("csi-network-overview", {"region": "first", "brand": "first"}, "region"),
        ("csi-dealer-drilldown", {"dealer": DROPPED}, "dealer"),
    ],
)
def test_stats_show_the_most_specific_unit_chosen(
    loaded: Loaded, uid: str, choice: dict[str, str], scope: str
) -> None:
    dashboard = BY_UID[uid]
    span = time_range(dashboard)
    values = defaults(loaded.warehouse, dashboard, span)
    names = {v.name: v for v in dashboard.variables}
    for name, value in choice.items():
        first = options(loaded.warehouse, names[name], span, values)[0]
        values[name] = first if value == "first" else value
    key = "network" if scope == "network" else values[scope]
    (current, value, n), *older = _snapshot(loaded.warehouse, scope, key)
    previous = next(row[1] for row in older if row[0] == current - timedelta(days=30))
    stat = next(p for p in dashboard.panels if p.kind == "stat" and p.title == "CSI")
    columns, rows = run(loaded.warehouse, stat, span, values)
    assert columns == ["csi", "n", "change"]
    assert rows == [(pytest.approx(value), n, pytest.approx(value - previous))]


def test_league_table_ranks_the_dropped_dealer_last(loaded: Loaded) -> None:
    dashboard = BY_UID["csi-network-overview"]
    span = time_range(dashboard)
    panel = next(p for p in dashboard.panels if p.title == "Dealer league table")
    columns, rows = run(loaded.warehouse, panel, span, defaults(loaded.warehouse, dashboard, span))
    table = [dict(zip(columns, row, strict=True)) for row in rows]
    assert [row["rank"] for row in table] == list(range(1, DEALERS + 1))
    assert table[-1]["dealer"] == DROPPED and table[-1]["open_alerts"] >= 1
    latest = _snapshot(loaded.warehouse, "dealer", DROPPED)[0]
    assert table[-1]["csi"] == pytest.approx(latest[1]) and table[-1]["n"] == latest[2]


# --- the committed JSON ------------------------------------------------------------------


def test_committed_json_is_what_build_generates() -> None:
    assert check(JSON_DIR) == [], "run `python -m dashboards.build` and commit dashboards/json"


def test_build_writes_checks_and_prunes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    written = build_all(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == sorted(
        f"{d.folder}/{d.uid}.json" for d in DASHBOARDS
    )
    assert check(tmp_path) == [] and main(["--check", "--out", str(tmp_path)]) == 0
    first = written[0]
    first.write_text(first.read_text("utf-8").replace('"editable": true', '"editable": false'))
    stale = tmp_path / "Old" / "csi-gone.json"
    stale.parent.mkdir()
    stale.write_text("{}\n")
    expected = sorted([first.relative_to(tmp_path).as_posix(), "Old/csi-gone.json"])
    assert check(tmp_path) == expected
    assert main(["--check", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert all(f"differs: {name}" in err for name in expected)
    build_all(tmp_path)
    assert check(tmp_path) == [] and not stale.parent.exists()
    text = first.read_text("utf-8")
    assert text.endswith("}\n") and json.loads(text)["uid"] == first.stem


def committed() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, json.loads(path.read_text("utf-8"))) for path in sorted(JSON_DIR.rglob("*.json"))
    ]


VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def variables_used(sql: str) -> set[str]:
    """Names of the variables an SQL text uses ($__ macros are not variables)."""
    names = {braced or bare for braced, bare in VARIABLE.findall(sql)}
    return {name for name in names if not name.startswith("__")}


def test_one_file_per_dashboard_with_unique_uids_and_titles() -> None:
    files = committed()
    uids = [document["uid"] for _, document in files]
    assert sorted(uids) == sorted(d.uid for d in DASHBOARDS) and len(set(uids)) == len(uids)
    for path, document in files:
        definition = BY_UID[document["uid"]]
        assert path == JSON_DIR / definition.folder / f"{definition.uid}.json"
        assert document["title"].strip() and document["panels"]
        assert all(panel["title"].strip() for panel in document["panels"])


@pytest.mark.parametrize("path", sorted(JSON_DIR.rglob("*.json")), ids=lambda p: p.stem)
def test_panels_fit_the_grid_without_overlapping(path: Path) -> None:
    panels = json.loads(path.read_text("utf-8"))["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(set(ids)) == len(ids)
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        x, y, w, h = grid["x"], grid["y"], grid["w"], grid["h"]
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= GRID_COLUMNS, panel["title"]
        for cell in ((col, row) for col in range(x, x + w) for row in range(y, y + h)):
            assert cell not in cells, f"{panel['title']} overlaps {cells[cell]}"
            cells[cell] = panel["title"]


@pytest.mark.parametrize("path", sorted(JSON_DIR.rglob("*.json")), ids=lambda p: p.stem)
def test_every_query_uses_the_datasource_and_defined_variables(path: Path) -> None:
    document = json.loads(path.read_text("utf-8"))
    templating = document["templating"]["list"]
    defined: list[str] = []
    for variable in templating:  # a variable's query may use the variables before it
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == DATASOURCE_UID
            assert variables_used(variable["query"]) <= set(defined), variable["name"]
        defined.append(variable["name"])
    assert len(set(defined)) == len(defined)
    for panel in document["panels"]:
        assert panel["datasource"]["uid"] == DATASOURCE_UID
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE_UID
            used = variables_used(target["rawSql"])
            assert used <= set(defined), f"{panel['title']}: {used - set(defined)} undefined"


def test_variables_with_all_are_only_used_inside_conditional_all() -> None:
    # Grafana puts every value in place of an "All" variable ('a','b',…); only
    # $__conditionalAll (which turns into 1=1) may hold such a variable.
    span = TimeRange(datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC))
    for dashboard in DASHBOARDS:
        values = {v.name: ALL if v.include_all else "x" for v in dashboard.variables}
        for sql in [p.sql for p in dashboard.panels] + [v.sql or "" for v in dashboard.variables]:
            assert ALL not in expand(sql, span, values), f"{dashboard.uid}: {sql[:200]}"


def test_panel_columns_follow_the_shape_of_their_kind() -> None:
    for dashboard in DASHBOARDS:
        for panel in dashboard.panels:
            columns, where = panel.columns, f"{dashboard.uid}: {panel.title}"
            assert len(set(columns)) == len(columns) and columns, where
            if panel.kind == "stat":
                assert 1 <= len(columns) <= 3 and columns[1:] == ("n", "change")[: len(columns) - 1]
            elif panel.kind in ("timeseries", "heatmap"):
                assert columns[0] == "time" and len(columns) >= 2, where
                if panel.kind == "heatmap" or columns[-1] == "value":
                    assert len(columns) == 3 and columns[2] == "value", where
            elif panel.kind == "barchart":
                assert len(columns) >= 2, where
