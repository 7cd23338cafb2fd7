"""Fixtures that start real processes: the embedded broker and Debian's
clickhouse-server. Each stops what it started, also when a test fails."""

pytest_plugins = ["tests.broker_fixture", "tests.clickhouse_server"]
