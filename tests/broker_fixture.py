"""Reusable pytest fixtures that run an embedded Kafka-protocol broker.

Use from a test module or conftest.py with::

    pytest_plugins = ["tests.broker_fixture"]

or import the fixtures by name. Every broker started here is stopped at teardown, also when
the test fails; each binds to 127.0.0.1 on its own free port with its own data directory, so
tests can run in parallel.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.broker import BrokerKind, EmbeddedBroker, create_topics
from pipeline.topics import ALL_TOPICS

BrokerFactory = Callable[..., EmbeddedBroker]
"""``factory(kind="noida", *, data_dir=None, port=None) -> EmbeddedBroker`` (not started)."""


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[BrokerFactory]:
    """Builds EmbeddedBrokers (not yet started) and stops every one of them at teardown."""
    made: list[EmbeddedBroker] = []

    def factory(
        kind: BrokerKind = "noida", *, data_dir: Path | None = None, port: int | None = None
    ) -> EmbeddedBroker:
        directory = data_dir if data_dir is not None else tmp_path / f"{kind}-{len(made)}"
        instance = EmbeddedBroker(kind, data_dir=directory, port=port)
        made.append(instance)
        return instance

    try:
        yield factory
    finally:
        for instance in made:
            instance.stop()


@pytest.fixture
def broker(broker_factory: BrokerFactory) -> Iterator[EmbeddedBroker]:
    """A started noida-db broker with every topic of ALL_TOPICS created; stopped afterwards."""
    instance = broker_factory("noida")
    instance.start()
    try:
        create_topics(instance.bootstrap, ALL_TOPICS)
        yield instance
    finally:
        instance.stop()
