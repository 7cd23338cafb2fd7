"""Minimal Faust worker for benchmarks/broker_check.py: a table counting messages per key.

Run as a process of its own (the check starts, SIGTERMs and restarts it)::

    python benchmarks/faust_counter.py BOOTSTRAP APP_ID STATE_DIR TOTALS_JSON

It consumes ``<APP_ID>-input`` and keeps ``counts[key] += 1`` in a table whose changelog is
``<APP_ID>-counts-changelog``; both topics must already exist with COUNTER_PARTITIONS
partitions (the check creates them with pipeline.broker.create_topics, Faust declares
nothing). Twice a second it writes the table's contents to TOTALS_JSON, which is how the
check reads the totals. The store is in memory, so after a restart the table can only come
back by replaying the changelog from the broker.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

COUNTER_PARTITIONS = 4


def input_topic(app_id: str) -> str:
    return f"{app_id}-input"


def changelog_topic(app_id: str) -> str:
    # Faust's naming rule for a table's changelog: "<app id>-<table name>-changelog".
    return f"{app_id}-counts-changelog"


def build_app(bootstrap: str, app_id: str, state_dir: Path, totals_path: Path) -> Any:
    import faust

    app = faust.App(
        app_id,
        broker=f"kafka://{bootstrap}",
        store="memory://",
        datadir=str(state_dir),
        web_enabled=False,
        topic_partitions=COUNTER_PARTITIONS,
        # Topics are created up front with explicit partition counts; Faust must not
        # declare (create) any, and the leader-election topic is not needed at all.
        topic_allow_declare=False,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=10.0,
    )
    source = app.topic(
        input_topic(app_id),
        key_type=bytes,
        value_type=bytes,
        key_serializer="raw",
        value_serializer="raw",
        partitions=COUNTER_PARTITIONS,
    )
    counts = app.Table("counts", default=int, partitions=COUNTER_PARTITIONS)

    async def count(stream: Any) -> None:
        async for event in stream.events():
            key = event.key.decode() if isinstance(event.key, bytes) else str(event.key)
            counts[key] += 1

    async def dump_totals() -> None:
        snapshot = {str(k): int(v) for k, v in counts.items()}
        tmp = totals_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(snapshot, sort_keys=True))
        os.replace(tmp, totals_path)  # atomic: the reader never sees half a file

    # Registered by call rather than as decorators: faust is untyped, and a decorator would
    # erase these functions' types under mypy --strict.
    app.agent(source)(count)
    app.timer(0.5)(dump_totals)
    return app


def main(argv: list[str]) -> None:
    if len(argv) != 4:
        raise SystemExit(f"usage: {Path(__file__).name} BOOTSTRAP APP_ID STATE_DIR TOTALS_JSON")
    bootstrap, app_id, state_dir, totals = argv
    import faust

    app = build_app(bootstrap, app_id, Path(state_dir), Path(totals))
    # Worker installs SIGTERM/SIGINT handlers that stop the app cleanly (offsets committed,
    # changelog producer flushed), which is the restart the check exercises.
    faust.Worker(app, loglevel="warning").execute_from_commandline()


if __name__ == "__main__":
    main(sys.argv[1:])
