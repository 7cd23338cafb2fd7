"""HTTP ingestion for dealers that cannot speak Kafka: ``POST /v1/events`` (issue 7).

A small standalone aiohttp app (``csi serve-http``) in front of the same Kafka
topics :class:`pipeline.producer.EventProducer` writes to.

**Requests.** ``POST /v1/events`` with ``Authorization: Bearer csi_<keyid>_<secret>``
and ``Content-Type: application/json``; the body is a JSON array of events or
``{"events": [...]}``. Whole-request refusals, each answered with
``{"error": {"code": C, "reason": "..."}}``:

* 401: no ``Authorization: Bearer`` header, or an unknown or revoked key;
* 415: not ``application/json`` (or a charset other than UTF-8);
* 413: a body over :data:`MAX_BODY_BYTES` (5 MB) or more than
  :data:`MAX_EVENTS_PER_REQUEST` (1000) events;
* 400: malformed JSON (the parser's message), a body of another shape, no events;
* 503 (with ``Retry-After``): Kafka did not take the batch; nothing is accepted,
  send the whole batch again (``event_id`` is the idempotency key downstream, so
  a record that did reach Kafka before the failure is not counted twice).

Otherwise every event is judged on its own, in order:

* 403 ``dealer_id: key of D001 cannot submit events for D002``: a key submits
  events for its own dealer only (checked first, on the raw object);
* 413: the event, re-serialised compactly, is over ``MAX_EVENT_BYTES``;
* 400: :func:`schemas.events.parse_event` refused it; the reason names the field. The
  body is read by the parser ``parse_event`` uses, so an event's NaN, infinity or
  integer beyond 64 bits gets the reason a Kafka record would get, not a 400 for all.

Valid events are produced to ``topic_for(event_type)``, keyed by ``dealer_id``, as
their canonical JSON (:func:`schemas.events.event_to_json`: what was validated,
personal data in comments already scrubbed), and the answer waits for Kafka's
acknowledgement (``acks=all``). The answer is 202 with ``{"accepted": n,
"rejected": m, "results": [...]}``, one result per submitted event in order:
``{"index": i, "event_id": ..., "status": "accepted"}`` or ``{"index": i,
"status": "rejected", "error": {"code": 400|403|413, "reason": ...}}`` (plus
``event_id`` when the rejected object carried one as a string). When no event is
accepted, the same body comes with status 400, or 403 if every event was another
dealer's. ``GET /healthz`` answers 200 while the process serves (liveness only: it
does not touch Kafka).

**API keys.** ``csi_<keyid>_<secret>``: ``keyid`` is 12 hex digits, the lookup
handle; ``secret`` is 32 random bytes, URL-safe base64. The key file is TOML
(``CSI_API_KEYS`` names it for the server; ``csi keys add|list|revoke`` edit it),
one ``[[keys]]`` table per key::

    [[keys]]
    key_id = "3f9a0c1d2e4b"
    dealer_id = "D001"
    created_at = 2024-06-30T10:00:00Z
    kdf = "scrypt:n=16384,r=8,p=1"
    salt = "<16 random bytes, base64>"
    hash = "<scrypt(whole key, salt), 32 bytes, base64>"
    revoked_at = 2024-07-01T09:00:00Z   # only once revoked; kept for the record

The key itself is printed once by ``csi keys add`` and stored nowhere. Checking a
presented key costs one scrypt (in a thread, ~40 ms) whether or not its key id
exists, and ends in :func:`hmac.compare_digest`; a key that passed is remembered
(by its SHA-256) until the key file changes, so a dealer's next requests skip the
scrypt. The server re-reads the key file when it changes, so ``csi keys revoke``
takes effect at the next request without a restart. The file is rewritten
atomically with mode 0600.

**Logging.** One line per request (logger ``csi.ingest_http``): method, path,
status, time, dealer, key id and event counts; never the key, the body or
rejection reasons.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import sys
import tempfile
import time
import tomllib
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import orjson
import pydantic_core
from aiohttp import hdrs, web
from aiohttp.typedefs import LooseHeaders
from kafka.errors import KafkaError

from pipeline.producer import EventProducer, EventSink, ProduceError
from pipeline.registry import DEALER_ID_PATTERN
from schemas.events import (
    MAX_EVENT_BYTES,
    InvalidEvent,
    encoding_problem,
    event_to_json,
    parse_event,
)

log = logging.getLogger("csi.ingest_http")

API_KEYS_ENV: Final[str] = "CSI_API_KEYS"
"""Environment variable naming the key file (``csi serve-http`` and ``csi keys``)."""

MAX_BODY_BYTES: Final[int] = 5 * 1024 * 1024
MAX_EVENTS_PER_REQUEST: Final[int] = 1000

KEY_PREFIX: Final[str] = "csi"
_KEY_ID_HEX_DIGITS: Final[int] = 12
_SECRET_BYTES: Final[int] = 32
_SALT_BYTES: Final[int] = 16
_HASH_BYTES: Final[int] = 32
_MAX_TOKEN_CHARS: Final[int] = 200
_TOKEN = re.compile(r"csi_([0-9a-f]{12})_([A-Za-z0-9_-]{20,150})")
_KEY_ID = re.compile(r"[0-9a-f]{12}")
_KDF = re.compile(r"scrypt:n=(\d+),r=(\d+),p=(\d+)")
DEFAULT_KDF: Final[str] = "scrypt:n=16384,r=8,p=1"
"""scrypt's interactive-login cost (16 MiB, ~40 ms). The secrets are 256-bit random,
so the cost only matters if the file leaks together with a weak key; it is kept
moderate because every request with an unknown key pays it."""

_KEY_FIELDS: Final[frozenset[str]] = frozenset(
    {"key_id", "dealer_id", "created_at", "kdf", "salt", "hash", "revoked_at"}
)
_VERIFIED_CACHE_MAX: Final[int] = 4096


# --- API keys ------------------------------------------------------------------


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class ApiKey:
    """One dealer API key as stored: its hash, never the key."""

    key_id: str
    dealer_id: str
    salt: bytes
    hash: bytes = field(repr=False)
    created_at: datetime
    kdf: str = DEFAULT_KDF
    revoked_at: datetime | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def _scrypt_params(kdf: str) -> tuple[int, int, int]:
    match = _KDF.fullmatch(kdf)
    if match is None:
        raise ValueError(f"unsupported kdf {kdf!r} (expected e.g. {DEFAULT_KDF!r})")
    n, r, p = (int(group) for group in match.groups())
    if n < 2 or n & (n - 1) or not 1 <= r <= 32 or not 1 <= p <= 16 or 128 * n * r > 1 << 30:
        raise ValueError(f"unusable scrypt parameters in kdf {kdf!r}")
    return n, r, p


def _derive(token: str, salt: bytes, kdf: str) -> bytes:
    n, r, p = _scrypt_params(kdf)
    return hashlib.scrypt(
        token.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=256 * n * r, dklen=_HASH_BYTES
    )


def key_id_of(token: str) -> str | None:
    """The key id of a well-formed key, else None."""
    match = _TOKEN.fullmatch(token)
    return match.group(1) if match else None


def new_key(dealer_id: str, *, now: datetime | None = None) -> tuple[ApiKey, str]:
    """A fresh key for ``dealer_id``: ``(stored record, the key itself)``."""
    if not DEALER_ID_PATTERN.fullmatch(dealer_id):
        raise ValueError(
            f"dealer id {dealer_id!r} is not valid: 1-32 characters from A-Z a-z 0-9 _ . -, "
            "starting with a letter or digit"
        )
    key_id = secrets.token_hex(_KEY_ID_HEX_DIGITS // 2)
    token = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(_SECRET_BYTES)}"
    salt = secrets.token_bytes(_SALT_BYTES)
    created = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    record = ApiKey(
        key_id=key_id,
        dealer_id=dealer_id,
        salt=salt,
        hash=_derive(token, salt, DEFAULT_KDF),
        created_at=created,
    )
    return record, token


# Checked when a key id is unknown or revoked, so that it costs as much as a wrong secret.
# Random bytes, not a hash of anything: nothing matches it.
_DECOY: Final[ApiKey] = ApiKey(
    key_id="0" * _KEY_ID_HEX_DIGITS,
    dealer_id="decoy",
    salt=secrets.token_bytes(_SALT_BYTES),
    hash=secrets.token_bytes(_HASH_BYTES),
    created_at=datetime(1970, 1, 1, tzinfo=UTC),
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _toml_datetime(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _entry_toml(key: ApiKey) -> str:
    # Every value is from a restricted ASCII alphabet (checked on load and on creation),
    # so plain double quotes need no escaping.
    lines = [
        "[[keys]]",
        f'key_id = "{key.key_id}"',
        f'dealer_id = "{key.dealer_id}"',
        f"created_at = {_toml_datetime(key.created_at)}",
        f'kdf = "{key.kdf}"',
        f'salt = "{_b64(key.salt)}"',
        f'hash = "{_b64(key.hash)}"',
    ]
    if key.revoked_at is not None:
        lines.append(f"revoked_at = {_toml_datetime(key.revoked_at)}")
    return "\n".join(lines) + "\n"


_FILE_HEADER = """\
# API keys of the HTTP ingestion endpoint (csi serve-http), one [[keys]] table each.
# Edit with `csi keys add|list|revoke`. Only salted scrypt hashes are kept here: a key
# is shown once, when it is created, and cannot be recovered from this file.
"""


def _parse_datetime(value: object, what: str) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValueError(
            f"{what} must be a TOML date-time with a UTC offset, e.g. 2024-06-30T10:00:00Z"
        )
    return value.astimezone(UTC)


def _parse_b64(value: object, what: str, min_bytes: int) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a base64 string")
    try:
        data = base64.b64decode(value, validate=True)
    except binascii.Error:
        raise ValueError(f"{what} is not valid base64") from None
    if len(data) < min_bytes:
        raise ValueError(f"{what} must be at least {min_bytes} bytes (got {len(data)})")
    return data


def _parse_entry(entry: object) -> ApiKey:
    if not isinstance(entry, dict):
        raise ValueError("must be a table")
    unknown = sorted(set(entry) - _KEY_FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(unknown)}")
    missing = sorted(_KEY_FIELDS - {"revoked_at"} - set(entry))
    if missing:
        raise ValueError(f"missing field(s): {', '.join(missing)}")
    key_id, dealer_id, kdf = entry["key_id"], entry["dealer_id"], entry["kdf"]
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise ValueError(f"key_id must be {_KEY_ID_HEX_DIGITS} hex digits (got {key_id!r})")
    if not isinstance(dealer_id, str) or not DEALER_ID_PATTERN.fullmatch(dealer_id):
        raise ValueError(f"dealer_id {dealer_id!r} is not a valid dealer id")
    if not isinstance(kdf, str):
        raise ValueError("kdf must be a string")
    _scrypt_params(kdf)
    hashed = _parse_b64(entry["hash"], "hash", _HASH_BYTES)
    if len(hashed) != _HASH_BYTES:
        raise ValueError(f"hash must be {_HASH_BYTES} bytes (got {len(hashed)})")
    revoked = entry.get("revoked_at")
    return ApiKey(
        key_id=key_id,
        dealer_id=dealer_id,
        salt=_parse_b64(entry["salt"], "salt", _SALT_BYTES),
        hash=hashed,
        created_at=_parse_datetime(entry["created_at"], "created_at"),
        kdf=kdf,
        revoked_at=None if revoked is None else _parse_datetime(revoked, "revoked_at"),
    )


def parse_key_file(text: str, source: str = "<key file>") -> list[ApiKey]:
    """The keys of a key file's text; :class:`KeyFileError` naming ``source`` and the entry."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise KeyFileError(f"{source}: not valid TOML: {exc}") from None
    unknown = sorted(set(document) - {"keys"})
    if unknown:
        raise KeyFileError(f"{source}: unknown top-level key(s): {', '.join(unknown)}")
    entries = document.get("keys", [])
    if not isinstance(entries, list):
        raise KeyFileError(f"{source}: `keys` must be an array of tables ([[keys]])")
    keys: list[ApiKey] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        label = entry.get("key_id") if isinstance(entry, dict) else None
        where = f"{source}: keys[{index}]" + (f" ({label})" if isinstance(label, str) else "")
        try:
            key = _parse_entry(entry)
        except ValueError as exc:
            raise KeyFileError(f"{where}: {exc}") from None
        if key.key_id in seen:
            raise KeyFileError(f"{where}: duplicate key_id {key.key_id}")
        seen.add(key.key_id)
        keys.append(key)
    return keys


def _file_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


class KeyStore:
    """Dealer API keys (hashed), optionally backed by a TOML key file.

    :meth:`authenticate` is the slow, constant-time check (run it in a thread);
    everything else is cheap. :meth:`refresh` re-reads the file if it changed.
    """

    def __init__(self, keys: Iterable[ApiKey] = (), *, path: Path | None = None) -> None:
        self.path = path
        self._signature: tuple[int, int, int] | None = None
        self._set_keys(keys)

    def _set_keys(self, keys: Iterable[ApiKey]) -> None:
        by_id: dict[str, ApiKey] = {}
        for key in keys:
            if key.key_id in by_id:
                raise ValueError(f"duplicate key_id {key.key_id}")
            by_id[key.key_id] = key
        # Replaced, never mutated: authenticate() may be reading them in another thread.
        self._keys = by_id
        self._verified: dict[bytes, str] = {}

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, missing_ok: bool = False) -> KeyStore:
        """The keys of a key file; an empty store for a missing one if ``missing_ok``."""
        path = Path(path)
        signature = _file_signature(path)
        if signature is None:
            if missing_ok:
                return cls(path=path)
            raise KeyFileError(f"{path}: no such key file (create one with `csi keys add`)")
        store = cls(cls._read(path), path=path)
        store._signature = signature
        return store

    @staticmethod
    def _read(path: Path) -> list[ApiKey]:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise KeyFileError(f"{path}: not UTF-8 text: {exc.reason}") from None
        return parse_key_file(text, str(path))

    def refresh(self) -> bool:
        """Re-read the key file if it changed since it was read; True if it was re-read.

        A file that has become unreadable or invalid is logged and the keys already
        loaded stay in force (the file is replaced atomically, so that is a mistake,
        not a half-written file). A deleted file leaves no key: fail closed.
        """
        if self.path is None:
            return False
        signature = _file_signature(self.path)
        if signature == self._signature:
            return False
        try:
            keys = self._read(self.path) if signature is not None else []
        except (OSError, ValueError) as exc:
            log.error("key file not reloaded, keeping the previous keys: %s", exc)
            return False
        self._set_keys(keys)
        self._signature = signature
        if signature is None:
            log.warning("key file %s is gone: every request is refused until it is back", self.path)
        else:
            log.info("key file %s reloaded: %d active key(s)", self.path, self.active_count)
        return True

    def __iter__(self) -> Iterator[ApiKey]:
        return iter(list(self._keys.values()))

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def active_count(self) -> int:
        return sum(1 for key in self._keys.values() if key.active)

    def get(self, key_id: str) -> ApiKey | None:
        return self._keys.get(key_id)

    def add(self, dealer_id: str, *, now: datetime | None = None) -> tuple[ApiKey, str]:
        """A new key for ``dealer_id``, added here (call :meth:`save`); returns the key too."""
        while True:
            record, token = new_key(dealer_id, now=now)
            if record.key_id not in self._keys:
                break
        self._set_keys([*self._keys.values(), record])
        return record, token

    def revoke(self, key_id: str, *, now: datetime | None = None) -> ApiKey:
        """Mark a key revoked (kept in the file, refused from now on); returns it."""
        key = self._keys.get(key_id)
        if key is None:
            where = f" in {self.path}" if self.path else ""
            raise ValueError(f"no key {key_id!r}{where} (see `csi keys list`)")
        if key.revoked_at is None:
            moment = (now or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
            key = replace(key, revoked_at=moment)
            self._set_keys(key if k.key_id == key_id else k for k in self._keys.values())
        return key

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the key file atomically (mode 0600); returns its path."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("KeyStore.save: no path")
        text = _FILE_HEADER + "".join("\n" + _entry_toml(key) for key in self._keys.values())
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                stream.write(text)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        self.path = target
        self._signature = _file_signature(target)
        return target

    def authenticate(self, token: str) -> ApiKey | None:
        """The active key ``token`` is, or None; constant time for any well-sized token."""
        if len(token) > _MAX_TOKEN_CHARS:
            return None
        keys, verified = self._keys, self._verified
        fingerprint = hashlib.sha256(token.encode("utf-8")).digest()
        remembered = verified.get(fingerprint)
        if remembered is not None:
            known = keys.get(remembered)
            return known if known is not None and known.active else None
        key_id = key_id_of(token)
        key = keys.get(key_id) if key_id is not None else None
        if key is not None and not key.active:
            key = None
        target = key or _DECOY
        matches = hmac.compare_digest(_derive(token, target.salt, target.kdf), target.hash)
        if key is None or not matches:
            return None
        if len(verified) >= _VERIFIED_CACHE_MAX:
            verified.clear()
        verified[fingerprint] = key.key_id
        return key


# --- the Kafka side --------------------------------------------------------------


class KafkaSink:
    """An :class:`~pipeline.producer.EventSink` for a long-running server.

    :class:`EventProducer` is built lazily (so the server starts while Kafka is down)
    with ``acks="all"`` and every wait bounded by ``timeout_s``. Its failures are
    sticky (``flush`` raises forever after one), so after any failure of ``send`` or
    ``flush`` this sink closes it and builds a new one at the next send: one outage
    fails the requests during the outage, not every request after it. Not
    thread-safe: :func:`make_app` calls it from a single thread.
    """

    def __init__(
        self,
        bootstrap: str,
        *,
        idempotent: bool = False,
        timeout_s: float = 10.0,
        **kafka_config: Any,
    ) -> None:
        wait_ms = max(100, int(timeout_s * 1000))
        request_ms = max(100, wait_ms // 2)
        self._bootstrap = bootstrap
        self._idempotent = idempotent
        self._config: dict[str, Any] = {
            "bootstrap_timeout_ms": wait_ms,
            "max_block_ms": wait_ms,
            "request_timeout_ms": request_ms,
            "delivery_timeout_ms": max(wait_ms, request_ms + 100),
            **kafka_config,
        }
        self._producer: EventProducer | None = None

    def send(self, event: dict[str, Any]) -> None:
        try:
            if self._producer is None:
                self._producer = EventProducer(
                    self._bootstrap, acks="all", idempotent=self._idempotent, **self._config
                )
            self._producer.send(event)
        except BaseException:
            self._discard()
            raise

    def flush(self, timeout: float | None = None) -> None:
        if self._producer is None:
            return
        try:
            self._producer.flush(timeout)
        except BaseException:
            self._discard()
            raise

    def close(self, timeout: float | None = None) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.close(timeout)

    def _discard(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            # Its records belong to a batch answered 503: the client sends them again.
            with contextlib.suppress(Exception):
                producer.close(timeout=0)


# --- the HTTP app ----------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """What one request may carry, and how long and how much Kafka may keep it waiting."""

    max_body_bytes: int = MAX_BODY_BYTES
    max_events: int = MAX_EVENTS_PER_REQUEST
    max_event_bytes: int = MAX_EVENT_BYTES
    flush_timeout_s: float = 10.0
    """Passed to ``sink.flush``: the longest wait for Kafka's acknowledgement."""
    max_queued_batches: int = 16
    """Batches waiting for the sink (it takes one at a time) beyond which it is 503 at once."""
    retry_after_s: int = 5
    """``Retry-After`` of a 503."""

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_events", "max_event_bytes", "max_queued_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be at least 1")
        if not self.flush_timeout_s > 0 or self.retry_after_s < 0:
            raise ValueError("Limits: flush_timeout_s must be > 0 and retry_after_s >= 0")


_DELIVERY_ERRORS: Final = (ProduceError, KafkaError, OSError)
"""Failures that mean "Kafka did not take it" (503), as opposed to a bug (500)."""

_LOG_FIELDS = web.RequestKey("csi_ingest_log", dict[str, object])


def _json_response(
    payload: object, status: int, headers: LooseHeaders | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload), status=status, content_type="application/json", headers=headers
    )


def _error(status: int, reason: str, headers: LooseHeaders | None = None) -> web.Response:
    return _json_response({"error": {"code": status, "reason": reason}}, status, headers)


def _shown(text: str) -> str:
    if DEALER_ID_PATTERN.fullmatch(text):
        return text
    return repr(text if len(text) <= 40 else text[:39] + "…")


class _Refusal(Exception):
    """A whole request refused before its events are judged one by one."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class _Judgement:
    results: list[dict[str, Any]]
    accepted: list[dict[str, Any]]
    """The accepted events as sent to Kafka (canonical JSON, as dicts)."""
    all_foreign: bool


def _judge_event(
    index: int, item: object, dealer_id: str, now: datetime, max_event_bytes: int
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    def rejected(code: int, reason: str) -> tuple[dict[str, Any], None]:
        result: dict[str, Any] = {"index": index, "status": "rejected"}
        claimed_id = item.get("event_id") if isinstance(item, dict) else None
        if isinstance(claimed_id, str) and len(claimed_id) <= 64:
            result["event_id"] = claimed_id
        result["error"] = {"code": code, "reason": reason}
        return result, None

    if isinstance(item, dict):
        claimed = item.get("dealer_id")
        if isinstance(claimed, str) and claimed != dealer_id:
            return rejected(
                403, f"dealer_id: key of {dealer_id} cannot submit events for {_shown(claimed)}"
            )
    try:
        # pydantic_core, not orjson: it writes back exactly what `from_json` read (integers
        # beyond 64 bits, NaN and infinities), so the event is judged as sent.
        raw = pydantic_core.to_json(item)
    except ValueError as exc:
        return rejected(400, f"event: cannot be re-encoded as JSON: {exc}")
    if len(raw) > max_event_bytes:
        return rejected(413, f"event is larger than {max_event_bytes} bytes (got {len(raw)} bytes)")
    try:
        event = parse_event(raw, now=now)
    except InvalidEvent as exc:
        return rejected(400, exc.reason)
    if event.dealer_id != dealer_id:  # cannot happen after the check above; never rely on it
        return rejected(
            403, f"dealer_id: key of {dealer_id} cannot submit events for {event.dealer_id}"
        )
    canonical: dict[str, Any] = orjson.loads(event_to_json(event))
    return {"index": index, "event_id": str(event.event_id), "status": "accepted"}, canonical


def _judge_batch(body: bytes, dealer_id: str, now: datetime, limits: Limits) -> _Judgement:
    """Parse a request body and judge each event; raises :class:`_Refusal` for the whole."""
    try:
        # The parser `parse_event` uses (jiter), so that each event is read here as the
        # stream reads it: orjson would turn an integer beyond 64 bits into a float (the
        # reason would show a number the client never sent) and refuse the whole body
        # for one event's NaN or 1e400, which `parse_event` rejects with a reason.
        payload = pydantic_core.from_json(body)
    except ValueError as exc:
        raise _Refusal(400, f"malformed JSON: {encoding_problem(body) or exc}") from None
    items: object
    if isinstance(payload, dict):
        if "events" not in payload:
            raise _Refusal(400, 'body must be a JSON array of events or {"events": [...]}')
        unknown = sorted(set(payload) - {"events"})
        if unknown:
            raise _Refusal(400, f"unknown top-level field(s): {', '.join(map(_shown, unknown))}")
        items = payload["events"]
    else:
        items = payload
    if not isinstance(items, list):
        raise _Refusal(400, 'body must be a JSON array of events or {"events": [...]}')
    if not items:
        raise _Refusal(400, "no events in the request")
    if len(items) > limits.max_events:
        raise _Refusal(
            413, f"too many events: {len(items)} (at most {limits.max_events} per request)"
        )
    results: list[dict[str, Any]] = []
    accepted: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        result, event = _judge_event(index, item, dealer_id, now, limits.max_event_bytes)
        results.append(result)
        if event is not None:
            accepted.append(event)
    all_foreign = all(r.get("error", {}).get("code") == 403 for r in results)
    return _Judgement(results, accepted, all_foreign)


class _Ingest:
    def __init__(
        self,
        keys: KeyStore,
        sink: EventSink,
        limits: Limits,
        clock: Callable[[], datetime],
    ) -> None:
        self._keys = keys
        self._sink = sink
        self._limits = limits
        self._clock = clock
        # One thread owns the sink: sends and flushes of concurrent requests never interleave,
        # so a batch's flush answers for that batch (and EventSinks need not be thread-safe).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="csi-ingest-sink")
        self._queued = 0

    async def close(self, _app: web.Application) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _authenticate(self, request: web.Request) -> ApiKey | web.Response:
        challenge = {hdrs.WWW_AUTHENTICATE: 'Bearer realm="csi"'}
        scheme, _, token = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return _error(401, "missing API key: send Authorization: Bearer <key>", challenge)
        self._keys.refresh()
        key = await asyncio.to_thread(self._keys.authenticate, token)
        if key is None:
            return _error(401, "unknown or revoked API key", challenge)
        return key

    async def post_events(self, request: web.Request) -> web.Response:
        fields = request[_LOG_FIELDS]
        key = await self._authenticate(request)
        if isinstance(key, web.Response):
            return key
        fields.update(dealer=key.dealer_id, key=key.key_id)
        if request.content_type != "application/json":
            given = request.headers.get(hdrs.CONTENT_TYPE, "none")
            return _error(415, f"Content-Type must be application/json (got {given[:80]})")
        if request.charset not in (None, "utf-8", "utf8"):
            return _error(415, f"JSON must be UTF-8 (got charset {request.charset[:40]})")
        limit = self._limits.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return _error(413, f"body is larger than {limit} bytes ({request.content_length})")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"body is larger than {limit} bytes")
        try:
            judged = await asyncio.to_thread(
                _judge_batch, body, key.dealer_id, self._clock(), self._limits
            )
        except _Refusal as refusal:
            return _error(refusal.status, refusal.reason)
        accepted, rejected = len(judged.accepted), len(judged.results) - len(judged.accepted)
        fields.update(events=len(judged.results), accepted=accepted, rejected=rejected)
        answer = {"accepted": accepted, "rejected": rejected, "results": judged.results}
        if not judged.accepted:
            return _json_response(answer, 403 if judged.all_foreign else 400)
        try:
            await self._deliver(judged.accepted)
        except _Refusal as refusal:
            fields.update(accepted=0)
            retry = {hdrs.RETRY_AFTER: str(self._limits.retry_after_s)}
            return _error(refusal.status, refusal.reason, retry)
        return _json_response(answer, 202)

    async def _deliver(self, events: list[dict[str, Any]]) -> None:
        if self._queued >= self._limits.max_queued_batches:
            raise _Refusal(503, "too many batches waiting for Kafka; nothing accepted, retry")
        self._queued += 1
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._send_and_flush, events)
        except _DELIVERY_ERRORS as exc:
            log.warning("Kafka did not take a batch of %d event(s): %r", len(events), exc)
            raise _Refusal(
                503, "event store unavailable (Kafka); nothing accepted, send the batch again"
            ) from None
        finally:
            self._queued -= 1

    def _send_and_flush(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            self._sink.send(event)
        self._sink.flush(self._limits.flush_timeout_s)


async def _healthz(_request: web.Request) -> web.Response:
    return _json_response({"status": "ok"}, 200)


@web.middleware
async def _log_requests(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """One log line per request, and JSON errors for aiohttp's own (404, 405, ...)."""
    started = time.monotonic()
    fields: dict[str, object] = {}
    request[_LOG_FIELDS] = fields
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        headers = {
            name: value
            for name, value in exc.headers.items()
            if name not in (hdrs.CONTENT_TYPE, hdrs.CONTENT_LENGTH)
        }
        if exc.status < 400:
            raise
        response = _error(exc.status, exc.reason, headers)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        response = _error(500, "internal error; nothing accepted")
    extra = " ".join(f"{name}={value}" for name, value in fields.items())
    log.info(
        "%s %s %s %d %.1fms%s",
        request.remote,
        request.method,
        request.path,
        response.status,
        (time.monotonic() - started) * 1000,
        f" {extra}" if extra else "",
    )
    return response


def make_app(
    keys: KeyStore,
    sink: EventSink,
    *,
    limits: Limits | None = None,
    clock: Callable[[], datetime] | None = None,
) -> web.Application:
    """The ingestion app: ``POST /v1/events`` and ``GET /healthz``.

    ``sink`` receives each accepted event (a dict, canonical JSON of the validated
    event) with ``send`` and is then flushed, from one dedicated thread; a
    :class:`ProduceError`, ``KafkaError`` or ``OSError`` from either means 503. The
    caller owns ``sink`` (the app does not close it). ``clock`` is the ``now`` that
    ``occurred_at`` is checked against (default: the UTC wall clock).
    """
    limits = limits or Limits()
    ingest = _Ingest(keys, sink, limits, clock or (lambda: datetime.now(UTC)))
    app = web.Application(client_max_size=limits.max_body_bytes, middlewares=[_log_requests])
    app.router.add_post("/v1/events", ingest.post_events)
    app.router.add_get("/healthz", _healthz)
    app.on_cleanup.append(ingest.close)
    return app


# --- command line ----------------------------------------------------------------


def _key_file(path: str | None) -> Path:
    chosen = path or os.environ.get(API_KEYS_ENV)
    if not chosen:
        raise ValueError(f"no key file: pass --file/--keys or set {API_KEYS_ENV}")
    return Path(chosen)


def cmd_keys_add(args: argparse.Namespace) -> int:
    path = _key_file(args.file)
    store = KeyStore.load(path, missing_ok=True)
    key, token = store.add(args.dealer_id)
    store.save()
    print(token, flush=True)
    print(
        f"csi keys: added key {key.key_id} for dealer {key.dealer_id} to {path}. The line above "
        "is the key; it is shown only this once: hand it to the dealer now.",
        file=sys.stderr,
    )
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    store = KeyStore.load(_key_file(args.file))
    keys = [k for k in store if args.dealer is None or k.dealer_id == args.dealer]
    rows = [
        {
            "key_id": k.key_id,
            "dealer_id": k.dealer_id,
            "created_at": _toml_datetime(k.created_at),
            "status": "active" if k.active else "revoked",
            "revoked_at": _toml_datetime(k.revoked_at) if k.revoked_at else None,
        }
        for k in keys
    ]
    if args.format == "json":
        for row in rows:
            sys.stdout.buffer.write(orjson.dumps(row) + b"\n")
        return 0
    from pipeline.cli import format_table  # not at the top: pipeline.cli imports this module

    columns = ("key_id", "dealer_id", "created_at", "status", "revoked_at")
    print(format_table(columns, [[row[c] for c in columns] for row in rows]))
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    path = _key_file(args.file)
    store = KeyStore.load(path)
    was_active = (key := store.get(args.key_id)) is not None and key.active
    key = store.revoke(args.key_id)
    if not was_active:
        print(f"csi keys: key {key.key_id} was already revoked", file=sys.stderr)
        return 0
    store.save()
    print(
        f"csi keys: revoked key {key.key_id} of dealer {key.dealer_id} in {path}; a running "
        "server refuses it from its next request on",
        file=sys.stderr,
    )
    return 0


def cmd_serve_http(args: argparse.Namespace) -> int:
    from pipeline.config import Settings

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    keys = KeyStore.load(_key_file(args.keys))
    if not keys.active_count:
        log.warning("%s holds no active key: every request will get 401", keys.path)
    bootstrap = args.bootstrap or Settings().bootstrap
    sink = KafkaSink(bootstrap, idempotent=args.idempotent, timeout_s=args.kafka_timeout)
    app = make_app(keys, sink, limits=Limits(flush_timeout_s=args.kafka_timeout))

    def ready(*_args: object, **_kwargs: object) -> None:
        print(
            f"csi serve-http: POST http://{args.host}:{args.port}/v1/events -> Kafka {bootstrap} "
            f"({keys.active_count} active key(s) from {keys.path}); Ctrl-C stops it",
            file=sys.stderr,
            flush=True,
        )

    try:
        web.run_app(app, host=args.host, port=args.port, access_log=None, print=ready)
    finally:
        sink.close(timeout=5)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``csi keys add|list|revoke`` and ``csi serve-http`` to the CLI."""
    file_help = f"key file (TOML; default ${API_KEYS_ENV})"
    keys = sub.add_parser("keys", help="API keys of the HTTP ingestion endpoint (hashed)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    add = keys_sub.add_parser("add", help="create a key for a dealer; prints it, once")
    add.add_argument("dealer_id", metavar="DEALER_ID")
    add.add_argument("--file", help=file_help + "; created if missing")
    add.set_defaults(func=cmd_keys_add)
    listing = keys_sub.add_parser("list", help="the keys, without secrets")
    listing.add_argument("--file", help=file_help)
    listing.add_argument("--dealer", help="only this dealer's keys")
    listing.add_argument("--format", choices=("table", "json"), default="table")
    listing.set_defaults(func=cmd_keys_list)
    revoke = keys_sub.add_parser("revoke", help="refuse a key from now on (kept in the file)")
    revoke.add_argument("key_id", metavar="KEYID")
    revoke.add_argument("--file", help=file_help)
    revoke.set_defaults(func=cmd_keys_revoke)

    serve = sub.add_parser(
        "serve-http", help="HTTP ingestion endpoint (POST /v1/events) for dealers without Kafka"
    )
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--keys", help=file_help)
    serve.add_argument("--bootstrap", help="Kafka bootstrap servers (CSI_BOOTSTRAP)")
    serve.add_argument(
        "--idempotent", action="store_true", help="idempotent producer (broker must support it)"
    )
    serve.add_argument(
        "--kafka-timeout", type=float, default=10.0, help="seconds Kafka may take per batch"
    )
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    serve.set_defaults(func=cmd_serve_http)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.ingest_http ...``: these commands without the rest of ``csi``."""
    parser = argparse.ArgumentParser(prog="csi", description="HTTP ingestion and its API keys.")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as exc:
        print(f"csi: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
