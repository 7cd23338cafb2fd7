"""`csi report`: every dashboard's panels rendered to PNG and one HTML page
each, from chdb loaded with simulated data through the worker's own code."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from pathlib import Path

import orjson
import pytest

from dashboards.definitions import DASHBOARDS
from dashboards.report import default_time_range, render_report
from pipeline.batch import load_warehouse
from pipeline.catalogue import load_catalogue
from pipeline.cli import main
from pipeline.registry import DealerRegistry, write_registry
from pipeline.simulator import Drop, simulate, simulated_registry
from pipeline.warehouse import Warehouse, create_schema, open_warehouse

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
END = date(2026, 6, 30)


@pytest.fixture(scope="module")
def warehouse_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    registry = simulated_registry(4, seed=21)
    write_registry(registry, root / "dealers.csv")
    events = simulate(4, 75, end=END, seed=21, drops=[Drop("D003", date(2026, 6, 1), 120.0)])
    warehouse = open_warehouse(f"chdb://{root / 'warehouse'}")
    try:
        create_schema(warehouse)
        load_warehouse(
            (orjson.dumps(e) for e in events), warehouse, load_catalogue(),
            registry=DealerRegistry(registry),
        )  # fmt: skip
    finally:
        warehouse.close()
    return root


@pytest.fixture
def warehouse(warehouse_dir: Path) -> Iterator[Warehouse]:
    opened = open_warehouse(f"chdb://{warehouse_dir / 'warehouse'}")
    try:
        yield opened
    finally:
        opened.close()


def test_time_range_ends_with_the_newest_snapshot(warehouse: Warehouse) -> None:
    time_range = default_time_range(warehouse, days=30)
    assert time_range.end.date() == date(2026, 7, 1)  # the day after 2026-06-30, 00:00 UTC
    assert (time_range.end - time_range.start).days == 30


def test_every_dashboard_renders_every_panel(warehouse: Warehouse, tmp_path: Path) -> None:
    written = render_report(warehouse, DASHBOARDS, tmp_path)
    for dashboard in DASHBOARDS:
        page = tmp_path / f"{dashboard.uid}.html"
        assert page in written
        text = page.read_text("utf-8")
        assert dashboard.title in text and "query failed" not in text
        pngs = sorted((tmp_path / dashboard.uid).glob("*.png"))
        assert len(pngs) == len(dashboard.panels)
        for png in pngs:
            data = png.read_bytes()
            assert data.startswith(PNG_MAGIC) and len(data) > 500
        for panel in dashboard.panels:  # same titles as in Grafana, charts inlined
            assert panel.title.replace("&", "&amp;").replace("'", "&#x27;") in text
        assert text.count("data:image/png;base64,") == len(dashboard.panels)
    assert (tmp_path / "index.html").exists()


def test_cli_renders_one_dashboard_for_a_chosen_dealer(
    warehouse_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    drilldown = next(d for d in DASHBOARDS if d.uid == "csi-dealer-drilldown")
    status = main(
        [
            "report", "--out", str(tmp_path), "--warehouse",
            f"chdb://{warehouse_dir / 'warehouse'}", "--dashboard", drilldown.uid,
            "--var", "dealer=D003", "--to", "2026-06-30", "--days", "60",
        ]
    )  # fmt: skip
    assert status == 0
    assert "1 page(s)" in capsys.readouterr().out
    page = (tmp_path / f"{drilldown.uid}.html").read_text("utf-8")
    assert "dealer = D003" in page and "2026-05-02 – 2026-07-01" in page
    assert len(list((tmp_path / drilldown.uid).glob("*.png"))) == len(drilldown.panels)


def test_cli_refuses_a_malformed_variable(warehouse_dir: Path, tmp_path: Path) -> None:
    url = f"chdb://{warehouse_dir / 'warehouse'}"
    assert main(["report", "--out", str(tmp_path), "--warehouse", url, "--var", "dealer"]) == 2
