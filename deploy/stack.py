"""What the docker compose stack (deploy/compose.yaml) runs inside the worker image
besides `csi` itself; the Dockerfile copies this file to /opt/csi/stack.py.

    python /opt/csi/stack.py topics        create the pipeline's topics on $CSI_BOOTSTRAP
                                           with the partition counts of pipeline/topics.py
    python /opt/csi/stack.py healthcheck   exit 0 if this container's worker wrote its
                                           heartbeat to the warehouse ($CSI_WAREHOUSE) lately

`topics` is `pipeline.broker.create_topics` with retries: a broker that has just turned
healthy may still refuse admin requests for a moment. A topic that exists with another
partition count is never retried (or altered): that needs a person.

`healthcheck`: the worker has no HTTP endpoint (Faust's web server is off), but every
10 s it writes its own measurements to csi.pipeline_health under the name
``<hostname>:<pid>``, idle or not. A row from this container's hostname within
``--max-age`` seconds means its worker is alive, consuming and able to write.

tests/test_deploy.py loads this file by path; it is not part of the `csi` package.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from collections.abc import Callable, Sequence

from pipeline.broker import BrokerError, TopicMismatchError, create_topics
from pipeline.config import Settings
from pipeline.warehouse import PIPELINE_HEALTH_TABLE, Warehouse, WarehouseError, open_warehouse

HEARTBEAT_METRIC = "sink_rows_written"
"""A csi.pipeline_health metric each worker writes on every tick (one row per sink)."""

TOPIC_ATTEMPTS = 12
TOPIC_RETRY_PAUSE_S = 5.0


def ensure_topics(
    bootstrap: str,
    *,
    attempts: int = TOPIC_ATTEMPTS,
    pause_s: float = TOPIC_RETRY_PAUSE_S,
    create: Callable[[str], None] = create_topics,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Create the topics, retrying a broker that is not ready yet; return the attempts used.

    TopicMismatchError (a topic with the wrong partition count) is raised at once; any
    other BrokerError after ``attempts`` tries.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    for attempt in range(1, attempts + 1):
        try:
            create(bootstrap)
            return attempt
        except TopicMismatchError:
            raise
        except BrokerError as exc:
            if attempt == attempts:
                raise
            print(
                f"topics: attempt {attempt}/{attempts} on {bootstrap} failed: {exc}; "
                f"retrying in {pause_s:g} s",
                file=sys.stderr,
            )
            sleep(pause_s)
    raise AssertionError("unreachable")


def sql_string(value: str) -> str:
    """``value`` as a ClickHouse string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def heartbeat_query(hostname: str, max_age_s: int) -> str:
    """Count this host's heartbeat rows of the last ``max_age_s`` seconds.

    The filter on metric and measured_at follows the table's sorting key, so the query
    reads a few granules however long the table has grown.
    """
    return (
        f"SELECT count() AS n FROM {PIPELINE_HEALTH_TABLE} "
        f"WHERE metric = {sql_string(HEARTBEAT_METRIC)} "
        f"AND measured_at >= now64(3) - INTERVAL {int(max_age_s)} SECOND "
        f"AND startsWith(worker, {sql_string(hostname + ':')})"
    )


def worker_is_alive(warehouse: Warehouse, hostname: str, max_age_s: int) -> bool:
    """Whether a worker on ``hostname`` wrote a heartbeat within ``max_age_s`` seconds."""
    _, rows = warehouse.query(heartbeat_query(hostname, max_age_s))
    return bool(rows) and int(rows[0][0]) > 0


def cmd_topics(args: argparse.Namespace) -> int:
    try:
        settings = Settings()
    except ValueError as exc:  # a wrong CSI_* setting: say which, no traceback
        print(f"topics: {exc}", file=sys.stderr)
        return 1
    if settings.kafka.protocol != "PLAINTEXT":
        # pipeline.broker.create_topics speaks PLAINTEXT only (docs/security.md): on a
        # secured cluster the topics are created by its operators, so do not block the
        # workers waiting for this job.
        print(
            f"topics: skipped, CSI_KAFKA_SECURITY_PROTOCOL={settings.kafka.protocol}: create "
            "the topics of pipeline/topics.py on the secured cluster yourself",
            file=sys.stderr,
        )
        return 0
    bootstrap = args.bootstrap or settings.bootstrap
    try:
        used = ensure_topics(bootstrap, attempts=args.attempts, pause_s=args.pause)
    except BrokerError as exc:
        print(f"topics: {exc}", file=sys.stderr)
        return 1
    print(f"topics: ready on {bootstrap} (attempt {used})")
    return 0


def cmd_healthcheck(args: argparse.Namespace) -> int:
    hostname = socket.gethostname()
    try:
        warehouse = open_warehouse(args.warehouse or Settings().warehouse)
        try:
            alive = worker_is_alive(warehouse, hostname, args.max_age)
        finally:
            warehouse.close()
    except (WarehouseError, ValueError) as exc:
        print(f"unhealthy: {exc}")
        return 1
    if not alive:
        print(f"unhealthy: no heartbeat from {hostname} in the last {args.max_age} s")
        return 1
    print(f"healthy: {hostname} wrote a heartbeat in the last {args.max_age} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stack.py", description="Helpers of the docker compose stack (deploy/compose.yaml)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    topics = sub.add_parser("topics", help="create the pipeline's topics (retrying)")
    topics.add_argument("--bootstrap", help="Kafka bootstrap servers (default $CSI_BOOTSTRAP)")
    topics.add_argument("--attempts", type=int, default=TOPIC_ATTEMPTS)
    topics.add_argument("--pause", type=float, default=TOPIC_RETRY_PAUSE_S, help="seconds")
    topics.set_defaults(func=cmd_topics)
    health = sub.add_parser("healthcheck", help="did this container's worker write lately?")
    health.add_argument("--warehouse", help="warehouse URL (default $CSI_WAREHOUSE)")
    health.add_argument("--max-age", type=int, default=60, help="seconds (default 60)")
    health.set_defaults(func=cmd_healthcheck)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
