"""Deliver alert and case-change records to an HTTP webhook (Slack-compatible JSON).

Delivery contract
-----------------
Every record is delivered under a caller-chosen `delivery_id` (stable for the
record: e.g. the alert id plus its state, or the case id plus its version), so
the same change always maps to the same id, also after a restart or a replay.

- At-least-once attempts. `WebhookNotifier.deliver()` POSTs the record and
  retries connection errors, timeouts, HTTP 429 and 5xx with exponential
  backoff (`backoff_s`, doubling, capped at `max_backoff_s`; a numeric
  `Retry-After` on 429/503 replaces the backoff for that wait, with the same
  cap). After `max_attempts` failed attempts it raises `WebhookError` with
  the last cause. Any other non-2xx answer (4xx, and 3xx: redirects are not
  followed, as they would turn the POST into a GET) raises `WebhookError`
  at once, naming the status and the start of the body: a misconfigured
  webhook must be loud, not retried into silence.
- De-duplicated by `delivery_id`, at two places:
  * every POST carries the header `Idempotency-Key: <delivery_id>`, the same
    on every attempt, so a receiver can drop a retry whose first attempt did
    arrive (e.g. when only the answer was lost to a timeout);
  * the notifier remembers delivered ids in a `DeliveredLog` (bounded
    in-memory by default; pass a persistent one to survive restarts) and
    never sends an id it has seen delivered: `deliver()` returns False
    without a request. Concurrent `deliver()` calls for one id are
    serialised, so the second one sees the first one's result.

An id is added to the log only after a 2xx answer, so a record whose delivery
raised is tried again by the next `deliver()` of the same id.

`slack_payload()` shapes the JSON: a Slack `text` first (the record's
`message`, else a line built from its `kind`, `record` and ids), then the
record's own fields under their own names, made JSON-serialisable (dates and
times as ISO strings, enums by value, non-finite floats as null).

The URL (a Slack webhook URL holds a secret) and the configured headers (an
Authorization header) never appear in errors or logs; only scheme and host do.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, time
from decimal import Decimal
from enum import Enum
from types import TracebackType
from typing import Any, Protocol
from uuid import UUID

import aiohttp
from yarl import URL

__all__ = [
    "DeliveredLog",
    "MemoryDeliveredLog",
    "WebhookError",
    "WebhookNotifier",
    "WebhookSettings",
    "slack_payload",
]

log = logging.getLogger(__name__)

BODY_SNIPPET_CHARS = 200
RETRY_AFTER_STATUSES = frozenset({429, 503})


class DeliveredLog(Protocol):
    """The ids already delivered. `add()` is called after a 2xx answer."""

    def __contains__(self, delivery_id: str) -> bool: ...

    def add(self, delivery_id: str) -> None: ...


class MemoryDeliveredLog:
    """A bounded insertion-ordered set: keeps the last `max_ids` ids, evicting the oldest."""

    def __init__(self, max_ids: int = 100_000) -> None:
        if max_ids < 1:
            raise ValueError(f"max_ids must be >= 1, got {max_ids}")
        self.max_ids = max_ids
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, delivery_id: object) -> bool:
        return delivery_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, delivery_id: str) -> None:
        if delivery_id in self._ids:
            self._ids.move_to_end(delivery_id)
            return
        self._ids[delivery_id] = None
        while len(self._ids) > self.max_ids:
            self._ids.popitem(last=False)


@dataclass(frozen=True)
class WebhookSettings:
    """Where and how to POST. `headers` are sent on every request (e.g. Authorization)."""

    url: str
    timeout_s: float = 5.0
    max_attempts: int = 5
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            parsed = URL(self.url)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"webhook url is not a URL: {type(exc).__name__}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError("webhook url must be an absolute http(s) URL")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0 <= self.backoff_s <= self.max_backoff_s:
            raise ValueError(
                f"need 0 <= backoff_s <= max_backoff_s, got {self.backoff_s}, {self.max_backoff_s}"
            )

    @property
    def origin(self) -> str:
        """Scheme, host and port only: safe to log (the path of a Slack URL is a secret)."""
        return str(URL(self.url).origin())


class WebhookError(RuntimeError):
    """A delivery failed for good: a non-retryable answer, or `max_attempts` failures."""


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, Enum):
        return _jsonable(value.value)
    if isinstance(value, UUID | Decimal):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return value


def _fallback_text(record: Mapping[str, Any]) -> str:
    kind = record.get("kind") or "event"
    text = str(kind)
    name = record.get("record")
    if name:
        text += f" {name}"
    ids = [
        f"{key}={value}"
        for key, value in record.items()
        if (key == "id" or key.endswith("_id")) and value is not None
    ]
    if ids:
        text += f" ({', '.join(ids)})"
    return text


def slack_payload(record: dict[str, Any]) -> dict[str, Any]:
    """Slack-compatible JSON: `text` first, then the record's fields under their own names.

    `text` is the record's `message` when it has one, else its own `text`, else
    a line built from `kind`, `record` and the `id`/`*_id` fields. Values are
    made JSON-serialisable (datetime/date/time → ISO strings, enums → value,
    UUID/Decimal → str, NaN/inf → null, tuples/sets → lists), recursively.
    """
    message = record.get("message") or record.get("text")
    text = str(message) if message else _fallback_text(record)
    payload: dict[str, Any] = {"text": text}
    for key, value in record.items():
        if key != "text":
            payload[str(key)] = _jsonable(value)
    return payload


def _retry_after(value: str | None) -> float | None:
    """Seconds from a numeric Retry-After; None for a missing, HTTP-date or bad value."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


@dataclass
class _IdLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class WebhookNotifier:
    """POSTs records to one webhook; see the module docstring for the contract.

    Counters: `sent` (records delivered), `retries` (attempts after a failed
    one), `skipped` (ids already delivered), `failed` (deliveries that raised).
    """

    def __init__(
        self,
        settings: WebhookSettings,
        delivered: DeliveredLog | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self.delivered: DeliveredLog = MemoryDeliveredLog() if delivered is None else delivered
        self._sleep = sleep
        self._session: aiohttp.ClientSession | None = None
        self._locks: dict[str, _IdLock] = {}
        self.sent = 0
        self.retries = 0
        self.skipped = 0
        self.failed = 0

    async def __aenter__(self) -> WebhookNotifier:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s)
            )
        return self._session

    async def close(self) -> None:
        """Close the HTTP session (a later `deliver()` opens a new one)."""
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    @asynccontextmanager
    async def _exclusive(self, delivery_id: str) -> AsyncIterator[None]:
        """Serialise concurrent deliveries of one id."""
        entry = self._locks.setdefault(delivery_id, _IdLock())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._locks[delivery_id]

    async def deliver(self, delivery_id: str, record: dict[str, Any]) -> bool:
        """POST `slack_payload(record)` once for `delivery_id`.

        Returns True when this call delivered it, False when the id was
        already delivered (nothing sent). Raises WebhookError on a
        non-retryable answer or after `max_attempts` failed attempts.
        """
        if not delivery_id or "\r" in delivery_id or "\n" in delivery_id:
            raise ValueError(f"delivery_id must be a non-empty single line, got {delivery_id!r}")
        async with self._exclusive(delivery_id):
            if delivery_id in self.delivered:
                self.skipped += 1
                return False
            body = json.dumps(slack_payload(record), ensure_ascii=False).encode()
            try:
                await self._post(delivery_id, body)
            except WebhookError:
                self.failed += 1
                raise
            self.delivered.add(delivery_id)
            self.sent += 1
            return True

    def _redact(self, text: str) -> str:
        """Replace the full URL (its path may be a secret) by its origin."""
        for url in {self.settings.url, str(URL(self.settings.url))}:
            text = text.replace(url, self.settings.origin)
        return text

    async def _post(self, delivery_id: str, body: bytes) -> None:
        settings = self.settings
        headers = {
            **settings.headers,
            "Content-Type": "application/json",
            "Idempotency-Key": delivery_id,
        }
        backoff = settings.backoff_s
        cause = "no attempt made"
        last_exc: BaseException | None = None
        for attempt in range(1, settings.max_attempts + 1):
            delay = backoff
            try:
                async with self._get_session().post(
                    settings.url, data=body, headers=headers, allow_redirects=False
                ) as resp:
                    if 200 <= resp.status < 300:
                        return
                    text = await resp.text(errors="replace")
                    snippet = text[:BODY_SNIPPET_CHARS]
                    cause = f"HTTP {resp.status} {resp.reason or ''}".rstrip() + f": {snippet!r}"
                    last_exc = None
                    if resp.status != 429 and not 500 <= resp.status < 600:
                        raise WebhookError(
                            f"webhook {settings.origin} rejected delivery {delivery_id!r} "
                            f"with {cause} (not retried)"
                        )
                    if resp.status in RETRY_AFTER_STATUSES:
                        retry_after = _retry_after(resp.headers.get("Retry-After"))
                        if retry_after is not None:
                            delay = min(retry_after, settings.max_backoff_s)
            except (aiohttp.ClientError, TimeoutError) as exc:
                if isinstance(exc, TimeoutError):
                    cause = f"timed out after {settings.timeout_s}s"
                else:
                    cause = self._redact(f"{type(exc).__name__}: {exc}")
                last_exc = exc
            if attempt == settings.max_attempts:
                break
            log.warning(
                "webhook %s delivery %r attempt %d/%d failed (%s); retrying in %.2fs",
                settings.origin,
                delivery_id,
                attempt,
                settings.max_attempts,
                cause,
                delay,
            )
            self.retries += 1
            await self._sleep(delay)
            backoff = min(backoff * 2, settings.max_backoff_s)
        raise WebhookError(
            f"webhook {settings.origin} delivery {delivery_id!r} failed after "
            f"{settings.max_attempts} attempts; last: {cause}"
        ) from last_exc

    async def deliver_all(self, items: Sequence[tuple[str, dict[str, Any]]]) -> int:
        """Deliver `(delivery_id, record)` pairs in order; return how many were sent.

        Stops at the first WebhookError (raised); the ones before it are in
        the log, so calling again with the same items resumes where it stopped.
        """
        sent = 0
        for delivery_id, record in items:
            if await self.deliver(delivery_id, record):
                sent += 1
        return sent
