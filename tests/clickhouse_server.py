"""A throwaway ClickHouse server for tests: Debian's `clickhouse-server` on a free loopback port.

Use the session fixture ``clickhouse_server`` (yields ``ClickHouseEndpoint(host, port)``,
which unpacks as ``host, port``) by importing it into a test module or listing this module
in ``pytest_plugins``; or use :func:`running_clickhouse_server` directly. The server keeps
everything (data, logs, generated config) in a temporary directory and is killed at the end.

When the binary is missing the tests are skipped, except under CI (env ``CI`` set to a
true value), where a missing server must fail the run instead of silently testing less.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest

LOOPBACK = "127.0.0.1"
SERVER_BINARY_NAME = "clickhouse-server"
# Debian installs the server in /usr/sbin, which is not on every user's PATH.
SERVER_BINARY_DIRS = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin")
STARTUP_TIMEOUT_S = 60.0
SHUTDOWN_TIMEOUT_S = 15.0
START_ATTEMPTS = 3


class ClickHouseEndpoint(NamedTuple):
    host: str
    port: int

    def url(self, database: str = "default") -> str:
        return f"clickhouse://{self.host}:{self.port}/{database}"


def find_clickhouse_server(env: Mapping[str, str] | None = None) -> str | None:
    """Path of the server binary: $CLICKHOUSE_SERVER_BIN, then PATH, then Debian's dirs."""
    environment = os.environ if env is None else env
    override = environment.get("CLICKHOUSE_SERVER_BIN")
    if override:
        return override if os.access(override, os.X_OK) else None
    search_path = os.pathsep.join([environment.get("PATH", ""), *SERVER_BINARY_DIRS])
    return shutil.which(SERVER_BINARY_NAME, path=search_path)


def running_under_ci(env: Mapping[str, str] | None = None) -> bool:
    environment = os.environ if env is None else env
    return environment.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_clickhouse_server(env: Mapping[str, str] | None = None) -> str:
    """The server binary; skip the test if it is absent, or fail it under CI."""
    binary = find_clickhouse_server(env)
    if binary is not None:
        return binary
    message = (
        "clickhouse-server binary not found (install Debian's clickhouse-server package or "
        "set CLICKHOUSE_SERVER_BIN)"
    )
    if running_under_ci(env):
        pytest.fail(f"{message}; CI is set, so a missing server is an error", pytrace=False)
    pytest.skip(message)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


def _config_xml(root: Path, port: int, extra: str = "") -> str:
    """The server's config.xml; `extra`: more elements (e.g. a TLS port and its certificates)."""
    # Only the native TCP port is opened (no HTTP, no interserver port), on loopback only.
    return f"""<?xml version="1.0"?>
<yandex>
    <logger>
        <level>information</level>
        <log>{root}/log/clickhouse-server.log</log>
        <errorlog>{root}/log/clickhouse-server.err.log</errorlog>
        <console>0</console>
    </logger>
    <listen_host>{LOOPBACK}</listen_host>
    <tcp_port>{port}</tcp_port>{extra}
    <path>{root}/data/</path>
    <tmp_path>{root}/tmp/</tmp_path>
    <user_files_path>{root}/user_files/</user_files_path>
    <format_schema_path>{root}/format_schemas/</format_schema_path>
    <users_config>{root}/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mark_cache_size>67108864</mark_cache_size>
    <uncompressed_cache_size>67108864</uncompressed_cache_size>
    <max_concurrent_queries>32</max_concurrent_queries>
</yandex>
"""


_USERS_XML = """<?xml version="1.0"?>
<yandex>
    <profiles>
        <default>
            <max_memory_usage>2000000000</max_memory_usage>
        </default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks>
                <ip>127.0.0.1</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
"""


def _log_tail(root: Path, lines: int = 30) -> str:
    tails = []
    for log in (root / "stdout.log", root / "log" / "clickhouse-server.err.log"):
        if log.exists():
            text = log.read_text(errors="replace").splitlines()[-lines:]
            tails.append(f"--- {log.name}\n" + "\n".join(text))
    return "\n".join(tails)


def _answers(endpoint: ClickHouseEndpoint) -> bool:
    from clickhouse_driver import Client
    from clickhouse_driver import errors as driver_errors

    client = Client(host=endpoint.host, port=endpoint.port, connect_timeout=1)
    try:
        return bool(client.execute("SELECT 1") == [(1,)])
    except (driver_errors.Error, OSError, EOFError):
        return False
    finally:
        client.disconnect()


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=SHUTDOWN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=SHUTDOWN_TIMEOUT_S)


def _start_once(
    binary: str, root: Path
) -> tuple[subprocess.Popen[bytes], ClickHouseEndpoint] | None:
    """Start the server and wait until it answers; None if its port was taken meanwhile."""
    endpoint = ClickHouseEndpoint(LOOPBACK, free_loopback_port())
    for subdir in ("data", "tmp", "user_files", "format_schemas", "log"):
        (root / subdir).mkdir(parents=True, exist_ok=True)
    config = root / "config.xml"
    config.write_text(_config_xml(root, endpoint.port))
    (root / "users.xml").write_text(_USERS_XML)
    with (root / "stdout.log").open("wb") as stdout:
        process = subprocess.Popen(
            [binary, f"--config-file={config}"],
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                if "Address already in use" in _log_tail(root):
                    return None
                raise RuntimeError(
                    f"clickhouse-server exited with code {process.returncode} while starting\n"
                    + _log_tail(root)
                )
            if _answers(endpoint):
                return process, endpoint
            time.sleep(0.1)
        raise RuntimeError(
            f"clickhouse-server did not answer on {endpoint.host}:{endpoint.port} within "
            f"{STARTUP_TIMEOUT_S:.0f} s\n" + _log_tail(root)
        )
    except BaseException:
        _stop(process)
        raise


@contextmanager
def running_clickhouse_server(
    binary: str, directory: Path | None = None
) -> Iterator[ClickHouseEndpoint]:
    """Run ``binary`` on a free loopback port with its files under ``directory``.

    Without ``directory`` a temporary one is used and removed afterwards.
    """
    with tempfile.TemporaryDirectory(prefix="clickhouse-server-") as scratch:
        base = Path(scratch) if directory is None else directory
        for attempt in range(START_ATTEMPTS):
            # Another process can grab the free port before the server binds it.
            started = _start_once(binary, base / f"attempt-{attempt}")
            if started is not None:
                break
        else:
            raise RuntimeError(f"clickhouse-server found no free port in {START_ATTEMPTS} tries")
        process, endpoint = started
        try:
            yield endpoint
        finally:
            _stop(process)


@pytest.fixture(scope="session")
def clickhouse_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ClickHouseEndpoint]:
    """A ClickHouse server for the whole test session; yields ``(host, port)``."""
    binary = require_clickhouse_server()
    with running_clickhouse_server(binary, tmp_path_factory.mktemp("clickhouse-server")) as end:
        yield end
