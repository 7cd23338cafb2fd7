"""pipeline.webhook: delivery to a real local HTTP server, retries, no duplicates."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from enum import Enum
from typing import Any

import pytest
from aiohttp import web

from pipeline.webhook import (
    MemoryDeliveredLog,
    WebhookError,
    WebhookNotifier,
    WebhookSettings,
    slack_payload,
)

ALERT: dict[str, Any] = {
    "kind": "alert",
    "record": "drop_alert",
    "alert_id": "a-1",
    "dealer_id": "D042",
    "message": "CSI drop at dealer D042",
    "opened_at": datetime(2024, 5, 1, 9, 30, tzinfo=UTC),
}


@dataclass
class Seen:
    headers: dict[str, str]
    body: Any


@dataclass
class FakeReceiver:
    """A real aiohttp server on 127.0.0.1 that records requests and fails on demand.

    The first `fail_first` requests answer `fail_status` (with `retry_after` as a
    Retry-After header when set), the first `hang_first` requests hang until the
    test ends; `always_status` answers every request with that status.
    """

    fail_first: int = 0
    fail_status: int = 503
    retry_after: str | None = None
    hang_first: int = 0
    always_status: int | None = None
    error_body: str = "nope"
    requests: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        n = len(self.requests)
        body = await request.json()
        self.requests.append(Seen({k.lower(): v for k, v in request.headers.items()}, body))
        if n < self.hang_first:
            await asyncio.wait_for(self.release.wait(), timeout=5)
        if self.always_status is not None:
            return web.Response(status=self.always_status, text=self.error_body)
        if n < self.fail_first:
            headers = {} if self.retry_after is None else {"Retry-After": self.retry_after}
            return web.Response(status=self.fail_status, text=self.error_body, headers=headers)
        return web.Response(text="ok")

    @property
    def keys(self) -> list[str]:
        return [seen.headers["idempotency-key"] for seen in self.requests]


@asynccontextmanager
async def receiving(receiver: FakeReceiver) -> AsyncIterator[FakeReceiver]:
    app = web.Application()
    app.router.add_post("/hooks/secret-token", receiver.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    receiver.url = f"http://{host}:{port}/hooks/secret-token"
    try:
        yield receiver
    finally:
        receiver.release.set()
        await runner.cleanup()


class FakeSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


def run_with(
    receiver: FakeReceiver,
    scenario: Callable[[FakeReceiver, FakeSleep], Awaitable[None]],
) -> FakeSleep:
    sleep = FakeSleep()

    async def main() -> None:
        async with receiving(receiver):
            await scenario(receiver, sleep)

    asyncio.run(main())
    return sleep


def notifier(receiver: FakeReceiver, sleep: FakeSleep, **kw: Any) -> WebhookNotifier:
    settings = WebhookSettings(url=receiver.url, **{"timeout_s": 2.0, **kw})
    return WebhookNotifier(settings, sleep=sleep)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_delivers_once_with_text_and_idempotency_key() -> None:
    async def scenario(rx: FakeReceiver, sleep: FakeSleep) -> None:
        n = notifier(rx, sleep, headers={"Authorization": "Bearer t0k"})
        try:
            assert await n.deliver("alert:a-1:open", ALERT) is True
        finally:
            await n.close()
        assert (n.sent, n.retries, n.skipped) == (1, 0, 0)

    rx = FakeReceiver()
    sleep = run_with(rx, scenario)
    assert len(rx.requests) == 1
    seen = rx.requests[0]
    assert seen.body["text"] == "CSI drop at dealer D042"
    assert next(iter(seen.body)) == "text"
    assert seen.body["dealer_id"] == "D042"
    assert seen.body["opened_at"] == "2024-05-01T09:30:00+00:00"
    assert seen.headers["idempotency-key"] == "alert:a-1:open"
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["authorization"] == "Bearer t0k"
    assert sleep.delays == []


def test_503_twice_then_ok_is_delivered_once_with_one_key() -> None:
    async def scenario(rx: FakeReceiver, sleep: FakeSleep) -> None:
        log = MemoryDeliveredLog()
        n = WebhookNotifier(WebhookSettings(url=rx.url), delivered=log, sleep=sleep)
        try:
            assert await n.deliver("case:c-7:v3", {"kind": "case", "case_id": "c-7"})
        finally:
            await n.close()
        assert "case:c-7:v3" in log and len(log) == 1
        assert (n.sent, n.retries, n.skipped) == (1, 2, 0)

    rx = FakeReceiver(fail_first=2, fail_status=503)
    sleep = run_with(rx, scenario)
    assert rx.keys == ["case:c-7:v3"] * 3
    assert sleep.delays == [0.5, 1.0]  # exponential backoff, no Retry-After


def test_500_is_retried() -> None:
    async def scenario(rx: FakeReceiver, sleep: FakeSleep) -> None:
        async with notifier(rx, sleep) as n:
            assert await n.deliver("x", ALERT)
            assert n.retries == 1

    rx = FakeReceiver(fail_first=1, fail_status=500)
    run_with(rx, scenario)
    assert len(rx.requests) == 2


def test_redelivery_of_a_delivered_id_is_skipped() -> None:
    async def scenario(rx: FakeReceiver, sleep: FakeSleep) -> None:
        async with notifier(rx, sleep) as n:
            assert await n.deliver("alert:a-1:open", ALERT) is True
            assert await n.deliver("alert:a-1:open", ALERT) is False
            assert await n.deliver("alert:a-1:open", {**ALERT, "message": "changed"}) is False
            assert (n.sent, n.skipped) == (1, 2)

    rx = FakeReceiver()
    run_with(rx, scenario)
    assert len(rx.requests) == 1


def test_concurrent_deliveries_of_one_id_send_once() -> None:
    async def scenario(rx: FakeReceiver, sleep: FakeSleep) -> None:
        async with notifier(rx, sleep) as n:
            results = await asyncio.gather(*(n.deliver("same", ALERT) for _ in range(5)))
            assert sorted(results) == [False] * 4 + [True]
            assert n._locks == {}

    rx = FakeReceiver()
    run_with(rx, scenario)
    assert len(rx.requests) == 1


def test_404_raises_at_once_naming_status_and_body() -> None:
    async def scenario(rx: FakeReceiver, sleep: FakeSleep) -> None:
        async with notifier(rx, sleep) as n:
            with pytest.raises(WebhookError) as info:
                await n.deliver("alert:a-1:open", ALERT)
            assert (n.sent, n.retries, n.failed) == (0, 0, 1)
            message = str(info.value)
            assert "404" in message
            assert "x" * 200 in message and "x" * 201 not in message
            assert "secret-token" not in message  # the URL path is not leaked
            assert "alert:a-1:open" not in n.delivered

    rx = FakeReceiver(always_status=404, error_body="x" * 500)
    sleep = run_with(rx, scenario)
    assert len(rx.requests) == 1
    assert sleep.delays == []


def test_failed_delivery_is_retried_by_the_next_call() -> None:
    async def scenario(rx: FakeReceiver, sleep: FakeSleep) -> None:
        async with notifier(rx, sleep, max_attempts=2) as n:
            with pytest.raises(WebhookError, match="after 2 attempts"):
                await n.deliver("k", ALERT)
            assert await n.deliver("k", ALERT) is True

    rx = FakeReceiver(fail_first=2)
    run_with(rx, scenario)
    assert rx.keys == ["k"] * 3


def test_server_down_raises_after_max_attempts() -> None:
    sleep = FakeSleep()
    settings = WebhookSettings(url=f"http://127.0.0.1:{closed_port()}/hook", max_attempts=3)

    async def main() -> WebhookNotifier:
        async with WebhookNotifier(settings, sleep=sleep) as n:
            with pytest.raises(WebhookError, match="after 3 attempts") as info:
                await n.deliver("k", ALERT)
            assert info.value.__cause__ is not None
            return n

    n = asyncio.run(main())
    assert (n.sent, n.retries, n.failed) == (0, 2, 1)
    assert sleep.delays == [0.5, 1.0]


def test_timeout_is_retried() -> None:
    async def scenario(rx: FakeReceiver, sleep: FakeSleep) -> None:
        async with notifier(rx, sleep, timeout_s=0.2) as n:
            assert await n.deliver("slow", ALERT) is True
            assert n.retries == 1

    rx = FakeReceiver(hang_first=1)
    run_with(rx, scenario)
    assert rx.keys == ["slow", "slow"]


def test_timeouts_exhaust_attempts() -> None:
    async def scenario(rx: FakeReceiver, sleep: FakeSleep) -> None:
        async with notifier(rx, sleep, timeout_s=0.1, max_attempts=2) as n:
            with pytest.raises(WebhookError, match="timed out"):
                await n.deliver("slow", ALERT)

    run_with(FakeReceiver(hang_first=2), scenario)


@pytest.mark.parametrize(
    ("status", "retry_after", "expected"),
    [
        (429, "7", [7.0, 7.0]),
        (503, "1.5", [1.5, 1.5]),
        (429, "120", [30.0, 30.0]),  # capped at max_backoff_s
        (429, "Wed, 21 Oct 2015 07:28:00 GMT", [0.5, 1.0]),  # not numeric: backoff
        (500, "7", [0.5, 1.0]),  # only honoured on 429/503
    ],
)
def test_retry_after(status: int, retry_after: str, expected: list[float]) -> None:
    async def scenario(rx: FakeReceiver, sleep: FakeSleep) -> None:
        async with notifier(rx, sleep) as n:
            assert await n.deliver("k", ALERT)

    rx = FakeReceiver(fail_first=2, fail_status=status, retry_after=retry_after)
    sleep = run_with(rx, scenario)
    assert sleep.delays == expected
    assert len(rx.requests) == 3


def test_backoff_doubles_up_to_the_cap() -> None:
    async def scenario(rx: FakeReceiver, sleep: FakeSleep) -> None:
        async with notifier(rx, sleep, backoff_s=10.0, max_backoff_s=25.0) as n:
            assert await n.deliver("k", ALERT)

    sleep = run_with(FakeReceiver(fail_first=4), scenario)
    assert sleep.delays == [10.0, 20.0, 25.0, 25.0]


def test_deliver_all_in_order_and_resumes() -> None:
    items = [(f"id-{i}", {"kind": "alert", "message": f"m{i}"}) for i in range(4)]

    async def scenario(rx: FakeReceiver, sleep: FakeSleep) -> None:
        async with notifier(rx, sleep) as n:
            assert await n.deliver("id-1", items[1][1])
            assert await n.deliver_all(items) == 3
            assert await n.deliver_all(items) == 0
            assert n.skipped == 1 + 4

    rx = FakeReceiver()
    run_with(rx, scenario)
    assert rx.keys == ["id-1", "id-0", "id-2", "id-3"]
    assert [seen.body["text"] for seen in rx.requests] == ["m1", "m0", "m2", "m3"]


def test_close_closes_the_session_and_a_new_one_opens_lazily() -> None:
    async def scenario(rx: FakeReceiver, sleep: FakeSleep) -> None:
        n = notifier(rx, sleep)
        assert n._session is None
        await n.deliver("a", ALERT)
        session = n._session
        assert session is not None
        await n.close()
        assert session.closed and n._session is None
        await n.close()  # idempotent
        await n.deliver("b", ALERT)
        await n.close()

    rx = FakeReceiver()
    run_with(rx, scenario)
    assert rx.keys == ["a", "b"]


def test_memory_log_evicts_the_oldest() -> None:
    log = MemoryDeliveredLog(max_ids=3)
    for i in range(5):
        log.add(f"id-{i}")
    assert len(log) == 3
    assert "id-0" not in log and "id-1" not in log
    assert all(f"id-{i}" in log for i in (2, 3, 4))
    log.add("id-2")  # re-adding refreshes it: id-3 is now the oldest
    log.add("id-5")
    assert "id-3" not in log and "id-2" in log
    with pytest.raises(ValueError):
        MemoryDeliveredLog(max_ids=0)


class Severity(Enum):
    HIGH = "high"


def test_slack_payload_converts_datetimes_and_keeps_fields() -> None:
    record = {
        "kind": "case",
        "case_id": "c-1",
        "opened_at": datetime(2024, 5, 1, 9, 30, tzinfo=UTC),
        "due": date(2024, 5, 3),
        "history": [{"at": datetime(2024, 5, 2, 8, 0)}],
        "severity": Severity.HIGH,
        "score": float("nan"),
        "tags": ("a", "b"),
    }
    payload = slack_payload(record)
    assert next(iter(payload)) == "text"
    assert payload["opened_at"] == "2024-05-01T09:30:00+00:00"
    assert payload["due"] == "2024-05-03"
    assert payload["history"] == [{"at": "2024-05-02T08:00:00"}]
    assert payload["severity"] == "high"
    assert payload["score"] is None
    assert payload["tags"] == ["a", "b"]
    assert payload["case_id"] == "c-1"
    json.dumps(payload, allow_nan=False)  # serialisable as strict JSON
    assert record["due"] == date(2024, 5, 3)  # the input is not modified


def test_slack_payload_text() -> None:
    assert slack_payload({"message": "hi", "kind": "alert"})["text"] == "hi"
    fallback = slack_payload({"kind": "case", "record": "case_change", "case_id": "c-9"})
    assert fallback["text"] == "case case_change (case_id=c-9)"
    assert slack_payload({})["text"] == "event"


def test_settings_validation() -> None:
    with pytest.raises(ValueError):
        WebhookSettings(url="not a url")
    with pytest.raises(ValueError):
        WebhookSettings(url="ftp://example.com/x")
    with pytest.raises(ValueError):
        WebhookSettings(url="http://example.com/x", max_attempts=0)
    with pytest.raises(ValueError):
        WebhookSettings(url="http://example.com/x", timeout_s=0)
    with pytest.raises(ValueError):
        WebhookSettings(url="http://example.com/x", backoff_s=60.0)
    settings = WebhookSettings(url="https://hooks.example.com/services/T/B/secret")
    assert settings.origin == "https://hooks.example.com"
    assert settings.headers == {}


@pytest.mark.parametrize("status", [400, 401, 403, 301, 307])
def test_other_4xx_and_redirects_are_not_retried(status: int) -> None:
    async def scenario(rx: FakeReceiver, sleep: FakeSleep) -> None:
        async with notifier(rx, sleep) as n:
            with pytest.raises(WebhookError, match=f"HTTP {status}"):
                await n.deliver("k", ALERT)
            assert n.retries == 0

    rx = FakeReceiver(always_status=status)
    run_with(rx, scenario)
    assert len(rx.requests) == 1
