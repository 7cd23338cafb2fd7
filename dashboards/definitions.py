"""The dashboards a dealer-network CX team works with, as code.

Six dashboards in three Grafana folders:

* Satisfaction: the network overview and the dealer drill-down;
* Operations: complaints and cases, mystery shop, alerts;
* Pipeline: the pipeline's own health.

Every panel is SQL over the `csi` tables (pipeline/warehouse.py), written for
the `grafana-clickhouse-datasource` plugin: `$__timeFilter` / `$__dateFilter`
on each table's time column so the time picker works, `$__conditionalAll` for
the "All" choice of region, brand, dealer and kind. Figures come from the
pre-aggregated `metric_snapshots` (latest version via FINAL, filtered on the
sorting key scope, key, department, window first, in PREWHERE); only what the
snapshots do not hold — single answers, comments, audit items — is read from
raw events. "Reading the tables fast" below says what goes in PREWHERE and
why; benchmarks/dashboards_speed.py times every query on 3 years of data.

Result shapes follow one convention, so `csi report` can draw every panel:
stat → one row, the value first, then n, then the change vs the previous
period; timeseries → `time` first, then numbers (wide) or a series name and
`value` (long); barchart → a category, then numbers; heatmap → time, a name,
value; table → anything. `Panel.columns` lists each result's columns exactly
(tests/test_dashboards.py runs every query against chdb and checks them).

Variables with "All" are only ever used inside `$__conditionalAll(…)`: for
"All" Grafana would put the list of every value in their place.
"""

from __future__ import annotations

import re
import textwrap

from dashboards.model import Dashboard, Panel, Variable
from pipeline.catalogue import DEFAULT_QUESTIONNAIRE, RATER_DIMENSIONS, load_catalogue

# The default questionnaire's factors (the league table has one column each).
# The default file, not $CSI_QUESTIONNAIRE: the generated JSON must not depend
# on the environment of whoever runs `python -m dashboards.build`.
FACTORS: tuple[str, ...] = load_catalogue(DEFAULT_QUESTIONNAIRE).factors


def _sql(template: str, **parts: str) -> str:
    """Dedent a query and put each part in place of its `{name}`. A part's
    line breaks take the indentation of the line it goes into (of its WHERE
    for an AND line), so a part that starts with a line break ("\\n  AND …")
    continues a WHERE clause."""
    text = textwrap.dedent(template).strip("\n")
    missing = [name for name in parts if "{" + name + "}" not in text]
    if missing:
        raise ValueError(f"no {missing} in the query")

    def fill(line: str) -> str:
        indent = line[: len(line) - len(line.lstrip())]
        if line.lstrip().startswith(("AND ", "OR ")):  # "  AND" parts line up under it
            indent = indent[:-2]
        return re.sub(
            r"(?<!\$)\{(\w+)\}",
            lambda m: parts[m[1]].replace("\n", "\n" + indent) if m[1] in parts else m[0],
            line,
        )

    text = "\n".join(fill(line) for line in text.split("\n"))
    leftover = re.search(r"(?<!\$)\{\w+\}", text)
    if leftover:
        raise ValueError(f"unfilled {leftover.group()} in the query")
    return text


# --- variables -------------------------------------------------------------------

REGION = Variable(
    "region",
    "Region",
    sql="SELECT DISTINCT region FROM csi.metric_snapshots WHERE scope = 'dealer' ORDER BY region",
)
BRAND = Variable(
    "brand",
    "Brand",
    sql="SELECT DISTINCT brand FROM csi.metric_snapshots WHERE scope = 'dealer' ORDER BY brand",
)
_DEALERS_SQL = _sql(
    """
    SELECT DISTINCT key
    FROM csi.metric_snapshots
    WHERE scope = 'dealer'
      AND $__conditionalAll(region = ${region:singlequote}, $region)
      AND $__conditionalAll(brand = ${brand:singlequote}, $brand)
    ORDER BY key
    """
)
DEALER = Variable("dealer", "Dealer", sql=_DEALERS_SQL)
"""A dealer of the chosen region and brand, or All."""
ONE_DEALER = Variable("dealer", "Dealer", sql=_DEALERS_SQL, include_all=False)
"""One dealer (the drill-down): no All; Grafana selects the first at load."""
DEPARTMENT = Variable(
    "department", "Department", options=("service", "sales"), include_all=False, default="service"
)
WINDOW = Variable(
    "window", "Window", options=("7d", "30d", "90d", "month"), include_all=False, default="30d"
)
ALERT_DEPARTMENT = Variable(
    "department", "Department", options=("service", "sales"), default="service"
)
"""The alerts dashboard's department: also All (alerts of both at once)."""
ALERT_KIND = Variable("kind", "Kind", options=("drop", "hot", "complaint_sla", "mystery_shop"))

# --- shared SQL pieces -------------------------------------------------------------


def previous_end(end: str) -> str:
    """The end of the previous period of the same window as a period ending on
    `end`: 30 days earlier for 30d, the last day of the previous month for month."""
    return f"""if(`window` = 'month',
    toStartOfMonth({end}) - 1,
    {end} - transform(`window`, ['day', '7d', '30d', '90d'], [1, 7, 30, 90], 0))"""


PREVIOUS_END = previous_end("window_end")
"""The end of the previous period of the snapshot's window."""

SNAPSHOT_WINDOW = """
  AND department = ${department:singlequote}
  AND `window` = ${window:singlequote}"""


def unit_filter(*levels: str) -> str:
    """Sorting-key conditions (PREWHERE) on metric_snapshots for the unit the
    variables name: the most specific of `levels` (dealer, region, brand, in that
    order) that is not "All", else the network. `$__conditionalAll(0, $v)` is 1=1
    (true) when $v is All and 0 otherwise. `unit_members` adds the region and
    brand conditions, which are not sorting-key columns (WHERE, after FINAL)."""
    lines = ["scope = multiIf("]
    lines += [f"    NOT ($__conditionalAll(0, ${level})), '{level}'," for level in levels]
    lines.append("    'network')")
    if "dealer" in levels:
        lines.append("  AND $__conditionalAll(key = ${dealer:singlequote}, $dealer)")
    return "\n".join(lines)


def unit_members(*levels: str) -> str:
    """The region and brand conditions of `unit_filter`'s unit, as AND lines.
    Roll-ups exist per region and per brand but not per region and brand
    together: with both chosen the region's figures show (the '' lets region
    rows pass a brand filter and brand rows a region filter)."""
    return "".join(
        f"\n  AND $__conditionalAll({level} IN (${{{level}:singlequote}}, ''), ${level})"
        for level in ("region", "brand")
        if level in levels
    )


def where(conditions: str) -> str:
    """A WHERE clause of AND lines (as the filters here are written), or nothing."""
    return "\nWHERE " + conditions.removeprefix("\n  AND ") if conditions else ""


DEALER_KEY = """
  AND $__conditionalAll(key = ${dealer:singlequote}, $dealer)"""
REGION_BRAND = """
  AND $__conditionalAll(region = ${region:singlequote}, $region)
  AND $__conditionalAll(brand = ${brand:singlequote}, $brand)"""
"""Dealer-scope rows (snapshots, alerts) of the chosen dealer (DEALER_KEY: a
sorting-key column of metric_snapshots) and of the chosen region and brand
(REGION_BRAND: not, so WHERE, after FINAL)."""

EVENT_DEALERS = """
  AND $__conditionalAll(dealer_id = ${dealer:singlequote}, $dealer)
  AND $__conditionalAll(dealer_id IN (
          SELECT key FROM csi.metric_snapshots
          WHERE scope = 'dealer' AND region = ${region:singlequote}), $region)
  AND $__conditionalAll(dealer_id IN (
          SELECT key FROM csi.metric_snapshots
          WHERE scope = 'dealer' AND brand = ${brand:singlequote}), $brand)"""
"""Raw events of the chosen dealers (events carry no region or brand: the
dealers' snapshots know them)."""

CASE_KEY = """
  AND department = ${department:singlequote}
  AND $__conditionalAll(dealer_id = ${dealer:singlequote}, $dealer)"""
"""Cases of the chosen department and dealer (with REGION_BRAND after FINAL)."""

FINAL_BY_PARTITION = "SETTINGS do_not_merge_across_partitions_select_final = 1"
"""For FINAL on the monthly partitioned tables (events, alerts): collapse versions
within each partition only. The results are the same — ReplacingMergeTree never
merges across partitions, and an event's copies (same occurred_at) and an alert's
records (same detected_at) share their month — but a month held in one part is
read without merging, and its PREWHERE skips what it does not need."""

# Reading the tables fast (benchmarks/dashboards_speed.py, 3 years x 1,000 dealers):
# conditions on columns that every version of a row shares — the sorting key of
# metric_snapshots; event_type, dealer_id, department and occurred_at of an event;
# an alert's detected_at, kind, scope and key; a case's opened_at, department and
# dealer — go in PREWHERE, which FINAL applies before collapsing versions (so only
# the matching rows are merged and only their granules' other columns are read);
# conditions on what a newer version may change (an alert's status, region and
# brand of a row) stay in WHERE, after FINAL.


def _map_value(column: str, key: str) -> str:
    """A map's value, NULL (not 0) where the key is absent."""
    return f"if(mapContains({column}, '{key}'), {column}['{key}'], NULL)"


def stat_panel(
    title: str,
    metric: str,
    n: str,
    *,
    levels: tuple[str, ...],
    x: int,
    y: int,
    w: int,
    h: int = 4,
    unit: str | None = None,
    decimals: int | None = None,
    thresholds: tuple[tuple[float, str], ...] = (),
    description: str = "",
) -> Panel:
    """A stat: the unit's latest snapshot in the range (window and department
    from the variables), its n and the change since the previous period."""
    sql = _sql(
        """
        WITH latest AS (
            SELECT scope, key, window_end, {metric} AS value, {n} AS n,
                {previous_end} AS previous_end
            FROM csi.metric_snapshots FINAL
            PREWHERE {unit}{window}
              AND $__dateFilter(window_end){members}
            ORDER BY window_end DESC
            LIMIT 1
        )
        SELECT
            latest.value AS {name},
            latest.n AS n,
            latest.value - previous.value AS change
        FROM latest
        LEFT JOIN (
            SELECT scope, key, {metric} AS value
            FROM csi.metric_snapshots FINAL
            PREWHERE {unit}{window}
              AND (scope, key, window_end) IN (SELECT scope, key, previous_end FROM latest){members}
        ) AS previous ON previous.scope = latest.scope AND previous.key = latest.key
        """,
        metric=metric,
        n=n,
        name=metric,
        previous_end=PREVIOUS_END,
        unit=unit_filter(*levels),
        window=SNAPSHOT_WINDOW,
        members=where(unit_members(*levels)),
    )
    return Panel(
        title,
        "stat",
        sql,
        (metric, "n", "change"),
        w=w,
        h=h,
        x=x,
        y=y,
        unit=unit,
        decimals=decimals,
        thresholds=thresholds,
        description=description,
    )


# --- 1. network overview -------------------------------------------------------------

_OVERVIEW_UNIT = (
    " Figures of the chosen region, else the chosen brand, else the whole network, "
    "for the window ending on the last day of the range; n is the sample size, "
    "change the difference to the previous period of the same window."
)
_CSI_THRESHOLDS = ((750.0, "orange"), (800.0, "green"))


def _latest_per_dealer(columns: str, dealers: str = "") -> str:
    """Each dealer's latest snapshot in the range (window and department from the
    variables) as `columns`: the (key, window_end) of the newest row that passes
    the filters (latest versions), then only those rows with their figures, so
    that the wide columns are read for one row per dealer, not for the range.
    `dealers` adds AND lines on key (PREWHERE); region and brand from the
    variables filter the latest versions."""
    return _sql(
        """
        SELECT {columns}
        FROM csi.metric_snapshots FINAL
        PREWHERE scope = 'dealer'{window}
          AND (key, window_end) IN (
              SELECT key, max(window_end)
              FROM csi.metric_snapshots FINAL
              PREWHERE scope = 'dealer'{window}
                AND $__dateFilter(window_end){dealers}{members}
              GROUP BY key)
        """,
        columns=columns,
        window=SNAPSHOT_WINDOW,
        dealers=dealers,
        members=where(REGION_BRAND),
    )


# Each dealer's latest snapshot in the range and the one of the previous period,
# read in one pass: the (key, window_end) of the latest (as in _latest_per_dealer)
# and of the previous period's end, then per dealer the figures of the newer row
# and the CSI of the older one, if there is one (a tuple: argMax/argMin would skip
# a NULL CSI).
LEAGUE_TABLE_SQL = _sql(
    """
    SELECT
        rank() OVER (ORDER BY latest.csi DESC) AS rank,
        latest.key AS dealer,
        latest.region AS region,
        latest.csi AS csi,
        {factors},
        latest.n_responses AS n,
        latest.csi - latest.previous_csi AS change,
        alerts.open_alerts AS open_alerts
    FROM (
        SELECT
            key,
            toLowCardinality(newest.1) AS region,
            newest.2 AS csi,
            newest.3 AS factors,
            newest.4 AS n_responses,
            previous_csi
        FROM (
            SELECT
                key,
                argMax((region, csi, factors, n_responses), window_end) AS newest,
                if(count() > 1, argMin(tuple(csi), window_end).1, NULL) AS previous_csi
            FROM csi.metric_snapshots FINAL
            PREWHERE scope = 'dealer'{window}
              AND (key, window_end) IN (
                  SELECT key, arrayJoin([latest_end, {previous_end}])
                  FROM (
                      SELECT key, `window`, max(window_end) AS latest_end
                      FROM csi.metric_snapshots FINAL
                      PREWHERE scope = 'dealer'{window}
                        AND $__dateFilter(window_end){members}
                      GROUP BY key, `window`))
            GROUP BY key
        )
    ) AS latest
    LEFT JOIN (
        SELECT key, count() AS open_alerts
        FROM csi.alerts FINAL
        PREWHERE scope = 'dealer'
          AND detected_at <= $__toTime
        WHERE status = 'open'
          AND department = ${department:singlequote}
        GROUP BY key
    ) AS alerts ON alerts.key = latest.key
    ORDER BY rank, dealer
    {final_by_partition}
    """,
    window=SNAPSHOT_WINDOW,
    previous_end=previous_end("latest_end"),
    members=where(REGION_BRAND),
    factors=",\n".join(f"{_map_value('latest.factors', f)} AS {f}" for f in FACTORS),
    final_by_partition=FINAL_BY_PARTITION,
)

NETWORK_OVERVIEW = Dashboard(
    uid="csi-network-overview",
    title="Network overview",
    folder="Satisfaction",
    description=(
        "How satisfied the network's customers are, by region and dealer: CSI, NPS, "
        "satisfaction rate and degree, response rate, the dealer league table."
    ),
    variables=(REGION, BRAND, DEPARTMENT, WINDOW),
    panels=(
        stat_panel(
            "CSI",
            "csi",
            "n_responses",
            levels=("region", "brand"),
            x=0,
            y=0,
            w=5,
            decimals=0,
            thresholds=_CSI_THRESHOLDS,
            description="J.D. Power-style index, 100–1000: the factor indices weighted."
            + _OVERVIEW_UNIT,
        ),
        stat_panel(
            "NPS",
            "nps",
            "nps_n",
            levels=("region", "brand"),
            x=5,
            y=0,
            w=5,
            decimals=1,
            thresholds=((0.0, "orange"), (30.0, "green")),
            description="Promoters minus detractors, % of surveys with a recommend answer."
            + _OVERVIEW_UNIT,
        ),
        stat_panel(
            "Satisfaction rate (breadth)",
            "satisfaction_rate",
            "overall_n",
            levels=("region", "brand"),
            x=10,
            y=0,
            w=5,
            unit="percent",
            decimals=1,
            thresholds=((85.0, "orange"), (92.0, "green")),
            description="Share of respondents whose overall answer is at least the middle of "
            "the scale (满意率)." + _OVERVIEW_UNIT,
        ),
        stat_panel(
            "Satisfaction degree (depth)",
            "satisfaction_degree",
            "n_responses",
            levels=("region", "brand"),
            x=15,
            y=0,
            w=5,
            decimals=1,
            thresholds=((70.0, "orange"), (80.0, "green")),
            description="Weighted mean item score on 0–100 (满意度): how satisfied, not how "
            "many." + _OVERVIEW_UNIT,
        ),
        stat_panel(
            "Response rate",
            "response_rate",
            "n_visits",
            levels=("region", "brand"),
            x=20,
            y=0,
            w=4,
            unit="percent",
            decimals=1,
            description="Survey responses per 100 visits; n is the visits." + _OVERVIEW_UNIT,
        ),
        Panel(
            "CSI trend by region",
            "timeseries",
            _sql(
                """
                SELECT
                    toDateTime(window_end, 'UTC') AS time,
                    if(scope = 'network', 'Network', key) AS region,
                    csi AS value
                FROM csi.metric_snapshots FINAL
                PREWHERE scope IN ('region', 'network'){window}
                  AND $__dateFilter(window_end)
                  AND (scope = 'network' OR $__conditionalAll(key = ${region:singlequote}, $region))
                ORDER BY time, region
                """,
                window=SNAPSHOT_WINDOW,
            ),
            ("time", "region", "value"),
            w=16,
            h=9,
            x=0,
            y=4,
            decimals=0,
            description="Each region's CSI over the chosen rolling window, day by day, with "
            "the network as the reference line (region roll-ups: the brand filter does not "
            "apply).",
        ),
        Panel(
            "Region comparison",
            "barchart",
            _sql(
                """
                SELECT region, csi
                FROM (
                    SELECT key AS region, csi
                    FROM csi.metric_snapshots FINAL
                    PREWHERE scope = 'region'{window}
                      AND $__dateFilter(window_end)
                      AND $__conditionalAll(key = ${region:singlequote}, $region)
                    ORDER BY window_end DESC
                    LIMIT 1 BY key
                )
                ORDER BY csi DESC
                """,
                window=SNAPSHOT_WINDOW,
            ),
            ("region", "csi"),
            w=8,
            h=9,
            x=16,
            y=4,
            decimals=0,
            description="Each region's CSI for the window ending on the last day of the range "
            "(region roll-ups: the brand filter does not apply).",
        ),
        Panel(
            "Dealer league table",
            "table",
            LEAGUE_TABLE_SQL,
            ("rank", "dealer", "region", "csi", *FACTORS, "n", "change", "open_alerts"),
            w=24,
            h=12,
            x=0,
            y=13,
            decimals=0,
            description="Dealers of the chosen region and brand ranked by CSI for the window "
            "ending on the last day of the range, with the five factor indices, the "
            "responses (n), the change since the previous period and the dealer's open "
            "alerts of this department.",
        ),
    ),
)

# --- 2. dealer drill-down --------------------------------------------------------------

_DEALER_OR_NETWORK = _sql(
    """
    PREWHERE ((scope = 'dealer' AND key = ${dealer:singlequote}) OR scope = 'network'){window}
      AND $__dateFilter(window_end)
    """,
    window=SNAPSHOT_WINDOW,
)
"""The chosen dealer's and the network's snapshots in the range."""


def _dealer_vs_network(columns: tuple[str, ...], name: str, labels: tuple[str, ...]) -> str:
    """Rows `name`, dealer, network: one per label, from the values (`columns`,
    in the labels' order) of the latest dealer and network snapshot."""
    label_list = "[" + ", ".join(f"'{label}'" for label in labels) + "]"
    return _sql(
        """
        WITH latest AS (
            SELECT
                scope,
                [
                    {columns}
                ] AS figures
            FROM csi.metric_snapshots FINAL
            {where}
            ORDER BY window_end DESC
            LIMIT 1 BY scope
        )
        SELECT
            {name},
            anyIf(item, scope = 'dealer') AS dealer,
            anyIf(item, scope = 'network') AS network
        FROM latest
        ARRAY JOIN {labels} AS {name}, figures AS item
        GROUP BY {name}
        ORDER BY indexOf({labels}, {name})
        """,
        columns=",\n".join(columns),
        where=_DEALER_OR_NETWORK,
        name=name,
        labels=label_list,
    )


_VISIT_KPIS = (
    ("visits (n)", "toFloat64(n_visits)"),
    ("on-time delivery %", "on_time_rate"),
    ("greet wait, minutes", "greet_wait_min"),
    ("invoice / estimate", "invoice_vs_estimate"),
    ("fixed first time %", "fixed_first_time"),
    ("follow-up rate %", "follow_up_rate"),
)

_LOYALTY_CELLS = (
    ("satisfied", "sales satisfied"),
    ("dissatisfied", "sales dissatisfied"),
    ("none", "no sales survey"),
)
"""The loyalty matrix's sales side: the customer's sales survey, if any."""

DEALER_DRILLDOWN = Dashboard(
    uid="csi-dealer-drilldown",
    title="Dealer drill-down",
    folder="Satisfaction",
    description=(
        "One dealer against its region and the network: CSI and factors over time, "
        "attribute ratings by week, expectations (CSS, SERVQUAL), loyalty, detractors' "
        "comments and visit KPIs."
    ),
    variables=(REGION, BRAND, ONE_DEALER, DEPARTMENT, WINDOW),
    panels=(
        stat_panel(
            "CSI",
            "csi",
            "n_responses",
            levels=("dealer",),
            x=0,
            y=0,
            w=6,
            decimals=0,
            thresholds=_CSI_THRESHOLDS,
            description="The dealer's CSI for the window ending on the last day of the "
            "range; change since the previous period.",
        ),
        stat_panel(
            "NPS",
            "nps",
            "nps_n",
            levels=("dealer",),
            x=6,
            y=0,
            w=6,
            decimals=1,
            thresholds=((0.0, "orange"), (30.0, "green")),
            description="The dealer's NPS; n is the surveys with a recommend answer.",
        ),
        stat_panel(
            "Satisfaction rate",
            "satisfaction_rate",
            "overall_n",
            levels=("dealer",),
            x=12,
            y=0,
            w=6,
            unit="percent",
            decimals=1,
            thresholds=((85.0, "orange"), (92.0, "green")),
            description="Share of the dealer's respondents at least satisfied overall.",
        ),
        stat_panel(
            "Response rate",
            "response_rate",
            "n_visits",
            levels=("dealer",),
            x=18,
            y=0,
            w=6,
            unit="percent",
            decimals=1,
            description="The dealer's survey responses per 100 visits; n is the visits.",
        ),
        Panel(
            "CSI vs region and network",
            "timeseries",
            _sql(
                """
                SELECT
                    toDateTime(window_end, 'UTC') AS time,
                    maxIf(csi, scope = 'dealer') AS dealer_csi,
                    maxIf(csi, scope = 'region') AS region_csi,
                    maxIf(csi, scope = 'network') AS network_csi
                FROM csi.metric_snapshots FINAL
                PREWHERE (
                        (scope = 'dealer' AND key = ${dealer:singlequote})
                     OR (scope = 'region' AND key IN (
                            SELECT region FROM csi.metric_snapshots
                            WHERE scope = 'dealer' AND key = ${dealer:singlequote}))
                     OR scope = 'network'
                  ){window}
                  AND $__dateFilter(window_end)
                GROUP BY time
                ORDER BY time
                """,
                window=SNAPSHOT_WINDOW,
            ),
            ("time", "dealer_csi", "region_csi", "network_csi"),
            w=12,
            h=9,
            x=0,
            y=4,
            decimals=0,
            description="The dealer's CSI over the chosen rolling window, day by day, with "
            "its region's and the network's.",
        ),
        Panel(
            "Factor indices",
            "timeseries",
            _sql(
                """
                SELECT time, series, value
                FROM (
                    SELECT toDateTime(window_end, 'UTC') AS time, factor AS series,
                        factor_index AS value
                    FROM csi.metric_snapshots FINAL
                    ARRAY JOIN mapKeys(factors) AS factor, mapValues(factors) AS factor_index
                    PREWHERE scope = 'dealer'
                      AND key = ${dealer:singlequote}{window}
                      AND $__dateFilter(window_end)
                    UNION ALL
                    SELECT toDateTime(window_end, 'UTC') AS time, 'network CSI' AS series,
                        csi AS value
                    FROM csi.metric_snapshots FINAL
                    PREWHERE scope = 'network'{window}
                      AND $__dateFilter(window_end)
                )
                ORDER BY time, series
                """,
                window=SNAPSHOT_WINDOW,
            ),
            ("time", "series", "value"),
            w=12,
            h=9,
            x=12,
            y=4,
            decimals=0,
            description="The dealer's five factor indices (100–1000) over the chosen rolling "
            "window, with the network's CSI as the reference.",
        ),
        # A heat map rather than a table: weeks × attributes coloured by the mean
        # rating make a weak attribute, or a bad week, visible at a glance, which
        # 20 columns of numbers do not. Long rows (time, attribute, value): the
        # plugin turns them into one field per attribute, which Grafana's heat map
        # shows as ordinal rows; `csi report` draws the same matrix.
        Panel(
            "Attribute ratings by week",
            "heatmap",
            _sql(
                """
                SELECT time, attribute, avg(rating10) AS value
                FROM (
                    SELECT
                        toDateTime(toMonday(occurred_at), 'UTC') AS time,
                        rating.1 AS attribute,
                        1 + 9 * (rating.2 - JSONExtractFloat(payload, 'scale', 'min'))
                            / (JSONExtractFloat(payload, 'scale', 'max')
                               - JSONExtractFloat(payload, 'scale', 'min')) AS rating10
                    FROM csi.events FINAL
                    ARRAY JOIN JSONExtractKeysAndValues(payload, 'ratings', 'Float64') AS rating
                    PREWHERE event_type = 'survey'
                      AND dealer_id = ${dealer:singlequote}
                      AND department = ${department:singlequote}
                      AND $__timeFilter(occurred_at)
                )
                GROUP BY time, attribute
                ORDER BY time, attribute
                {final_by_partition}
                """,
                final_by_partition=FINAL_BY_PARTITION,
            ),
            ("time", "attribute", "value"),
            w=24,
            h=10,
            x=0,
            y=13,
            decimals=1,
            description="Mean rating of each questionnaire attribute per week (Monday), "
            "rescaled to 1–10, over the dealer's surveys.",
        ),
        Panel(
            "CSS: expectations exceeded, met, disappointed",
            "barchart",
            _dealer_vs_network(
                ("css_exceeded", "css_met", "css_disappointed"),
                "verdict",
                ("exceeded", "met", "disappointed"),
            ),
            ("verdict", "dealer", "network"),
            w=8,
            h=8,
            x=0,
            y=23,
            unit="percent",
            decimals=1,
            description="Share of responses whose perception ÷ expectation is above, "
            "within or below 1 ± 0.05, for the window ending on the last day of the range.",
        ),
        Panel(
            "SERVQUAL gaps by RATER dimension",
            "barchart",
            _dealer_vs_network(
                tuple(_map_value("servqual_gap", d) for d in RATER_DIMENSIONS),
                "dimension",
                RATER_DIMENSIONS,
            ),
            ("dimension", "dealer", "network"),
            w=8,
            h=8,
            x=8,
            y=23,
            decimals=2,
            description="Mean rating minus expected rating (1–10 scale) per RATER dimension; "
            "below 0 the dealer falls short of what customers expected.",
        ),
        Panel(
            "Loyalty matrix",
            "table",
            _sql(
                """
                SELECT
                    sales_satisfaction,
                    if(mapContains(loyalty_matrix, cell_satisfied),
                       loyalty_matrix[cell_satisfied], NULL) AS service_satisfied,
                    loyalty_n[cell_satisfied] AS n_satisfied,
                    if(mapContains(loyalty_matrix, cell_dissatisfied),
                       loyalty_matrix[cell_dissatisfied], NULL) AS service_dissatisfied,
                    loyalty_n[cell_dissatisfied] AS n_dissatisfied
                FROM (
                    SELECT loyalty_matrix, loyalty_n
                    FROM csi.metric_snapshots FINAL
                    PREWHERE scope = 'dealer'
                      AND key = ${dealer:singlequote}{window}
                      AND $__dateFilter(window_end)
                    ORDER BY window_end DESC
                    LIMIT 1
                )
                ARRAY JOIN
                    {labels} AS sales_satisfaction,
                    {satisfied} AS cell_satisfied,
                    {dissatisfied} AS cell_dissatisfied
                """,
                window=SNAPSHOT_WINDOW,
                labels="[" + ", ".join(f"'{label}'" for _, label in _LOYALTY_CELLS) + "]",
                satisfied="[" + ", ".join(f"'{c}|satisfied'" for c, _ in _LOYALTY_CELLS) + "]",
                dissatisfied="["
                + ", ".join(f"'{c}|dissatisfied'" for c, _ in _LOYALTY_CELLS)
                + "]",
            ),
            (
                "sales_satisfaction",
                "service_satisfied",
                "n_satisfied",
                "service_dissatisfied",
                "n_dissatisfied",
            ),
            w=8,
            h=8,
            x=16,
            y=23,
            decimals=1,
            description="Share of service respondents with high return intent (%), by "
            "whether the same customer was satisfied with sales and with service; n per cell.",
        ),
        Panel(
            "Visit KPIs",
            "table",
            _dealer_vs_network(
                tuple(column for _, column in _VISIT_KPIS),
                "kpi",
                tuple(label for label, _ in _VISIT_KPIS),
            ),
            ("kpi", "dealer", "network"),
            w=8,
            h=10,
            x=0,
            y=31,
            decimals=1,
            description="Visit KPIs for the window ending on the last day of the range: "
            "on-time delivery, greet wait, invoice vs estimate, fixed first time (no "
            "comeback within 30 days), follow-up (reached within 3 days).",
        ),
        Panel(
            "Detractors' comments",
            "table",
            _sql(
                """
                SELECT
                    occurred_at AS time,
                    JSONExtract(payload, 'recommend', 'Nullable(Int64)') AS recommend,
                    JSONExtract(payload, 'overall', 'Nullable(Float64)') AS overall,
                    JSONExtractString(payload, 'channel') AS channel,
                    JSONExtractString(payload, 'comment') AS comment,
                    customer_ref
                FROM csi.events FINAL
                PREWHERE event_type = 'survey'
                  AND dealer_id = ${dealer:singlequote}
                  AND department = ${department:singlequote}
                  AND $__timeFilter(occurred_at)
                WHERE recommend <= 6
                  AND comment != ''
                ORDER BY time DESC
                LIMIT 50
                {final_by_partition}
                """,
                final_by_partition=FINAL_BY_PARTITION,
            ),
            ("time", "recommend", "overall", "channel", "comment", "customer_ref"),
            w=16,
            h=10,
            x=8,
            y=31,
            description="The 50 newest surveys with a comment whose recommend answer is 0–6 "
            "(NPS detractors), newest first; customer_ref finds the customer's case.",
        ),
    ),
)

# --- 3. complaints and cases ----------------------------------------------------------

_COMPLAINTS_UNIT = unit_filter("dealer", "region", "brand")
_COMPLAINTS_MEMBERS = where(unit_members("dealer", "region", "brand"))
_UNIT_NOTE = " For the chosen dealer, else the region, else the brand, else the whole network."


def _complaint_durations(kind: str) -> str:
    return _sql(
        """
        SELECT
            toDateTime(window_end, 'UTC') AS time,
            {kind}_p50_h AS p50,
            {kind}_p90_h AS p90
        FROM csi.metric_snapshots FINAL
        PREWHERE {unit}{window}
          AND $__dateFilter(window_end){members}
        ORDER BY time
        """,
        kind=kind,
        unit=_COMPLAINTS_UNIT,
        window=SNAPSHOT_WINDOW,
        members=_COMPLAINTS_MEMBERS,
    )


_STAGES = "['open', 'contacted', 'resolved', 'closed']"

COMPLAINTS_CASES = Dashboard(
    uid="csi-complaints-cases",
    title="Complaints and cases",
    folder="Operations",
    description=(
        "Complaint backlog and response times against their SLAs, the hot-alert cases "
        "from open to closed, and whether customers came back satisfied."
    ),
    variables=(REGION, BRAND, DEALER, DEPARTMENT, WINDOW),
    panels=(
        Panel(
            "Open complaints",
            "timeseries",
            _sql(
                """
                SELECT
                    toDateTime(window_end, 'UTC') AS time,
                    complaints_backlog AS open_backlog,
                    complaints_opened AS opened
                FROM csi.metric_snapshots FINAL
                PREWHERE {unit}
                  AND department = ${department:singlequote}
                  AND `window` = 'day'
                  AND $__dateFilter(window_end){members}
                ORDER BY time
                """,
                unit=_COMPLAINTS_UNIT,
                members=_COMPLAINTS_MEMBERS,
            ),
            ("time", "open_backlog", "opened"),
            w=12,
            h=8,
            x=0,
            y=0,
            unit="short",
            decimals=0,
            description="Complaints open at the end of each day, and complaints opened that "
            "day." + _UNIT_NOTE,
        ),
        Panel(
            "Case funnel",
            "barchart",
            _sql(
                """
                SELECT stage, cases, escalated
                FROM (
                    SELECT
                        [countIf(status = 'open'), countIf(status = 'contacted'),
                         countIf(status = 'resolved'), countIf(status = 'closed')] AS by_stage,
                        [countIf(status = 'open' AND escalation_level > 0),
                         countIf(status = 'contacted' AND escalation_level > 0),
                         countIf(status = 'resolved' AND escalation_level > 0),
                         countIf(status = 'closed' AND escalation_level > 0)] AS escalated_by_stage
                    FROM csi.cases FINAL
                    PREWHERE $__timeFilter(opened_at){cases}{members}
                )
                ARRAY JOIN {stages} AS stage, by_stage AS cases, escalated_by_stage AS escalated
                """,
                cases=CASE_KEY,
                members=where(REGION_BRAND),
                stages=_STAGES,
            ),
            ("stage", "cases", "escalated"),
            w=12,
            h=8,
            x=12,
            y=0,
            unit="short",
            decimals=0,
            description="Cases opened in the range (one per hot alert's customer) by their "
            "current status, and how many of them were escalated for being overdue.",
        ),
        Panel(
            "Time to first response",
            "timeseries",
            _complaint_durations("first_response"),
            ("time", "p50", "p90"),
            w=12,
            h=8,
            x=0,
            y=8,
            unit="h",
            decimals=1,
            description="Hours from a complaint's opening to its first response, median and "
            "90th percentile over the chosen rolling window." + _UNIT_NOTE,
        ),
        Panel(
            "Time to resolution",
            "timeseries",
            _complaint_durations("resolution"),
            ("time", "p50", "p90"),
            w=12,
            h=8,
            x=12,
            y=8,
            unit="h",
            decimals=1,
            description="Hours from a complaint's opening to its resolution, median and 90th "
            "percentile over the chosen rolling window." + _UNIT_NOTE,
        ),
        Panel(
            "Complaints past SLA",
            "table",
            _sql(
                """
                SELECT
                    detected_at AS time,
                    key AS dealer,
                    region,
                    metric AS overdue,
                    round(`current`, 1) AS hours,
                    message
                FROM csi.alerts FINAL
                PREWHERE kind = 'complaint_sla'
                  AND scope = 'dealer'
                  AND detected_at <= $__toTime{dealer}
                WHERE status = 'open'
                  AND department = ${department:singlequote}{members}
                ORDER BY time
                {final_by_partition}
                """,
                dealer=DEALER_KEY,
                members=REGION_BRAND,
                final_by_partition=FINAL_BY_PARTITION,
            ),
            ("time", "dealer", "region", "overdue", "hours", "message"),
            w=16,
            h=9,
            x=0,
            y=16,
            description="Open complaint-SLA alerts: complaints whose first response or "
            "resolution is past its due time (by severity), oldest first.",
        ),
        Panel(
            "Recovery success",
            "timeseries",
            _sql(
                """
                SELECT time, series, value
                FROM (
                    SELECT
                        toDateTime(window_end, 'UTC') AS time,
                        'complaints closed satisfied' AS series,
                        recovery_success AS value
                    FROM csi.metric_snapshots FINAL
                    PREWHERE {unit}{window}
                      AND $__dateFilter(window_end){members}
                    UNION ALL
                    SELECT
                        toDateTime(toMonday(opened_at), 'UTC') AS time,
                        'cases recovered' AS series,
                        100 * countIf(recovery = 'recovered')
                            / countIf(recovery != 'pending') AS value
                    FROM csi.cases FINAL
                    PREWHERE $__timeFilter(opened_at){cases}{case_members}
                    GROUP BY time
                    HAVING countIf(recovery != 'pending') > 0
                )
                ORDER BY time, series
                """,
                unit=_COMPLAINTS_UNIT,
                members=_COMPLAINTS_MEMBERS,
                window=SNAPSHOT_WINDOW,
                cases=CASE_KEY,
                case_members=where(REGION_BRAND),
            ),
            ("time", "series", "value"),
            w=8,
            h=9,
            x=16,
            y=16,
            unit="percent",
            decimals=0,
            description="Complaints: % of closed complaints whose customer was satisfied "
            "after (rolling window). Cases: % of cases opened that week whose customer's "
            "next survey or call showed recovery, of those where it showed either way.",
        ),
    ),
)

# --- 4. mystery shop --------------------------------------------------------------------

_MYSTERY_UNIT = _sql(
    """
    SELECT window_end, mystery_shop_score, mystery_shop_sections
    FROM csi.metric_snapshots FINAL
    PREWHERE {unit}{window}
      AND $__dateFilter(window_end){members}
    """,
    unit=_COMPLAINTS_UNIT,
    window=SNAPSHOT_WINDOW,
    members=_COMPLAINTS_MEMBERS,
)
_MYSTERY_NETWORK = _sql(
    """
    SELECT window_end, mystery_shop_score, mystery_shop_sections
    FROM csi.metric_snapshots FINAL
    PREWHERE scope = 'network'{window}
      AND $__dateFilter(window_end)
    """,
    window=SNAPSHOT_WINDOW,
)

AUDIT_ITEMS = (
    "JSONExtract(payload, 'items', "
    "'Array(Tuple(code String, section String, weight Float64, result String, mandatory UInt8))')"
)
"""A mystery shop's checklist items, parsed once per audit (not once per field)."""

MYSTERY_SHOP = Dashboard(
    uid="csi-mystery-shop",
    title="Mystery shop",
    folder="Operations",
    description=(
        "Mystery-shop audits: weighted pass rates by dealer and checklist section, the "
        "items that fail most, each audit."
    ),
    variables=(REGION, BRAND, DEALER, DEPARTMENT, WINDOW),
    panels=(
        Panel(
            "Score by dealer",
            "barchart",
            _sql(
                """
                SELECT dealer, score
                FROM (
                    {latest}
                )
                WHERE score IS NOT NULL
                ORDER BY score DESC, dealer
                """,
                latest=_latest_per_dealer(
                    "key AS dealer, mystery_shop_score AS score", dealers=DEALER_KEY
                ),
            ),
            ("dealer", "score"),
            w=12,
            h=9,
            x=0,
            y=0,
            unit="percent",
            decimals=0,
            description="Each dealer's mystery-shop score (Σ weight·pass / Σ weight·(pass + "
            "fail)) over the audits of the window ending on the last day of the range.",
        ),
        Panel(
            "Score by section",
            "barchart",
            _sql(
                """
                SELECT
                    section,
                    maxIf(toNullable(score), side = 'selected') AS selected,
                    maxIf(toNullable(score), side = 'network') AS network
                FROM (
                    SELECT 'selected' AS side, mystery_shop_sections AS sections
                    FROM (
                        {unit}
                        ORDER BY window_end DESC
                        LIMIT 1
                    )
                    UNION ALL
                    SELECT 'network' AS side, mystery_shop_sections AS sections
                    FROM (
                        {network}
                        ORDER BY window_end DESC
                        LIMIT 1
                    )
                )
                ARRAY JOIN mapKeys(sections) AS section, mapValues(sections) AS score
                GROUP BY section
                ORDER BY section
                """,
                unit=_MYSTERY_UNIT,
                network=_MYSTERY_NETWORK,
            ),
            ("section", "selected", "network"),
            w=12,
            h=9,
            x=12,
            y=0,
            unit="percent",
            decimals=0,
            description="Score per checklist section for the selection (the chosen dealer, "
            "else region, else brand, else the network) and for the network.",
        ),
        Panel(
            "Score over time",
            "timeseries",
            _sql(
                """
                SELECT
                    time,
                    maxIf(score, side = 'selected') AS selected,
                    maxIf(score, side = 'network') AS network
                FROM (
                    SELECT toDateTime(window_end, 'UTC') AS time, 'selected' AS side,
                        mystery_shop_score AS score
                    FROM (
                        {unit}
                    )
                    UNION ALL
                    SELECT toDateTime(window_end, 'UTC') AS time, 'network' AS side,
                        mystery_shop_score AS score
                    FROM (
                        {network}
                    )
                )
                GROUP BY time
                ORDER BY time
                """,
                unit=_MYSTERY_UNIT,
                network=_MYSTERY_NETWORK,
            ),
            ("time", "selected", "network"),
            w=10,
            h=10,
            x=0,
            y=9,
            unit="percent",
            decimals=0,
            description="Mystery-shop score over the chosen rolling window for the selection"
            " and the network.",
        ),
        Panel(
            "Failed items",
            "table",
            _sql(
                """
                SELECT
                    item.code AS code,
                    item.section AS section,
                    item.mandatory AS mandatory,
                    count() AS failures,
                    uniqExact(dealer_id) AS dealers
                FROM csi.events FINAL
                ARRAY JOIN {items} AS item
                PREWHERE event_type = 'mystery_shop'
                  AND department = ${department:singlequote}
                  AND $__timeFilter(occurred_at){dealers}
                WHERE item.result = 'fail'
                GROUP BY code, section, mandatory
                ORDER BY mandatory DESC, failures DESC, code
                {final_by_partition}
                """,
                items=AUDIT_ITEMS,
                dealers=EVENT_DEALERS,
                final_by_partition=FINAL_BY_PARTITION,
            ),
            ("code", "section", "mandatory", "failures", "dealers"),
            w=14,
            h=10,
            x=10,
            y=9,
            description="Checklist items failed in the range's audits, mandatory ones first, "
            "with how many dealers failed them.",
        ),
        Panel(
            "Audits",
            "table",
            _sql(
                """
                WITH {items} AS items
                SELECT
                    occurred_at AS time,
                    dealer_id AS dealer,
                    JSONExtractString(payload, 'scenario') AS scenario,
                    100 * arraySum(i -> i.weight * (i.result = 'pass'), items)
                        / nullIf(arraySum(i -> i.weight * (i.result != 'na'), items), 0)
                        AS score,
                    JSONExtract(payload, 'pass_mark', 'Nullable(Float64)') AS pass_mark,
                    arrayCount(i -> i.mandatory AND i.result = 'fail', items) AS mandatory_failed
                FROM csi.events FINAL
                PREWHERE event_type = 'mystery_shop'
                  AND department = ${department:singlequote}
                  AND $__timeFilter(occurred_at){dealers}
                ORDER BY time DESC
                {final_by_partition}
                """,
                items=AUDIT_ITEMS,
                dealers=EVENT_DEALERS,
                final_by_partition=FINAL_BY_PARTITION,
            ),
            ("time", "dealer", "scenario", "score", "pass_mark", "mandatory_failed"),
            w=24,
            h=9,
            x=0,
            y=19,
            decimals=0,
            description="Every audit in the range, newest first: its score, the pass mark it "
            "was held to and its failed mandatory items.",
        ),
    ),
)

# --- 5. alerts ------------------------------------------------------------------------------

ALERT_KEY = """
  AND $__conditionalAll(kind = ${kind:singlequote}, $kind)
  AND $__conditionalAll(scope = 'dealer' AND key = ${dealer:singlequote}, $dealer)"""
ALERT_MEMBERS = """
  AND $__conditionalAll(department = ${department:singlequote}, $department)
  AND $__conditionalAll(region = ${region:singlequote}, $region)
  AND $__conditionalAll(brand = ${brand:singlequote}, $brand)"""
"""Alerts of the chosen kind and dealer (ALERT_KEY: every record of an alert has
them, PREWHERE) and department, region and brand (ALERT_MEMBERS, WHERE); region
alerts have no brand, so a chosen brand shows dealer alerts only."""

ALERTS = Dashboard(
    uid="csi-alerts",
    title="Alerts",
    folder="Operations",
    description=(
        "Drop, hot, complaint-SLA and mystery-shop alerts: what is open and what it says, "
        "what opened and closed recently, by dealer and kind."
    ),
    variables=(REGION, BRAND, DEALER, ALERT_DEPARTMENT, ALERT_KIND),
    panels=(
        Panel(
            "Alerts by kind",
            "barchart",
            _sql(
                """
                SELECT
                    kind,
                    countIf($__timeFilter(detected_at)) AS opened,
                    countIf(status = 'closed' AND $__timeFilter(updated_at)) AS closed,
                    countIf(status = 'open') AS still_open
                FROM csi.alerts FINAL
                PREWHERE detected_at <= $__toTime{alerts}{members}
                GROUP BY kind
                ORDER BY kind
                {final_by_partition}
                """,
                alerts=ALERT_KEY,
                members=where(ALERT_MEMBERS),
                final_by_partition=FINAL_BY_PARTITION,
            ),
            ("kind", "opened", "closed", "still_open"),
            w=8,
            h=8,
            x=0,
            y=0,
            unit="short",
            decimals=0,
            description="Alerts opened and closed in the range, and open now, by kind.",
        ),
        Panel(
            "Alerts opened by kind",
            "timeseries",
            _sql(
                """
                SELECT $__timeInterval(detected_at) AS time, kind, count() AS value
                FROM csi.alerts FINAL
                PREWHERE $__timeFilter(detected_at){alerts}{members}
                GROUP BY time, kind
                ORDER BY time, kind
                {final_by_partition}
                """,
                alerts=ALERT_KEY,
                members=where(ALERT_MEMBERS),
                final_by_partition=FINAL_BY_PARTITION,
            ),
            ("time", "kind", "value"),
            w=16,
            h=8,
            x=8,
            y=0,
            unit="short",
            decimals=0,
            description="Alerts opened per interval, by kind.",
        ),
        Panel(
            "Open alerts",
            "table",
            _sql(
                """
                SELECT
                    detected_at AS time,
                    kind,
                    scope,
                    key AS unit,
                    metric,
                    n,
                    message
                FROM csi.alerts FINAL
                PREWHERE detected_at <= $__toTime{alerts}
                WHERE status = 'open'{members}
                ORDER BY time DESC
                {final_by_partition}
                """,
                alerts=ALERT_KEY,
                members=ALERT_MEMBERS,
                final_by_partition=FINAL_BY_PARTITION,
            ),
            ("time", "kind", "scope", "unit", "metric", "n", "message"),
            w=24,
            h=10,
            x=0,
            y=8,
            description="Every alert still open, newest first, with the sentence it was "
            "sent with: what fell from what to what, on how many responses, how unusual.",
        ),
        Panel(
            "Recent alert changes",
            "table",
            _sql(
                """
                SELECT
                    updated_at AS time,
                    status,
                    kind,
                    key AS unit,
                    message
                FROM csi.alerts FINAL
                PREWHERE detected_at <= $__toTime{alerts}
                WHERE $__timeFilter(updated_at){members}
                ORDER BY time DESC
                LIMIT 200
                {final_by_partition}
                """,
                alerts=ALERT_KEY,
                members=ALERT_MEMBERS,
                final_by_partition=FINAL_BY_PARTITION,
            ),
            ("time", "status", "kind", "unit", "message"),
            w=14,
            h=10,
            x=0,
            y=18,
            description="Alerts opened or closed in the range, newest first (a closed "
            "alert shows its closing sentence).",
        ),
        Panel(
            "Alerts by dealer and kind",
            "table",
            _sql(
                """
                SELECT
                    key AS dealer,
                    kind,
                    countIf($__timeFilter(detected_at)) AS opened,
                    countIf(status = 'closed' AND $__timeFilter(updated_at)) AS closed,
                    countIf(status = 'open') AS still_open
                FROM csi.alerts FINAL
                PREWHERE scope = 'dealer'
                  AND detected_at <= $__toTime{alerts}{members}
                GROUP BY dealer, kind
                HAVING opened + closed + still_open > 0
                ORDER BY still_open DESC, opened DESC, dealer, kind
                {final_by_partition}
                """,
                alerts=ALERT_KEY,
                members=where(ALERT_MEMBERS),
                final_by_partition=FINAL_BY_PARTITION,
            ),
            ("dealer", "kind", "opened", "closed", "still_open"),
            w=10,
            h=10,
            x=14,
            y=18,
            description="Per dealer and kind: alerts opened and closed in the range, and open now.",
        ),
    ),
)

# --- 6. pipeline health ------------------------------------------------------------------


def _health(metric: str, series: str, per_worker: str, across: str) -> str:
    """One health metric per interval and key: `per_worker` aggregates each
    worker's measurements in the interval, `across` the workers."""
    return _sql(
        """
        SELECT time, {series}, {across}(per_worker) AS value
        FROM (
            SELECT
                $__timeInterval(measured_at) AS time,
                worker,
                key AS {series},
                {per_worker}(value) AS per_worker
            FROM csi.pipeline_health
            WHERE metric = '{metric}'
              AND $__timeFilter(measured_at)
            GROUP BY time, worker, {series}
        )
        GROUP BY time, {series}
        ORDER BY time, {series}
        """,
        series=series,
        per_worker=per_worker,
        across=across,
        metric=metric,
    )


PIPELINE_HEALTH = Dashboard(
    uid="csi-pipeline-health",
    title="Pipeline health",
    folder="Pipeline",
    description=(
        "The worker's own measurements (csi.pipeline_health, by wall-clock time) and the "
        "dead letters: throughput, consumer lag, sink latency, rejected input."
    ),
    time_from="now-6h",
    refresh="30s",
    panels=(
        Panel(
            "Events per second by type",
            "timeseries",
            _health("events_per_s", "event_type", "avg", "sum"),
            ("time", "event_type", "value"),
            w=12,
            h=8,
            x=0,
            y=0,
            unit="short",
            decimals=1,
            description="Events processed per second, by event type (dead_letter: rejected "
            "input), summed over the workers.",
        ),
        Panel(
            "Consumer lag by topic",
            "timeseries",
            _health("consumer_lag", "topic", "avg", "sum"),
            ("time", "topic", "value"),
            w=12,
            h=8,
            x=12,
            y=0,
            unit="short",
            decimals=0,
            description="Messages not yet consumed, by topic, summed over the workers.",
        ),
        Panel(
            "Sink batch latency by table",
            "timeseries",
            _health("sink_flush_seconds", "sink", "max", "max"),
            ("time", "sink", "value"),
            w=12,
            h=8,
            x=0,
            y=8,
            unit="s",
            decimals=3,
            description="Wall time of the last INSERT of each table's batching sink, the "
            "slowest worker.",
        ),
        Panel(
            "Sink rows waiting by table",
            "timeseries",
            _health("sink_pending_rows", "sink", "avg", "sum"),
            ("time", "sink", "value"),
            w=12,
            h=8,
            x=12,
            y=8,
            unit="short",
            decimals=0,
            description="Rows buffered in the sinks and not yet written, by table.",
        ),
        Panel(
            "Dead letters by reason",
            "barchart",
            _sql(
                """
                SELECT reason, count() AS dead_letters
                FROM (
                    SELECT
                        substringUTF8(
                            replaceRegexpAll(splitByString('; ', reason)[1], '[0-9]+', 'N'),
                            1, 80) AS reason
                    FROM csi.dead_letters FINAL
                    WHERE $__timeFilter(received_at)
                )
                GROUP BY reason
                ORDER BY dead_letters DESC, reason
                LIMIT 20
                """
            ),
            ("reason", "dead_letters"),
            w=12,
            h=9,
            x=0,
            y=16,
            unit="short",
            decimals=0,
            description="Rejected messages by the first problem found (numbers masked as N), "
            "the 20 most frequent.",
        ),
        Panel(
            "Latest dead letters",
            "table",
            _sql(
                """
                SELECT
                    received_at AS time,
                    source_topic AS topic,
                    key,
                    reason,
                    raw_preview
                FROM csi.dead_letters FINAL
                WHERE $__timeFilter(received_at)
                ORDER BY time DESC
                LIMIT 100
                """
            ),
            ("time", "topic", "key", "reason", "raw_preview"),
            w=12,
            h=9,
            x=12,
            y=16,
            description="The 100 newest rejected messages with their reasons; raw_b64 in "
            "csi.dead_letters keeps their exact bytes.",
        ),
    ),
)

DASHBOARDS: tuple[Dashboard, ...] = (
    NETWORK_OVERVIEW,
    DEALER_DRILLDOWN,
    COMPLAINTS_CASES,
    MYSTERY_SHOP,
    ALERTS,
    PIPELINE_HEALTH,
)
