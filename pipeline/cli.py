"""`csi` — the command line. Thin: every subcommand calls into the package."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from pipeline.config import Settings


def _add_simulation_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dealers", type=int, default=50, help="number of dealers (default 50)")
    parser.add_argument("--days", type=int, default=60, help="days of history ending today")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--drop",
        action="append",
        default=[],
        metavar="DEALER:DATE:SIZE",
        help="lower one dealer's scores by SIZE CSI points from DATE on (repeatable)",
    )


def _warehouse_url(args: argparse.Namespace) -> str:
    return args.warehouse or f"chdb://{Path(args.data_dir) / 'warehouse'}"


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.broker import broker_kind_from_env
    from pipeline.runner import run_embedded
    from pipeline.simulator import parse_drop

    return run_embedded(
        data_dir=Path(args.data_dir),
        broker_kind=args.broker_kind or broker_kind_from_env(),
        dealers=args.dealers,
        days=args.days,
        rate=args.rate or None,
        seed=args.seed,
        drops=[parse_drop(text) for text in args.drop],
        duration_s=args.duration,
    )


def cmd_worker(args: argparse.Namespace) -> int:
    from pipeline.worker import run_worker

    settings = Settings()
    overrides: dict[str, Any] = {}
    if args.bootstrap:
        overrides["bootstrap"] = args.bootstrap
    if args.warehouse:
        overrides["warehouse"] = args.warehouse
    run_worker(replace(settings, **overrides))
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from pipeline.simulator import parse_drop, simulate, write_jsonl

    events = simulate(
        args.dealers, args.days, seed=args.seed, drops=[parse_drop(t) for t in args.drop]
    )
    if args.registry_out:
        from pipeline.registry import write_registry
        from pipeline.simulator import simulated_registry

        write_registry(simulated_registry(args.dealers, seed=args.seed), args.registry_out)
    if args.bootstrap:
        from pipeline.producer import EventProducer, produce_events

        with EventProducer(args.bootstrap) as producer:
            sent = produce_events(producer, events, rate=args.rate or None)
        print(f"produced {sent} events to {args.bootstrap}", file=sys.stderr)
    elif args.out in (None, "-"):
        write_jsonl(events, sys.stdout)
    else:
        count = write_jsonl(events, args.out)
        print(f"wrote {count} events to {args.out}", file=sys.stderr)
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from datetime import date

    from pipeline.batch import metrics_report, run_batch
    from pipeline.catalogue import load_catalogue
    from pipeline.metrics import WINDOWS
    from pipeline.registry import load_registry

    if args.window not in WINDOWS:
        raise ValueError(f"--window must be one of {', '.join(WINDOWS)} (got {args.window!r})")
    catalogue = load_catalogue()
    registry = load_registry(args.registry) if args.registry else None
    if args.engine == "sql":
        from pipeline.batch_sql import SqlChecksOutdated, run_sql_batch
        from pipeline.metrics import window_start

        # the same buckets and figures; only the days of the window become Python objects
        as_of = date.fromisoformat(args.as_of)
        try:
            state = run_sql_batch(
                args.events, catalogue, registry=registry, lateness_days=args.lateness_days,
                since=window_start(args.window, as_of), departments=(args.department,),
            )  # fmt: skip
        except (ImportError, SqlChecksOutdated) as exc:  # no chdb; a schema rule it lacks
            print(f"csi metrics: {exc}; --engine python gives the same figures", file=sys.stderr)
            return 2
    else:
        with open(args.events, "rb") as events:
            state = run_batch(
                events, catalogue, registry=registry, lateness_days=args.lateness_days
            )
    for dead in state.dead_letters:  # the offset of a batch record is its line number
        print(f"{args.events}:{dead.offset}: {dead.reason}", file=sys.stderr)
    report = metrics_report(
        state, catalogue, scope=args.by, window=args.window,
        as_of=date.fromisoformat(args.as_of), department=args.department,
    )  # fmt: skip
    sys.stdout.buffer.write(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    sys.stdout.buffer.write(b"\n")
    if state.dead_letters:
        print(
            f"csi metrics: {len(state.dead_letters)} invalid line(s) skipped, "
            f"{state.events} event(s) used",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    """Fill the warehouse from a file with the worker's own processors (no Kafka)."""
    from pipeline.alerts import load_alert_settings
    from pipeline.batch import load_warehouse
    from pipeline.catalogue import load_catalogue
    from pipeline.registry import load_registry
    from pipeline.warehouse import create_schema, open_warehouse

    registry = load_registry(args.registry) if args.registry else None
    warehouse = open_warehouse(_warehouse_url(args))
    try:
        create_schema(warehouse)
        with open(args.events, "rb") as events:
            state = load_warehouse(
                events, warehouse, load_catalogue(), registry=registry,
                lateness_days=args.lateness_days,
                alert_settings=load_alert_settings(Settings().alerts_file),
            )  # fmt: skip
    finally:
        warehouse.close()
    for dead in state.dead_letters:
        print(f"{args.events}:{dead.offset}: {dead.reason}", file=sys.stderr)
    print(
        f"csi load: {state.events} event(s), {len(state.dead_letters)} dead letter(s), "
        f"{len(state.alerts)} alert record(s), {len(state.cases)} case change(s)",
        file=sys.stderr,
    )
    return 0


def cmd_alerts_list(args: argparse.Namespace) -> int:
    """Open alerts and open cases, from the warehouse (latest row of each via FINAL)."""
    from pipeline.warehouse import ALERTS_TABLE, CASES_TABLE, open_warehouse

    queries = {
        "alerts": (
            "SELECT detected_at, kind, scope, key, department, metric, baseline, current, n, "
            f"case_id, alert_id, message FROM {ALERTS_TABLE} FINAL WHERE status = 'open' "
            "ORDER BY detected_at, alert_id"
        ),
        "cases": (
            "SELECT case_id, status, opened_at, contact_due_at, escalation_level, dealer_id, "
            "department, arrayStringConcat(reasons, '; ') AS reasons, recovery, "
            f"now64(3) > contact_due_at AND status = 'open' AS overdue FROM {CASES_TABLE} FINAL "
            "WHERE status != 'closed' ORDER BY opened_at, case_id"
        ),
    }
    warehouse = open_warehouse(_warehouse_url(args))
    try:
        results = {name: warehouse.query(sql) for name, sql in queries.items()}
    finally:
        warehouse.close()
    for name, (columns, rows) in results.items():
        if args.format == "json":
            for row in rows:
                record = {"record": name[:-1], **dict(zip(columns, row, strict=True))}
                sys.stdout.buffer.write(orjson.dumps(record, default=str) + b"\n")
        else:
            print(f"open {name}: {len(rows)}")
            if rows:
                print(format_table(columns, rows))
    return 0


def cmd_alerts_replay(args: argparse.Namespace) -> int:
    """Every alert the stream's detectors raise over a file, in event-time order."""
    from pipeline.alerts import load_alert_settings
    from pipeline.batch import replay_alerts
    from pipeline.catalogue import load_catalogue
    from pipeline.registry import load_registry

    catalogue = load_catalogue()
    registry = load_registry(args.registry) if args.registry else None
    alert_settings = load_alert_settings(Path(args.config) if args.config else None)
    with open(args.events, "rb") as events:
        state = replay_alerts(
            events, catalogue, registry=registry, lateness_days=args.lateness_days,
            alert_settings=alert_settings,
        )  # fmt: skip
    for dead in state.dead_letters:
        print(f"{args.events}:{dead.offset}: {dead.reason}", file=sys.stderr)
    records: list[dict[str, Any]] = [a.to_message() for a in state.alerts]
    if args.cases:
        records += [c.to_message() for c in state.cases]
    # in event time; within one moment, in the order they were raised
    order = {id(r): i for i, r in enumerate(records)}
    records.sort(key=lambda r: (r.get("updated_at") or "", order[id(r)]))
    for record in records:
        sys.stdout.buffer.write(orjson.dumps(record) + b"\n")
    opened = sum(1 for a in state.alerts if a.status == "open")
    print(
        f"csi alerts replay: {state.events} event(s), {opened} alert(s) opened, "
        f"{len(state.alerts) - opened} closed, {len({c.case_id for c in state.cases})} case(s)"
        + (f", {len(state.dead_letters)} invalid line(s) skipped" if state.dead_letters else ""),
        file=sys.stderr,
    )
    return 1 if state.dead_letters else 0


def cmd_case(args: argparse.Namespace) -> int:
    """Move a case: validate the action here, then put it on the case-actions topic."""
    import uuid
    from datetime import UTC, datetime

    from pipeline.producer import EventProducer
    from pipeline.topics import CASE_ACTIONS
    from schemas import InvalidEvent
    from schemas.cases import case_action_json, case_dealer, parse_case_action

    raw = orjson.dumps(
        {
            "action_id": str(uuid.uuid4()),
            "case_id": args.case_id,
            "dealer_id": case_dealer(args.case_id),
            "action": args.action,
            "occurred_at": args.at or datetime.now(UTC).isoformat(),
            "by": args.by,
            "reason": args.reason,
            "comment": args.comment,
        }
    )
    try:
        action = parse_case_action(raw)
    except InvalidEvent as exc:
        raise ValueError(f"case {args.case_id}: {exc.reason}") from None
    bootstrap = args.bootstrap or Settings().bootstrap
    with EventProducer(bootstrap) as producer:
        producer.send_raw(
            CASE_ACTIONS.name, case_action_json(action), action.dealer_id.encode("utf-8")
        )
        producer.flush(timeout=30)
    print(f"{action.action} {action.case_id}: sent (action {action.action_id})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """The dashboards' panels rendered to PNG and HTML, from the warehouse."""
    from datetime import UTC, datetime, timedelta

    from dashboards.definitions import DASHBOARDS
    from dashboards.macros import TimeRange
    from dashboards.report import default_time_range, render_report
    from pipeline.warehouse import open_warehouse

    chosen: dict[str, str] = {}
    for item in args.var:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--var {item!r}: expected NAME=VALUE, e.g. --var region=North")
        chosen[name] = value
    selected = [d for d in DASHBOARDS if not args.dashboard or d.uid in args.dashboard]
    if args.dashboard and len(selected) != len(set(args.dashboard)):
        known = ", ".join(d.uid for d in DASHBOARDS)
        raise ValueError(f"--dashboard: unknown uid among {args.dashboard}; known: {known}")
    warehouse = open_warehouse(_warehouse_url(args))
    try:
        if args.to:
            end_day = datetime.fromisoformat(args.to).date() + timedelta(days=1)
            end = datetime.combine(end_day, datetime.min.time(), UTC)
            time_range = TimeRange(end - timedelta(days=args.days), end)
        else:
            time_range = default_time_range(warehouse, args.days)
        written = render_report(
            warehouse, selected, Path(args.out), time_range=time_range, chosen=chosen
        )
    finally:
        warehouse.close()
    pages = [p for p in written if p.suffix == ".html" and p.name != "index.html"]
    charts = [p for p in written if p.suffix == ".png"]
    print(f"csi report: {len(pages)} page(s), {len(charts)} chart(s), index.html in {args.out}")
    return 0


def cmd_dashboards(args: argparse.Namespace) -> int:
    """Generate the dashboards' JSON (build/check) or upload them and the alert rules (push)."""
    import os

    from dashboards.build import build_all, check
    from dashboards.definitions import DASHBOARDS
    from dashboards.rules import alert_rules, provisioning_up_to_date, write_provisioning

    if args.action == "build":
        written = build_all()
        write_provisioning()
        print(f"wrote {len(written)} dashboard(s) and the alert-rule provisioning file")
        return 0
    if args.action == "check":
        stale = check()
        if not provisioning_up_to_date():
            stale.append("deploy/grafana/provisioning/alerting/csi-alerts.yaml")
        for name in stale:
            print(f"out of date: {name} (run `csi dashboards build`)", file=sys.stderr)
        return 1 if stale else 0
    from dashboards.push import PushError, push

    url = args.url or os.environ.get("GRAFANA_URL")
    token = args.token or os.environ.get("GRAFANA_TOKEN")
    if not url or not token:
        raise ValueError(
            "csi dashboards push needs --url and --token (or GRAFANA_URL, GRAFANA_TOKEN)"
        )
    try:
        report = push(url, token, DASHBOARDS, alert_rules(), timeout=args.timeout)
    except PushError as exc:
        print(f"csi dashboards push: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from pipeline.warehouse import open_warehouse

    warehouse = open_warehouse(_warehouse_url(args))
    try:
        columns, rows = warehouse.query(args.sql)
    finally:
        warehouse.close()
    if args.format == "json":
        for row in rows:
            sys.stdout.buffer.write(orjson.dumps(dict(zip(columns, row, strict=True)), default=str))
            sys.stdout.buffer.write(b"\n")
    else:
        print(format_table(columns, rows))
    return 0


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(columns)] + [["NULL" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(lines)


def cmd_broker(args: argparse.Namespace) -> int:
    from pipeline.broker import EmbeddedBroker, broker_kind_from_env, create_topics

    data_dir = Path(args.data_dir)
    args.broker_kind = args.broker_kind or broker_kind_from_env()
    broker = EmbeddedBroker(
        args.broker_kind, data_dir=data_dir / f"broker-{args.broker_kind}", port=args.port
    )
    with broker:  # starts it; stops it on the way out, Ctrl-C included
        create_topics(broker.bootstrap)
        print(f"broker ({args.broker_kind}) on {broker.bootstrap}; Ctrl-C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csi", description="Streaming satisfaction pipeline for car-dealer networks."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the main job on embedded parts (broker, chdb, worker)")
    run.add_argument("--data-dir", default=".csi", help="where state lives (default ./.csi)")
    run.add_argument(
        "--broker-kind", choices=("noida", "tansu"), help="default: $CSI_BROKER_KIND or noida"
    )
    run.add_argument("--rate", type=float, default=2000.0, help="events/s to produce (0: flat out)")
    run.add_argument("--duration", type=float, default=None, help="seconds, then stop")
    _add_simulation_args(run)
    run.set_defaults(func=cmd_run)

    worker = sub.add_parser("worker", help="run the Faust worker (settings from CSI_* env)")
    worker.add_argument("--bootstrap", help="Kafka bootstrap servers (CSI_BOOTSTRAP)")
    worker.add_argument("--warehouse", help="warehouse URL (CSI_WAREHOUSE)")
    worker.set_defaults(func=cmd_worker)

    simulate = sub.add_parser(
        "simulate", help="emit simulated visits, surveys, calls, complaints and audits"
    )
    _add_simulation_args(simulate)
    simulate.add_argument("--out", help="JSON lines file ('-' or absent: stdout)")
    simulate.add_argument("--bootstrap", help="produce to this Kafka instead of writing a file")
    simulate.add_argument("--rate", type=float, default=0.0, help="events/s (0: flat out)")
    simulate.add_argument("--registry-out", help="also write the simulated dealer registry (CSV)")
    simulate.set_defaults(func=cmd_simulate)

    metrics = sub.add_parser(
        "metrics", help="recompute figures from a JSON-lines file of events (batch)"
    )
    metrics.add_argument("events", help="JSON lines, the same JSON that goes to Kafka")
    metrics.add_argument("--as-of", required=True, help="window end date, YYYY-MM-DD")
    metrics.add_argument("--window", default="30d", help="day, 7d, 30d, 90d or month")
    metrics.add_argument("--by", choices=("dealer", "region", "brand", "network"), default="dealer")
    metrics.add_argument("--department", choices=("service", "sales"), default="service")
    metrics.add_argument(
        "--registry", help="dealer registry CSV (dealer_id,name,region,brand,group)"
    )
    metrics.add_argument("--lateness-days", type=int, default=35)
    metrics.add_argument(
        "--engine", choices=("sql", "python"), default="sql",
        help="sql (default): embedded ClickHouse (chdb) reads the file in a few vectorised "
        "passes (10 million events in under a minute on 2 cores) with the stream's "
        "validation, dedup, lateness and joins, and the figures come from the same "
        "functions (pipeline/batch_sql.py); python: the stream's own processors, event by "
        "event, the reference (about 12,000 events/s)",
    )  # fmt: skip
    metrics.set_defaults(func=cmd_metrics)

    query = sub.add_parser("query", help="run SQL against the warehouse and print the result")
    query.add_argument("sql")
    query.add_argument("--data-dir", default=".csi")
    query.add_argument("--warehouse", help="URL; default chdb://DATA_DIR/warehouse")
    query.add_argument(
        "--format", choices=("table", "json"), default="table", help="json: one object a line"
    )
    query.set_defaults(func=cmd_query)

    load = sub.add_parser(
        "load", help="fill the warehouse from a JSON-lines file (the worker's code, no Kafka)"
    )
    load.add_argument("events", help="JSON lines: events (and case actions)")
    load.add_argument("--registry", help="dealer registry CSV")
    load.add_argument("--data-dir", default=".csi")
    load.add_argument("--warehouse", help="URL; default chdb://DATA_DIR/warehouse")
    load.add_argument("--lateness-days", type=int, default=35)
    load.set_defaults(func=cmd_load)

    alerts = sub.add_parser("alerts", help="open alerts and cases; `alerts replay FILE` offline")
    alerts.add_argument("--data-dir", default=".csi")
    alerts.add_argument("--warehouse", help="URL; default chdb://DATA_DIR/warehouse")
    alerts.add_argument("--format", choices=("table", "json"), default="table")
    alerts.set_defaults(func=cmd_alerts_list)
    alerts_sub = alerts.add_subparsers(dest="alerts_command")
    listing = alerts_sub.add_parser("list", help="open alerts and open cases (the default)")
    listing.add_argument("--data-dir", default=".csi")
    listing.add_argument("--warehouse", help="URL; default chdb://DATA_DIR/warehouse")
    listing.add_argument("--format", choices=("table", "json"), default="table")
    listing.set_defaults(func=cmd_alerts_list)
    replay = alerts_sub.add_parser(
        "replay", help="run the detectors over a JSON-lines file in event-time order"
    )
    replay.add_argument("events", help="JSON lines: events (and case actions)")
    replay.add_argument("--registry", help="dealer registry CSV (for region alerts)")
    replay.add_argument("--config", help="alert settings TOML (default: $CSI_ALERTS or built-in)")
    replay.add_argument("--lateness-days", type=int, default=35)
    replay.add_argument("--cases", action="store_true", help="also print case changes")
    replay.set_defaults(func=cmd_alerts_replay)

    case = sub.add_parser("case", help="move a case: contact, resolve, close or reopen")
    case.add_argument("action", choices=("contact", "resolve", "close", "reopen"))
    case.add_argument("case_id", metavar="ID", help="e.g. D017/3fa9c01b2e")
    case.add_argument("--by", required=True, help="who acts (user name)")
    case.add_argument(
        "--reason",
        choices=("resolved", "customer_unreachable", "no_action_needed", "duplicate", "other"),
        help="required to close",
    )
    case.add_argument("--comment", help="required to close")
    case.add_argument("--at", help="when (ISO 8601 with zone; default now)")
    case.add_argument("--bootstrap", help="Kafka bootstrap servers (CSI_BOOTSTRAP)")
    case.set_defaults(func=cmd_case)

    dashboards = sub.add_parser(
        "dashboards", help="build/check the dashboards' JSON, or push them to a Grafana"
    )
    dashboards.add_argument("action", choices=("build", "check", "push"))
    dashboards.add_argument("--url", help="Grafana URL (push; or GRAFANA_URL)")
    dashboards.add_argument("--token", help="service-account token, Admin role (or GRAFANA_TOKEN)")
    dashboards.add_argument("--timeout", type=float, default=10.0)
    dashboards.set_defaults(func=cmd_dashboards)

    report = sub.add_parser(
        "report", help="render the dashboards' panels to PNG and HTML (no Grafana needed)"
    )
    report.add_argument("--out", required=True, help="directory for the HTML pages and PNGs")
    report.add_argument("--data-dir", default=".csi")
    report.add_argument("--warehouse", help="URL; default chdb://DATA_DIR/warehouse")
    report.add_argument("--to", help="last day, YYYY-MM-DD (default: the newest snapshot's)")
    report.add_argument("--days", type=int, default=90, help="days shown (default 90)")
    report.add_argument(
        "--var", action="append", default=[], metavar="NAME=VALUE",
        help="a dashboard variable, e.g. --var region=North --var dealer=D017",
    )  # fmt: skip
    report.add_argument(
        "--dashboard", action="append", default=[], metavar="UID", help="only these (repeatable)"
    )
    report.set_defaults(func=cmd_report)

    from pipeline import dlq, ingest_http

    dlq.register(sub)
    ingest_http.register(sub)  # csi keys add|list|revoke, csi serve-http

    broker = sub.add_parser("broker", help="run only the embedded broker, with the topics")
    broker.add_argument("--data-dir", default=".csi")
    broker.add_argument(
        "--broker-kind", choices=("noida", "tansu"), help="default: $CSI_BROKER_KIND or noida"
    )
    broker.add_argument("--port", type=int, default=None)
    broker.set_defaults(func=cmd_broker)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Ctrl-C and SIGTERM both mean "stop cleanly": the commands unwind through
    # their `with`/`finally` blocks, which stop the worker and the broker. The
    # SIGINT handler is set explicitly because a shell starts background jobs
    # with SIGINT ignored, and Python then never installs its own.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    from pipeline.broker import BrokerError
    from pipeline.producer import ProduceError
    from pipeline.registry import RegistryError
    from pipeline.warehouse import WarehouseError

    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, BrokerError, WarehouseError, ProduceError, RegistryError) as exc:
        # something the user can fix or must know: say what, no traceback
        print(f"csi: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
