"""HTTP ingestion (`pipeline.ingest_http`): API keys, the aiohttp app, and the Kafka side.

The app runs on aiohttp's own TestServer/TestClient (127.0.0.1, a free port) inside
``asyncio.run``: no pytest plugin. Most tests use a recording sink; the integration tests
use the real producer (``KafkaSink``) against the embedded broker, or against a port
nobody listens on, and one runs ``serve-http`` as a process.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from pipeline.broker import EmbeddedBroker, create_topics, free_port
from pipeline.ingest_http import (
    API_KEYS_ENV,
    MAX_BODY_BYTES,
    MAX_EVENTS_PER_REQUEST,
    KafkaSink,
    KeyFileError,
    KeyStore,
    Limits,
    make_app,
    parse_key_file,
    register,
)
from pipeline.producer import ProduceError
from pipeline.simulator import simulate
from pipeline.topics import ALL_TOPICS, topic_for
from schemas.events import MAX_EVENT_BYTES, parse_event
from tests.broker_fixture import BrokerFactory

T = TypeVar("T")
Client = TestClient[web.Request, web.Application]

NOW = datetime(2024, 7, 1, 12, 0, tzinfo=UTC)
JSON = {"Content-Type": "application/json"}


# --- helpers -------------------------------------------------------------------------


@functools.cache
def _simulated() -> bytes:
    return orjson.dumps(list(simulate(2, 3, end=date(2024, 6, 30), seed=1)))


def _events() -> list[dict[str, Any]]:
    """Two dealers' simulated events (a fresh copy each time)."""
    events: list[dict[str, Any]] = orjson.loads(_simulated())
    return events


def _of(dealer: str, event_type: str, n: int = 0) -> dict[str, Any]:
    return [e for e in _events() if e["dealer_id"] == dealer and e["event_type"] == event_type][n]


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **JSON}


class RecordingSink:
    """An EventSink that keeps what it is sent; ``fail`` makes the next flushes raise it."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.flushes: list[float | None] = []
        self.fail: BaseException | None = None
        self.threads: set[str] = set()

    def send(self, event: dict[str, Any]) -> None:
        self.threads.add(threading.current_thread().name)
        self.sent.append(event)

    def flush(self, timeout: float | None = None) -> None:
        self.flushes.append(timeout)
        if self.fail is not None:
            raise self.fail


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


def with_client(app: web.Application, scenario: Callable[[Client], Awaitable[T]]) -> T:
    """Run ``scenario`` against ``app`` served on 127.0.0.1, from a synchronous test."""

    async def main() -> T:
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            return await scenario(client)

    return asyncio.run(main())


async def _reply(
    client: Client, method: str, path: str, headers: dict[str, str], data: Any = None
) -> Reply:
    async with client.request(method, path, headers=headers, data=data) as response:
        raw = await response.read()
        body = orjson.loads(raw) if response.content_type == "application/json" else raw
        return Reply(response.status, body, dict(response.headers))


def post(
    app: web.Application, payload: Any, headers: dict[str, str], *, raw: bool = False
) -> Reply:
    """One POST /v1/events; ``payload`` is JSON-encoded unless ``raw`` (bytes as they are)."""
    data = payload if raw else orjson.dumps(payload)

    async def scenario(client: Client) -> Reply:
        return await _reply(client, "POST", "/v1/events", headers, data)

    return with_client(app, scenario)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return tmp_path / "keys.toml"


@dataclass
class Keys:
    store: KeyStore
    d001: str
    d002: str


@pytest.fixture
def keys(key_file: Path) -> Keys:
    store = KeyStore.load(key_file, missing_ok=True)
    _, d001 = store.add("D001")
    _, d002 = store.add("D002")
    store.save()
    return Keys(KeyStore.load(key_file), d001, d002)


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


def _app(keys: Keys, sink: RecordingSink, **limits: Any) -> web.Application:
    return make_app(keys.store, sink, limits=Limits(**limits), clock=lambda: NOW)


# --- API keys ------------------------------------------------------------------------


def test_key_file_holds_hashes_never_the_secret(key_file: Path) -> None:
    store = KeyStore.load(key_file, missing_ok=True)
    record, token = store.add("D001", now=datetime(2024, 6, 30, 10, 0, 0, 123, tzinfo=UTC))
    store.save()
    prefix, key_id, secret = token.split("_", 2)
    assert (prefix, key_id) == ("csi", record.key_id) and len(secret) >= 43
    text = key_file.read_text()
    assert secret not in text and token not in text
    assert f'key_id = "{key_id}"' in text and "created_at = 2024-06-30T10:00:00Z" in text
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # The file reads back to the same records; the hash is of the key, salted per key.
    (loaded,) = parse_key_file(text)
    assert loaded == record and len(loaded.salt) == 16 and len(loaded.hash) == 32
    again, other = store.add("D001")
    assert again.salt != record.salt and other != token
    assert KeyStore.load(key_file).authenticate(token) == record


def test_wrong_secret_unknown_id_and_garbage_are_refused(keys: Keys) -> None:
    store = keys.store
    key_id = keys.d001.split("_")[1]
    other_id = keys.d002.split("_")[1]
    assert store.authenticate(keys.d001) is not None
    assert store.authenticate(keys.d001).dealer_id == "D001"  # type: ignore[union-attr]
    secret = keys.d001.split("_", 2)[2]
    wrong = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    refused = [
        f"csi_{key_id}_{wrong}",  # valid key id, wrong secret
        f"csi_{other_id}_{secret}",  # D001's secret under D002's key id
        f"csi_{'0' * 12}_{secret}",  # unknown key id
        keys.d001[:-1],  # truncated
        keys.d001 + "x" * 300,  # far too long
        "csi_",
        "",
        "Bearer " + keys.d001,
    ]
    for token in refused:
        assert store.authenticate(token) is None, token


def test_unknown_key_id_costs_a_hash_too(keys: Keys) -> None:
    """No early exit on an unknown key id: it takes as long as a wrong secret (one scrypt)."""
    key_id = keys.d001.split("_")[1]
    secret = keys.d001.split("_", 2)[2]

    def elapsed(token: str) -> float:
        started = time.perf_counter()
        assert keys.store.authenticate(token) is None
        return time.perf_counter() - started

    wrong_secret = min(elapsed(f"csi_{key_id}_{secret[::-1]}") for _ in range(3))
    unknown_id = min(elapsed(f"csi_{'0' * 12}_{secret}") for _ in range(3))
    assert unknown_id > 0.3 * wrong_secret > 0.002


def test_revoke_refuses_the_key_and_keeps_the_record(keys: Keys, key_file: Path) -> None:
    key_id = keys.d001.split("_")[1]
    server = KeyStore.load(key_file)
    assert server.authenticate(keys.d001) is not None  # now remembered as verified
    admin = KeyStore.load(key_file)
    revoked = admin.revoke(key_id, now=datetime(2024, 7, 1, tzinfo=UTC))
    admin.save()
    assert revoked.revoked_at == datetime(2024, 7, 1, tzinfo=UTC) and not revoked.active
    assert "revoked_at = 2024-07-01T00:00:00Z" in key_file.read_text()
    # A running server sees the change at its next refresh, its cache notwithstanding.
    assert server.refresh() is True and server.refresh() is False
    assert server.authenticate(keys.d001) is None
    assert server.authenticate(keys.d002) is not None
    assert admin.revoke(key_id) == revoked  # idempotent
    with pytest.raises(ValueError, match="no key 'ffffffffffff'"):
        admin.revoke("ffffffffffff")
    # A key file that disappears leaves no key at all (fail closed).
    key_file.unlink()
    assert server.refresh() is True and server.authenticate(keys.d002) is None


def test_revoke_in_the_same_store_clears_the_cache(keys: Keys) -> None:
    assert keys.store.authenticate(keys.d001) is not None
    keys.store.revoke(keys.d001.split("_")[1])
    assert keys.store.authenticate(keys.d001) is None


GOOD_ENTRY = """
[[keys]]
key_id = "0123456789ab"
dealer_id = "D001"
created_at = 2024-06-30T10:00:00Z
kdf = "scrypt:n=16384,r=8,p=1"
salt = "ZUQlX9++vbmOFaeXU7O7og=="
hash = "OjPyA3/Mz0OPp4qqiUB2yBFHOz69uNjc3L9ZssXm0pQ="
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("keys = [", "not valid TOML"),
        (GOOD_ENTRY + GOOD_ENTRY, r"keys\[1\] \(0123456789ab\): duplicate key_id"),
        (GOOD_ENTRY.replace('"D001"', '"D 001"'), "not a valid dealer id"),
        (GOOD_ENTRY.replace('"0123456789ab"', '"XYZ"'), "key_id must be 12 hex digits"),
        (GOOD_ENTRY.replace("10:00:00Z", "10:00:00"), "created_at must be a TOML date-time"),
        (GOOD_ENTRY.replace("scrypt:n=16384", "md5:n=16384"), "unsupported kdf"),
        (GOOD_ENTRY.replace("scrypt:n=16384", "scrypt:n=1000"), "unusable scrypt parameters"),
        (GOOD_ENTRY.replace('salt = "', 'salt = "!'), "salt is not valid base64"),
        (GOOD_ENTRY.replace('hash = "Oj', 'hash = "'), "hash"),
        (GOOD_ENTRY.replace("hash =", "secret = 1\nhash ="), "unknown field"),
        (GOOD_ENTRY.replace('dealer_id = "D001"\n', ""), r"missing field\(s\): dealer_id"),
        ('owner = "me"\n', "unknown top-level key"),
    ],
)
def test_bad_key_files_are_named_errors(text: str, message: str) -> None:
    with pytest.raises(KeyFileError, match=message) as raised:
        parse_key_file(text, "keys.toml")
    assert str(raised.value).startswith("keys.toml: ")


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="no such key file"):
        KeyStore.load(tmp_path / "absent.toml")
    assert len(KeyStore.load(tmp_path / "absent.toml", missing_ok=True)) == 0


# --- the commands --------------------------------------------------------------------


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="csi")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_keys_commands(
    key_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _run_cli(["keys", "add", "D007", "--file", str(key_file)]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert token.startswith("csi_") and "shown only this once" in err and token not in err
    key_id = token.split("_")[1]
    secret = token.split("_", 2)[2]

    monkeypatch.setenv(API_KEYS_ENV, str(key_file))  # the default --file
    assert _run_cli(["keys", "add", "D008"]) == 0
    second = capsys.readouterr().out.strip()
    assert _run_cli(["keys", "list"]) == 0
    table = capsys.readouterr().out
    assert key_id in table and "D007" in table and "D008" in table and "active" in table
    assert secret not in table and second.split("_", 2)[2] not in table

    assert _run_cli(["keys", "revoke", key_id]) == 0
    assert "revoked key" in capsys.readouterr().err
    assert _run_cli(["keys", "revoke", key_id]) == 0
    assert "already revoked" in capsys.readouterr().err
    assert _run_cli(["keys", "list", "--format", "json", "--dealer", "D007"]) == 0
    (row,) = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["key_id"] == key_id and row["status"] == "revoked" and row["revoked_at"]
    assert KeyStore.load(key_file).authenticate(token) is None
    assert KeyStore.load(key_file).authenticate(second) is not None

    with pytest.raises(ValueError, match="no key"):
        _run_cli(["keys", "revoke", "ffffffffffff"])
    with pytest.raises(ValueError, match="is not valid"):
        _run_cli(["keys", "add", "not a dealer"])
    monkeypatch.delenv(API_KEYS_ENV)
    with pytest.raises(ValueError, match=API_KEYS_ENV):
        _run_cli(["keys", "list"])


# --- the app, with a recording sink --------------------------------------------------


def test_healthz_and_json_errors_for_unknown_routes(keys: Keys, sink: RecordingSink) -> None:
    async def scenario(client: Client) -> list[Reply]:
        return [
            await _reply(client, "GET", "/healthz", {}),
            await _reply(client, "GET", "/v1/nothing", {}),
            await _reply(client, "GET", "/v1/events", _auth(keys.d001)),
        ]

    health, missing, wrong_method = with_client(_app(keys, sink), scenario)
    assert (health.status, health.body) == (200, {"status": "ok"})
    assert missing.status == 404 and missing.body["error"]["code"] == 404
    assert wrong_method.status == 405 and "POST" in wrong_method.headers["Allow"]


def test_401_without_a_valid_key(keys: Keys, sink: RecordingSink) -> None:
    key_id = keys.d001.split("_")[1]
    app = _app(keys, sink)
    cases = [
        JSON,
        {"Authorization": keys.d001, **JSON},  # no scheme
        {"Authorization": f"Basic {keys.d001}", **JSON},
        {"Authorization": "Bearer ", **JSON},
        _auth(f"csi_{key_id}_{'A' * 43}"),  # right id, wrong secret
        _auth(f"csi_{'0' * 12}_{'A' * 43}"),
        _auth("hunter2"),
    ]

    async def scenario(client: Client) -> list[Reply]:
        body = orjson.dumps([_of("D001", "survey")])
        return [await _reply(client, "POST", "/v1/events", h, body) for h in cases]

    for reply in with_client(app, scenario):
        assert reply.status == 401, reply
        assert reply.body["error"]["code"] == 401
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    assert sink.sent == []


def test_415_unless_json(keys: Keys, sink: RecordingSink) -> None:
    body = orjson.dumps([_of("D001", "survey")])
    app = _app(keys, sink)
    auth = {"Authorization": f"Bearer {keys.d001}"}

    async def scenario(client: Client) -> list[Reply]:
        return [
            await _reply(client, "POST", "/v1/events", {**auth, "Content-Type": ctype}, body)
            for ctype in ("text/plain", "application/x-ndjson", "application/json; charset=latin-1")
        ]

    replies = with_client(app, scenario)
    assert [r.status for r in replies] == [415, 415, 415]
    assert "application/json" in replies[0].body["error"]["reason"]
    assert sink.sent == []
    # A UTF-8 charset parameter is fine.
    utf8 = {**auth, "Content-Type": "application/json; charset=utf-8"}
    ok = post(_app(keys, sink), [_of("D001", "survey")], utf8)
    assert ok.status == 202, ok


def test_413_for_a_body_over_5_mb(keys: Keys, sink: RecordingSink) -> None:
    event = _of("D001", "survey")
    filler = orjson.dumps([event] * 4)[:-1] + b"," + b" " * MAX_BODY_BYTES + b"]"
    assert len(filler) > MAX_BODY_BYTES

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(filler), 1 << 20):
            yield filler[start : start + (1 << 20)]

    async def scenario(client: Client) -> list[Reply]:
        return [
            await _reply(client, "POST", "/v1/events", _auth(keys.d001), filler),
            await _reply(client, "POST", "/v1/events", _auth(keys.d001), chunked()),
        ]

    with_length, without_length = with_client(_app(keys, sink), scenario)
    for reply in (with_length, without_length):
        assert reply.status == 413, reply
        assert str(MAX_BODY_BYTES) in reply.body["error"]["reason"]
    assert sink.sent == []
    # Exactly at the limit is fine.
    at_limit = orjson.dumps([event])[:-1] + b" " * (MAX_BODY_BYTES - len(orjson.dumps([event])))
    at_limit += b"]"
    assert len(at_limit) == MAX_BODY_BYTES
    assert post(_app(keys, sink), at_limit, _auth(keys.d001), raw=True).status == 202


def test_413_for_too_many_events(keys: Keys, sink: RecordingSink) -> None:
    reply = post(_app(keys, sink), [{}] * (MAX_EVENTS_PER_REQUEST + 1), _auth(keys.d001))
    assert reply.status == 413
    assert reply.body["error"]["reason"] == "too many events: 1001 (at most 1000 per request)"
    event = _of("D001", "survey")
    assert post(_app(keys, sink), [event] * MAX_EVENTS_PER_REQUEST, _auth(keys.d001)).status == 202


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'[{"event_id": ', "malformed JSON: "),
        (b"\xff\xfe[]", "malformed JSON: "),
        (b"", "malformed JSON: "),
        (b"[]", "no events in the request"),
        (b'{"events": []}', "no events in the request"),
        (b'{"event_id": "x"}', 'body must be a JSON array of events or {"events": [...]}'),
        (b'{"events": {}}', 'body must be a JSON array of events or {"events": [...]}'),
        (b'{"events": [], "extra": 1}', "unknown top-level field(s): extra"),
        (b'"events"', "body must be a JSON array"),
    ],
)
def test_400_for_a_body_that_is_not_a_batch(
    keys: Keys, sink: RecordingSink, body: bytes, reason: str
) -> None:
    reply = post(_app(keys, sink), body, _auth(keys.d001), raw=True)
    assert reply.status == 400
    assert reply.body["error"]["code"] == 400
    assert reply.body["error"]["reason"].startswith(reason), reply.body
    assert sink.sent == []


def test_malformed_json_reports_the_parser_message(keys: Keys, sink: RecordingSink) -> None:
    reply = post(_app(keys, sink), b"[1, 2,, 3]", _auth(keys.d001), raw=True)
    assert reply.status == 400
    assert reply.body["error"]["reason"].startswith("malformed JSON: ")
    assert "line 1 column 7" in reply.body["error"]["reason"]


def test_mixed_batch_gets_202_with_a_result_per_event(keys: Keys, sink: RecordingSink) -> None:
    survey, visit = _of("D001", "survey"), _of("D001", "visit")
    pii = {**_of("D001", "survey", 1), "comment": "call me back on 138 1234 5678 please"}
    off_scale = {**_of("D001", "survey", 2), "recommend": 11}
    foreign = _of("D002", "survey")
    huge = {**_of("D001", "survey", 3), "comment": "x" * MAX_EVENT_BYTES}
    batch = [survey, off_scale, foreign, visit, huge, [1, 2], pii]

    reply = post(_app(keys, sink), {"events": batch}, _auth(keys.d001))

    assert reply.status == 202, reply
    assert (reply.body["accepted"], reply.body["rejected"]) == (3, 4)
    results = reply.body["results"]
    assert [r["index"] for r in results] == list(range(len(batch)))
    assert [r["status"] for r in results] == [
        "accepted", "rejected", "rejected", "accepted", "rejected", "rejected", "accepted",
    ]  # fmt: skip
    assert results[0] == {"index": 0, "event_id": survey["event_id"], "status": "accepted"}
    assert results[1]["event_id"] == off_scale["event_id"]
    assert results[1]["error"]["code"] == 400
    assert results[1]["error"]["reason"].startswith("recommend: must be less than or equal to 10")
    assert results[2]["error"] == {
        "code": 403,
        "reason": "dealer_id: key of D001 cannot submit events for D002",
    }
    assert results[4]["error"]["code"] == 413
    assert results[4]["error"]["reason"].startswith(f"event is larger than {MAX_EVENT_BYTES}")
    assert results[5]["error"] == {
        "code": 400,
        "reason": "event: must be a JSON object (got array)",
    }
    # Only the accepted events reach the sink, validated (comments scrubbed), then one flush.
    assert [e["event_id"] for e in sink.sent] == [
        survey["event_id"], visit["event_id"], pii["event_id"],
    ]  # fmt: skip
    assert sink.sent[2]["comment"] == "call me back on [phone] please"
    for sent, submitted in zip(sink.sent, (survey, visit, pii), strict=True):
        assert parse_event(orjson.dumps(sent)) == parse_event(orjson.dumps(submitted))
    assert sink.flushes == [Limits().flush_timeout_s]
    assert sink.threads and all(name.startswith("csi-ingest-sink") for name in sink.threads)


def test_all_rejected_is_400_or_403(keys: Keys, sink: RecordingSink) -> None:
    foreign = _of("D002", "survey")
    invalid = {**_of("D001", "survey"), "channel": "pigeon"}
    app = _app(keys, sink)

    async def scenario(client: Client) -> list[Reply]:
        return [
            await _reply(client, "POST", "/v1/events", _auth(keys.d001), orjson.dumps(batch))
            for batch in ([invalid, foreign], [foreign, foreign], [{**invalid, "dealer_id": 7}])
        ]

    mixed, foreign_only, bad_type = with_client(app, scenario)
    assert mixed.status == 400
    assert (mixed.body["accepted"], mixed.body["rejected"]) == (0, 2)
    assert mixed.body["results"][0]["error"]["reason"].startswith("channel: ")
    assert [r["error"]["code"] for r in mixed.body["results"]] == [400, 403]
    assert foreign_only.status == 403
    assert [r["error"]["code"] for r in foreign_only.body["results"]] == [403, 403]
    assert bad_type.status == 400  # a non-string dealer_id is a validation error, not a 403
    assert "dealer_id" in bad_type.body["results"][0]["error"]["reason"]
    assert sink.sent == [] and sink.flushes == []


def test_sink_failure_is_503_with_retry_after_and_nothing_accepted(
    keys: Keys, sink: RecordingSink
) -> None:
    event = _of("D001", "survey")
    sink.fail = ProduceError(1, OSError("broker gone"))
    app = _app(keys, sink, retry_after_s=7)

    async def scenario(client: Client) -> list[Reply]:
        failed = await _reply(client, "POST", "/v1/events", _auth(keys.d001), orjson.dumps([event]))
        sink.fail = None
        ok = await _reply(client, "POST", "/v1/events", _auth(keys.d001), orjson.dumps([event]))
        return [failed, ok]

    failed, ok = with_client(app, scenario)
    assert failed.status == 503
    assert failed.headers["Retry-After"] == "7"
    assert failed.body["error"]["code"] == 503 and "accepted" not in failed.body
    assert "results" not in failed.body
    assert ok.status == 202 and ok.body["accepted"] == 1


def test_unexpected_sink_error_is_500_not_accepted(keys: Keys, sink: RecordingSink) -> None:
    sink.fail = RuntimeError("bug")
    reply = post(_app(keys, sink), [_of("D001", "survey")], _auth(keys.d001))
    assert reply.status == 500 and "nothing accepted" in reply.body["error"]["reason"]


def test_concurrent_batches_reach_the_sink_one_at_a_time(keys: Keys) -> None:
    events = [e for e in _events() if e["dealer_id"] == "D001"][:40]

    class SlowSink(RecordingSink):
        """Records sends and flushes in order; slow, so that interleaving would show."""

        def __init__(self) -> None:
            super().__init__()
            self.log: list[str | None] = []  # event ids, None for a flush

        def send(self, event: dict[str, Any]) -> None:
            time.sleep(0.001)
            self.log.append(event["event_id"])
            super().send(event)

        def flush(self, timeout: float | None = None) -> None:
            time.sleep(0.01)
            self.log.append(None)
            super().flush(timeout)

    slow = SlowSink()
    batches = [events[i::8] for i in range(8)]

    async def scenario(client: Client) -> list[Reply]:
        requests = (
            _reply(client, "POST", "/v1/events", _auth(keys.d001), orjson.dumps(batch))
            for batch in batches
        )
        return list(await asyncio.gather(*requests))

    replies = with_client(make_app(keys.store, slow, clock=lambda: NOW), scenario)
    assert [r.status for r in replies] == [202] * 8
    # Between two flushes: exactly one request's events, in its order.
    segments: list[list[str]] = [[]]
    for entry in slow.log:
        if entry is None:
            segments.append([])
        else:
            segments[-1].append(entry)
    assert segments.pop() == []
    expected = [[e["event_id"] for e in batch] for batch in batches]
    assert sorted(segments) == sorted(expected)
    assert sorted(e["event_id"] for e in slow.sent) == sorted(e["event_id"] for e in events)


def test_503_at_once_when_too_many_batches_wait_for_kafka(keys: Keys) -> None:
    entered, release = threading.Event(), threading.Event()

    class StuckSink(RecordingSink):
        def flush(self, timeout: float | None = None) -> None:
            entered.set()
            release.wait(10)
            super().flush(timeout)

    stuck = StuckSink()
    app = make_app(keys.store, stuck, limits=Limits(max_queued_batches=1), clock=lambda: NOW)
    body = orjson.dumps([_of("D001", "survey")])

    async def scenario(client: Client) -> list[Reply]:
        first = asyncio.create_task(_reply(client, "POST", "/v1/events", _auth(keys.d001), body))
        assert await asyncio.to_thread(entered.wait, 10)
        second = await _reply(client, "POST", "/v1/events", _auth(keys.d001), body)
        release.set()
        return [await first, second]

    first, second = with_client(app, scenario)
    assert first.status == 202
    assert second.status == 503 and second.headers["Retry-After"] == "5"
    assert len(stuck.flushes) == 1


def test_requests_are_logged_without_keys_or_bodies(
    keys: Keys, sink: RecordingSink, caplog: pytest.LogCaptureFixture
) -> None:
    secret_comment = "my number is 13812345678"
    events = [{**_of("D001", "survey"), "comment": secret_comment}, _of("D002", "survey")]
    caplog.set_level(logging.DEBUG)

    async def scenario(client: Client) -> list[Reply]:
        return [
            await _reply(client, "POST", "/v1/events", _auth(keys.d001), orjson.dumps(events)),
            await _reply(client, "POST", "/v1/events", _auth(keys.d001 + "x"), b"[]"),
        ]

    replies = with_client(_app(keys, sink), scenario)
    assert [r.status for r in replies] == [202, 401]
    lines = [r.getMessage() for r in caplog.records if r.name == "csi.ingest_http"]
    key_id = keys.d001.split("_")[1]
    assert any(
        "POST /v1/events 202" in line and "dealer=D001" in line and f"key={key_id}" in line
        and "accepted=1 rejected=1" in line
        for line in lines
    ), lines  # fmt: skip
    assert any("POST /v1/events 401" in line for line in lines), lines
    everything = "\n".join(r.getMessage() for r in caplog.records)
    secret = keys.d001.split("_", 2)[2]
    assert secret not in everything and "13812345678" not in everything
    assert "cannot submit" not in everything  # rejection reasons stay out of the log


# --- the real producer -----------------------------------------------------------------


def _read_topics(bootstrap: str, topics: list[str], expected: int) -> list[Any]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        partitions = [
            TopicPartition(spec.name, p)
            for spec in ALL_TOPICS
            if spec.name in topics
            for p in range(spec.partitions)
        ]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        records: list[Any] = []
        deadline = time.monotonic() + 10
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
        assert sum(consumer.end_offsets(partitions).values()) == expected
        return records
    finally:
        consumer.close()


@pytest.mark.integration
def test_accepted_events_reach_kafka_keyed_by_dealer(broker: EmbeddedBroker, keys: Keys) -> None:
    surveys = [e for e in _events() if e["dealer_id"] == "D001" and e["event_type"] == "survey"]
    visit = _of("D001", "visit")
    batch = [*surveys, {**surveys[0], "overall": 42}, _of("D002", "survey"), visit]
    sink = KafkaSink(broker.bootstrap, timeout_s=5)
    try:
        reply = post(make_app(keys.store, sink, clock=lambda: NOW), batch, _auth(keys.d001))
    finally:
        sink.close(timeout=5)
    assert reply.status == 202, reply
    assert (reply.body["accepted"], reply.body["rejected"]) == (len(surveys) + 1, 2)

    records = _read_topics(
        broker.bootstrap, [topic_for("survey"), topic_for("visit")], len(surveys) + 1
    )
    by_topic: dict[str, list[Any]] = {}
    for record in records:
        by_topic.setdefault(record.topic, []).append(record)
    survey_records = by_topic[topic_for("survey")]
    assert {r.key for r in records} == {b"D001"}
    assert sorted(orjson.loads(r.value)["event_id"] for r in survey_records) == sorted(
        e["event_id"] for e in surveys
    )
    assert [orjson.loads(r.value)["event_id"] for r in by_topic[topic_for("visit")]] == [
        visit["event_id"]
    ]
    submitted = {e["event_id"]: parse_event(orjson.dumps(e)) for e in [*surveys, visit]}
    for record in records:
        event = parse_event(record.value)
        assert event == submitted[str(event.event_id)]


@pytest.mark.integration
def test_kafka_down_is_503(keys: Keys) -> None:
    sink = KafkaSink(f"127.0.0.1:{free_port()}", timeout_s=0.5)  # nobody listens there
    try:
        started = time.monotonic()
        app = make_app(keys.store, sink, clock=lambda: NOW)
        reply = post(app, [_of("D001", "survey")], _auth(keys.d001))
        assert time.monotonic() - started < 5
    finally:
        sink.close(timeout=1)
    assert reply.status == 503, reply
    assert reply.headers["Retry-After"] == "5"
    assert "nothing accepted" in reply.body["error"]["reason"]


@pytest.mark.integration
def test_outage_answers_503_then_recovers(broker_factory: BrokerFactory, keys: Keys) -> None:
    broker = broker_factory().start()
    create_topics(broker.bootstrap, ALL_TOPICS)
    first, second, third = (_of("D001", "survey", i) for i in range(3))
    sink = KafkaSink(broker.bootstrap, timeout_s=1.0, reconnect_backoff_max_ms=200)
    app = make_app(keys.store, sink, limits=Limits(flush_timeout_s=1.0), clock=lambda: NOW)

    async def scenario(client: Client) -> list[Reply]:
        replies = [
            await _reply(client, "POST", "/v1/events", _auth(keys.d001), orjson.dumps([first]))
        ]
        await asyncio.to_thread(broker.stop)
        replies.append(
            await _reply(client, "POST", "/v1/events", _auth(keys.d001), orjson.dumps([second]))
        )
        await asyncio.to_thread(broker.start)
        replies.append(
            await _reply(client, "POST", "/v1/events", _auth(keys.d001), orjson.dumps([third]))
        )
        return replies

    try:
        replies = with_client(app, scenario)
    finally:
        sink.close(timeout=2)
    assert [r.status for r in replies] == [202, 503, 202], replies
    records = _read_topics(broker.bootstrap, [topic_for("survey")], 2)
    assert sorted(orjson.loads(r.value)["event_id"] for r in records) == sorted(
        [first["event_id"], third["event_id"]]
    )


@pytest.mark.integration
def test_serve_http_command(key_file: Path, keys: Keys, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        API_KEYS_ENV: str(key_file),
        "CSI_BOOTSTRAP": f"127.0.0.1:{free_port()}",  # no Kafka: POSTs get 503
    }
    command = [
        sys.executable, "-m", "pipeline.ingest_http", "serve-http",
        "--port", str(port), "--kafka-timeout", "0.5",
    ]  # fmt: skip
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def request(path: str, body: bytes | None = None, token: str | None = None) -> int:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(base + path, data=body, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                assert request("/healthz") == 200
                break
            except (urllib.error.URLError, ConnectionError):
                assert process.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.05)
        body = orjson.dumps([_of("D001", "survey")])
        assert request("/v1/events", body) == 401
        assert request("/v1/events", body, keys.d001) == 503
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    output = log_path.read_text()
    assert f"POST http://127.0.0.1:{port}/v1/events" in output
    assert "POST /v1/events 401" in output and "POST /v1/events 503" in output
    assert keys.d001.split("_", 2)[2] not in output
