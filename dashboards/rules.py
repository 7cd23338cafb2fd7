"""Grafana-managed alert rules on `csi.alerts` and `csi.cases`, as data.

The pipeline already decides what is an alert (`pipeline.alerts`); these rules
only make Grafana notice that such records are open, so its contact points and
notification policies can page someone. Each rule is one ClickHouse count
(refId A, through the provisioned `csi-clickhouse` datasource), reduced to a
number (B) and compared with zero (C):

- ``csi-open-drop-alerts``: open drop alerts (a dealer's or region's CSI, NPS
  or satisfaction rate has really fallen);
- ``csi-hot-cases-overdue``: hot-alert cases still open after their contact
  due time (the customer is waiting for a call);
- ``csi-complaint-sla-breaches``: open complaint SLA alerts;
- ``csi-failed-mystery-shops``: open failed mystery-shop audits.

Two ways to install them, same objects: `alert_rules()` gives the alerting
provisioning API's rule objects (`dashboards.push` uploads them), and
`provisioning_yaml()` renders Grafana's file-provisioning format, committed as
deploy/grafana/provisioning/alerting/csi-alerts.yaml. Regenerate it with
``python -m dashboards.rules``; ``python -m dashboards.rules --check`` exits 1
when the committed file is out of date.

The rules contain no ``$``: Grafana expands ``$NAME`` as environment variables
in provisioning files, so templates use ``.Values`` rather than ``$values``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dashboards.model import DATASOURCE, DATASOURCE_UID

RULE_GROUP = "csi"
RULE_FOLDER = "CSI alert rules"
"""Title of the Grafana folder that holds the rules. Not "CSI alerts": its uid
would be csi-alerts, the Alerts dashboard's uid, and Grafana keeps folders and
dashboards in one table, so the two uids must differ."""
RULE_INTERVAL = "1m"
"""How often the group is evaluated (file provisioning; the API keeps Grafana's default)."""
ORG_ID = 1
PENDING_FOR = "5m"
"""How long a condition must hold before the rule fires."""
QUERY_WINDOW_SECONDS = 600
"""The query's relative time range; the counts ignore it (they read current state)."""
EXPRESSION_DATASOURCE = {"type": "__expr__", "uid": "__expr__"}

REPO_ROOT = Path(__file__).resolve().parent.parent
PROVISIONING_PATH = REPO_ROOT / "deploy/grafana/provisioning/alerting/csi-alerts.yaml"

_UID_MAX = 40  # Grafana's limit for folder, dashboard and rule uids


def folder_uid(title: str) -> str:
    """The stable Grafana uid of a folder, from its title: ``csi-`` + slug.

    "CSI alerts" → ``csi-alerts``; "Dealer network" → ``csi-dealer-network``.
    At most 40 characters of ``[a-z0-9-]``, as Grafana requires.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    if not slug:
        raise ValueError(f"folder title {title!r} has no letters or digits to make a uid from")
    uid = slug if slug == "csi" or slug.startswith("csi-") else f"csi-{slug}"
    return uid[:_UID_MAX].rstrip("-")


RULE_FOLDER_UID = folder_uid(RULE_FOLDER)


@dataclass(frozen=True)
class RuleSpec:
    """One rule: a count over `csi.alerts` or `csi.cases` that should be zero."""

    uid: str
    title: str
    kind: str
    """The alert kind (or ``hot`` for cases), also a label for routing."""
    sql: str
    severity: str
    summary: str
    description: str


def _open_alerts_sql(kind: str) -> str:
    return (
        "SELECT count() AS open_alerts FROM csi.alerts FINAL "
        f"WHERE kind = '{kind}' AND status = 'open'"
    )


RULE_SPECS: tuple[RuleSpec, ...] = (
    RuleSpec(
        uid="csi-open-drop-alerts",
        title="CSI drop alerts open",
        kind="drop",
        sql=_open_alerts_sql("drop"),
        severity="warning",
        summary="{{ .Values.B }} CSI drop alert(s) open",
        description=(
            "A dealer's or region's CSI, NPS or satisfaction rate has fallen below its own "
            "baseline (CUSUM, csi.alerts kind 'drop'); each alert's message names the unit and "
            "metric. An alert closes itself when its metric recovers."
        ),
    ),
    RuleSpec(
        uid="csi-hot-cases-overdue",
        title="Hot cases overdue for contact",
        kind="hot",
        sql=(
            "SELECT count() AS overdue_cases FROM csi.cases FINAL "
            "WHERE status = 'open' AND contact_due_at < now()"
        ),
        severity="critical",
        summary="{{ .Values.B }} hot case(s) past their contact due time",
        description=(
            "Customers with a very bad survey or call have not been contacted in time "
            "(csi.cases still 'open' after contact_due_at). Call them and record the contact "
            "as a case action."
        ),
    ),
    RuleSpec(
        uid="csi-complaint-sla-breaches",
        title="Complaint SLA breaches open",
        kind="complaint_sla",
        sql=_open_alerts_sql("complaint_sla"),
        severity="critical",
        summary="{{ .Values.B }} complaint(s) past their SLA",
        description=(
            "A complaint's first response or resolution is past due (csi.alerts kind "
            "'complaint_sla'). Answer or resolve the complaint; the alert closes with it."
        ),
    ),
    RuleSpec(
        uid="csi-failed-mystery-shops",
        title="Failed mystery shops open",
        kind="mystery_shop",
        sql=_open_alerts_sql("mystery_shop"),
        severity="warning",
        summary="{{ .Values.B }} failed mystery shop(s) open",
        description=(
            "A mystery-shop audit scored below the pass mark or failed a mandatory item "
            "(csi.alerts kind 'mystery_shop'). Review the audit with the dealer."
        ),
    ),
)


def _query(spec: RuleSpec) -> dict[str, Any]:
    return {
        "refId": "A",
        "queryType": "table",
        "relativeTimeRange": {"from": QUERY_WINDOW_SECONDS, "to": 0},
        "datasourceUid": DATASOURCE_UID,
        "model": {
            "refId": "A",
            "datasource": dict(DATASOURCE),
            "editorType": "sql",
            "queryType": "table",
            "format": 1,  # table
            "rawSql": spec.sql,
            "intervalMs": 1000,
            "maxDataPoints": 43200,
        },
    }


def _expression(ref_id: str, model: dict[str, Any]) -> dict[str, Any]:
    return {
        "refId": ref_id,
        "relativeTimeRange": {"from": 0, "to": 0},
        "datasourceUid": "__expr__",
        "model": {"refId": ref_id, "datasource": dict(EXPRESSION_DATASOURCE), **model},
    }


def _rule(spec: RuleSpec) -> dict[str, Any]:
    return {
        "uid": spec.uid,
        "orgID": ORG_ID,
        "folderUID": RULE_FOLDER_UID,
        "ruleGroup": RULE_GROUP,
        "title": spec.title,
        "condition": "C",
        "data": [
            _query(spec),
            _expression("B", {"type": "reduce", "expression": "A", "reducer": "last"}),
            _expression(
                "C",
                {
                    "type": "threshold",
                    "expression": "B",
                    "conditions": [{"evaluator": {"type": "gt", "params": [0]}}],
                },
            ),
        ],
        "noDataState": "OK",
        "execErrState": "Error",
        "for": PENDING_FOR,
        "isPaused": False,
        "labels": {"severity": spec.severity, "kind": spec.kind, "team": "csi"},
        "annotations": {"summary": spec.summary, "description": spec.description},
    }


def alert_rules() -> list[dict[str, Any]]:
    """The rules as the alerting provisioning API's objects
    (``POST/PUT /api/v1/provisioning/alert-rules``), fresh on every call."""
    return [_rule(spec) for spec in RULE_SPECS]


# Group-level fields of the API object that file provisioning keeps on the group.
_GROUP_FIELDS = ("orgID", "folderUID", "ruleGroup")

HEADER = (
    "# Generated by `python -m dashboards.rules` from dashboards/rules.py: do not edit by hand.\n"
    "# Grafana-managed alert rules on csi.alerts and csi.cases (datasource uid csi-clickhouse).\n"
    "# `python -m dashboards.rules --check` fails when this file is out of date.\n"
)


def provisioning_document(rules: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The file-provisioning document (apiVersion 1) for ``rules`` (default: ours)."""
    chosen = alert_rules() if rules is None else list(rules)
    return {
        "apiVersion": 1,
        "groups": [
            {
                "orgId": ORG_ID,
                "name": RULE_GROUP,
                "folder": RULE_FOLDER,
                "interval": RULE_INTERVAL,
                "rules": [
                    {key: value for key, value in rule.items() if key not in _GROUP_FIELDS}
                    for rule in chosen
                ],
            }
        ],
    }


def provisioning_yaml() -> str:
    """The rules in Grafana's alerting file-provisioning format, with a header comment."""
    body = yaml.safe_dump(
        provisioning_document(),
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=False,
        width=100,
    )
    return HEADER + body


def write_provisioning(path: Path = PROVISIONING_PATH) -> Path:
    """Write `provisioning_yaml()` to ``path`` (parents created); return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(provisioning_yaml(), encoding="utf-8")
    return path


def provisioning_up_to_date(path: Path = PROVISIONING_PATH) -> bool:
    """Whether ``path`` holds exactly what `provisioning_yaml()` generates."""
    try:
        return path.read_text(encoding="utf-8") == provisioning_yaml()
    except FileNotFoundError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dashboards.rules",
        description="Write (or check) the Grafana alert-rule provisioning file.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 when the file differs from what would be generated",
    )
    parser.add_argument("--path", type=Path, default=PROVISIONING_PATH, help="the YAML file")
    args = parser.parse_args(argv)
    path: Path = args.path
    if args.check:
        if provisioning_up_to_date(path):
            print(f"{path} is up to date")
            return 0
        print(
            f"{path} is out of date: run `python -m dashboards.rules` and commit it",
            file=sys.stderr,
        )
        return 1
    print(f"wrote {write_provisioning(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
