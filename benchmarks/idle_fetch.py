"""CPU an idle consumer burns on each embedded broker (does the broker hold an
empty fetch for fetch.max.wait.ms, or answer at once?).

    .venv/bin/python benchmarks/idle_fetch.py [noida|tansu ...]

Prints one line per broker: CPU seconds used by an idle aiokafka consumer over
5 s, and the ratio to the quietest figure measured in the same run; for noida
also with the client-side hold the embedded worker uses (`hold_empty_fetches`).
"""

from __future__ import annotations

import asyncio
import resource
import sys
import tempfile
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer

from pipeline.broker import (
    BROKER_KINDS,
    BrokerKind,
    EmbeddedBroker,
    create_topics,
    hold_empty_fetches,
)
from pipeline.runner import EMBEDDED_FETCH_HOLD_MS

IDLE_SECONDS = 5.0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def idle_cpu(bootstrap: str) -> float:
    consumer = AIOKafkaConsumer(
        "csi.events.visit", "csi.events.survey", bootstrap_servers=bootstrap,
        group_id="idle-probe", fetch_max_wait_ms=500,
    )  # fmt: skip
    await consumer.start()
    try:
        await consumer.getmany(timeout_ms=1000)  # joined and fetching
        start, deadline = cpu_seconds(), time.monotonic() + IDLE_SECONDS
        while time.monotonic() < deadline:
            await consumer.getmany(timeout_ms=1000)
        return cpu_seconds() - start
    finally:
        await consumer.stop()


def main(kinds: list[BrokerKind]) -> None:
    figures: dict[str, float] = {}
    for kind in kinds:
        with EmbeddedBroker(kind, data_dir=Path(tempfile.mkdtemp(prefix=f"idle-{kind}-"))) as b:
            create_topics(b.bootstrap)
            figures[kind] = asyncio.run(idle_cpu(b.bootstrap))
            if kind == "noida":
                hold_empty_fetches(EMBEDDED_FETCH_HOLD_MS / 1000)
                figures[f"{kind}+hold {EMBEDDED_FETCH_HOLD_MS} ms"] = asyncio.run(
                    idle_cpu(b.bootstrap)
                )
                hold_empty_fetches(0)
    quietest = max(min(figures.values()), 1e-3)
    for name, cpu in figures.items():
        print(f"{name}: {cpu:.2f} CPU s over {IDLE_SECONDS:.0f} s idle ({cpu / quietest:.0f}x)")


if __name__ == "__main__":
    main([k for k in BROKER_KINDS if k in (sys.argv[1:] or BROKER_KINDS)])
