"""Bad input (issue 7): nasty inputs through every ingestion path.

``tests/nasty/`` is a corpus of nasty inputs, one file per input holding its exact
bytes; :data:`CORPUS` says which category each belongs to, where it is produced
(topic, key) and what must become of it: stored, or a dead letter whose reason
says why. Payloads of megabytes are made here, not stored.

* Broker-free: the corpus, megabyte payloads and hypothesis-made inputs (arbitrary
  bytes, valid events mutated) through ``DealerProcessor.process`` as the worker
  calls it. Nothing raises; every input is an event row, a dead letter that keeps
  its bytes and says why, or a replay of a counted event: rows + dead letters +
  duplicates = inputs. What the worker then serialises (roll-up messages, state,
  dead-letter messages, warehouse rows) round-trips, because a NaN written as JSON
  null there is a record the worker cannot read back.
* HTTP (``csi serve-http``): a 100 MB body is refused with 413 before it is read;
  each corpus item gets its own result with the stream's reason.
* End to end: the corpus, a payload just under the broker's message limit and
  valid events through the embedded broker and ``csi worker`` into chdb; every
  record is in ``csi.events`` or ``csi.dead_letters`` (with its reason), exactly
  once, and ``csi dlq`` shows and replays them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.catalogue import load_catalogue
from pipeline.ingest_http import MAX_BODY_BYTES, KeyStore, Limits, make_app
from pipeline.stream import (
    BatchOutput,
    DealerProcessor,
    DictStore,
    RawRecord,
    RollupProcessor,
    RollupUpdate,
)
from pipeline.topics import EVENT_TOPICS
from pipeline.warehouse import encode_columns_json
from schemas import InvalidEvent, parse_event
from schemas.events import MAX_COMMENT_CHARS, MAX_EVENT_BYTES
from tests.test_end_to_end import stop_worker

CATALOGUE = load_catalogue()
CORPUS_DIR = Path(__file__).parent / "nasty"
NOW = datetime(2024, 7, 1, 12, 0, tzinfo=UTC)
"""The clock of the broker-free and HTTP tests; the corpus's events are of 2024-06-30."""
DEALER = "NASTY01"
STORED = "stored"
MB = 1024 * 1024
BROKER_MAX_VALUE = 1_048_512
"""The largest record value the embedded broker (noida-db) takes with a short key,
measured: Kafka's default message.max.bytes (1 048 588) less the record's overhead."""


def topic(event_type: str) -> str:
    return EVENT_TOPICS[event_type].name


@dataclass(frozen=True)
class Nasty:
    """One corpus file: where it goes and what must become of it."""

    file: str
    category: str
    expect: str
    """STORED, or a fragment of the dead letter's reason."""
    event_type: str = "survey"
    """Produced to this event type's topic."""
    key: bytes | None = DEALER.encode()
    http: str | None = None
    """Through HTTP, when not what the stream does (stored = accepted; a reason = that
    event's 400): "accepted", "403 <fragment>", or "body <fragment>" for a body that is
    refused as a whole (it cannot be one element of a JSON array)."""

    @property
    def raw(self) -> bytes:
        return (CORPUS_DIR / self.file).read_bytes()

    @property
    def topic(self) -> str:
        return topic(self.event_type)


def _n(file: str, category: str, expect: str, **kw: Any) -> Nasty:
    return Nasty(file, category, expect, **kw)


NOT_JSON = "not valid JSON: "
RANGE = "occurred_at: must be between 1970-01-01 and 2100-01-01"

CORPUS: tuple[Nasty, ...] = (
    # valid, some with hard text: stored as they are (the comment scrubbed of personal data)
    _n("valid_survey.json", "valid", STORED),
    _n("valid_visit.json", "valid", STORED, event_type="visit"),
    _n("valid_call.json", "valid", STORED, event_type="call"),
    _n("valid_mystery_shop.json", "valid", STORED, event_type="mystery_shop"),
    _n("valid_complaint.json", "valid", STORED, event_type="complaint"),
    _n("pretty_printed.json", "valid", STORED),
    _n("comment_emoji_chinese.json", "emoji and Chinese text", STORED),
    _n("comment_escaped_surrogate_pair.json", "emoji and Chinese text", STORED),
    _n("comment_pii_chinese.json", "emoji and Chinese text", STORED),
    _n("comment_control_chars.json", "control characters", STORED),
    _n("duplicate_keys_last_wins.json", "duplicate keys", STORED),
    _n("event_id_braces.json", "event_id not a UUID", STORED),
    _n("event_id_urn.json", "event_id not a UUID", STORED),
    _n("event_id_uppercase_no_hyphens.json", "event_id not a UUID", STORED),
    # its own dealer: the first survey of a dealer is never "too late"
    _n("occurred_at_1970.json", "dates in 1970 and 2100", STORED, key=b"NASTY1970"),
    # not JSON, not UTF-8
    _n("empty.bin", "empty value", NOT_JSON + "EOF while parsing a value",
       http="body no events in the request"),
    _n("whitespace_only.json", "empty value", NOT_JSON + "EOF while parsing a value",
       http="body no events in the request"),
    _n("truncated.json", "truncated JSON", NOT_JSON + "EOF while parsing a string",
       http="body malformed JSON: EOF while parsing a string"),
    _n("truncated_in_utf8_char.bin", "truncated JSON",
       NOT_JSON + "not UTF-8 text (unexpected end of data 0xe5",
       http="body malformed JSON: not UTF-8 text (invalid continuation byte 0xe5"),
    _n("invalid_utf8.bin", "invalid UTF-8",
       NOT_JSON + "not UTF-8 text (invalid continuation byte 0xe9 at byte offset",
       http="body malformed JSON: not UTF-8 text (invalid continuation byte 0xe9"),
    _n("overlong_utf8.bin", "invalid UTF-8", NOT_JSON + "not UTF-8 text (invalid start byte 0xc0",
       http="body malformed JSON: not UTF-8 text (invalid start byte 0xc0"),
    _n("utf8_encoded_surrogate.bin", "invalid UTF-8",
       NOT_JSON + "not UTF-8 text (invalid continuation byte 0xed",
       http="body malformed JSON: not UTF-8 text (invalid continuation byte 0xed"),
    _n("utf16.bin", "invalid UTF-8", NOT_JSON + "starts with a UTF-16 byte order mark",
       http="body malformed JSON: not UTF-8 text (invalid start byte 0xff"),
    _n("bom.bin", "BOM", NOT_JSON + "starts with a byte order mark (EF BB BF)",
       http="body malformed JSON: expected value at line 1 column 2"),
    _n("nul_prefix.bin", "control characters", NOT_JSON + "expected value at line 1 column 1",
       http="body malformed JSON: expected value at line 1 column 2"),
    _n("lone_surrogate_escape.json", "invalid UTF-8", NOT_JSON + "unexpected end of hex escape",
       http="body malformed JSON: unexpected end of hex escape"),
    _n("single_quotes.json", "truncated JSON", NOT_JSON + "key must be a string",
       http="body malformed JSON: key must be a string"),
    _n("trailing_comma.json", "truncated JSON", NOT_JSON + "trailing comma",
       http="body malformed JSON: trailing comma"),
    _n("two_objects.json", "truncated JSON", NOT_JSON + "trailing characters at line 2 column 1",
       http="body malformed JSON: expected `,` or `]` at line 2 column 1"),
    _n("comments_in_json.json", "truncated JSON", NOT_JSON + "expected value at line 1 column 1",
       http="body malformed JSON: expected value at line 1 column 2"),
    _n("nested_deep_arrays.json", "deeply nested JSON", NOT_JSON + "recursion limit exceeded",
       http="body malformed JSON: recursion limit exceeded"),
    _n("nested_deep_objects.json", "deeply nested JSON", NOT_JSON + "recursion limit exceeded",
       http="body malformed JSON: recursion limit exceeded"),
    # JSON, but not an event object
    _n("null.json", "null value", "event: must be a JSON object (got null)"),
    _n("top_level_array.json", "JSON array top level", "event: must be a JSON object (got array)"),
    _n("top_level_number.json", "JSON number top level",
       "event: must be a JSON object (got number)"),
    _n("top_level_string.json", "JSON string top level",
       "event: must be a JSON object (got string)"),
    _n("top_level_bool.json", "wrong types", "event: must be a JSON object (got boolean)"),
    _n("empty_object.json", "empty value", "event_type: is required"),
    # numbers
    _n("nan.json", "NaN and infinities", "overall: must be a finite number (got nan)"),
    _n("infinity.json", "NaN and infinities", "overall: must be a finite number (got inf)"),
    _n("number_overflow.json", "NaN and infinities", "overall: must be a finite number (got inf)"),
    _n("negative_infinity_amount.json", "NaN and infinities",
       "invoice_amount: must be a finite number (got -inf)", event_type="visit"),
    _n("huge_integer.json", "negative/huge numbers",
       "recommend: must be less than or equal to 10 (got 999999999999999999999999999999)"),
    _n("negative_recommend.json", "negative/huge numbers",
       "recommend: must be greater than or equal to 0 (got -1)"),
    _n("huge_scale.json", "negative/huge numbers",
       "scale.max: must be less than or equal to 10000"),
    _n("huge_negative_scale.json", "negative/huge numbers",
       "scale.min: must be greater than or equal to -10000"),
    _n("amount_negative.json", "negative/huge numbers",
       "invoice_amount: must be greater than or equal to 0 (got -5)", event_type="visit"),
    _n("amount_huge.json", "negative/huge numbers",
       "invoice_amount: must be less than or equal to 1000000000000 (got 1e+308)",
       event_type="visit"),
    _n("amount_tiny_estimate.json", "negative/huge numbers",
       "estimate_amount: must be 0 or at least 0.001 (got 1e-300)", event_type="visit"),
    _n("audit_weight_huge.json", "negative/huge numbers",
       "items.0.weight: must be less than or equal to 1000000 (got 1.7e+308)",
       event_type="mystery_shop"),
    _n("audit_weight_zero.json", "negative/huge numbers",
       "items.0.weight: must be greater than 0 (got 0)", event_type="mystery_shop"),
    _n("css_expectation_tiny.json", "negative/huge numbers",
       "expectation: must be 0 or at least 0.001 away from 0"),
    _n("rating_out_of_scale.json", "ratings out of scale",
       "ratings.work_quality: must be within the survey scale 1–10 (got 11)"),
    _n("rating_negative.json", "ratings out of scale",
       "ratings.work_quality: must be within the survey scale 1–10 (got -3)"),
    # wrong types
    _n("rating_bool.json", "wrong types",
       "ratings.work_quality: must be a valid number (got true)"),
    _n("wrong_type_bool_as_string.json", "wrong types",
       "appointment: must be a valid boolean (got 'yes')", event_type="visit"),
    _n("wrong_type_int_as_string.json", "wrong types",
       "recommend: must be a valid integer (got '9')"),
    _n("wrong_type_ratings_array.json", "wrong types",
       "ratings: must be a JSON object (got array)"),
    _n("wrong_type_scale_string.json", "wrong types", "scale: must be a JSON object (got string)"),
    _n("wrong_type_float_version.json", "wrong types",
       "schema_version: must be a valid integer (got 1.0)"),
    _n("wrong_type_null_required.json", "null value",
       "channel: must be 'web', 'sms', 'email', 'phone' or 'app' (got null)"),
    _n("dealer_id_number.json", "wrong dealer_id types",
       "dealer_id: must be a valid string (got 1001)", key=b"1001"),
    _n("dealer_id_null.json", "wrong dealer_id types",
       "dealer_id: must be a valid string (got null)", key=None),
    _n("dealer_id_object.json", "wrong dealer_id types",
       "dealer_id: must be a valid string (got object)"),
    _n("dealer_id_array.json", "wrong dealer_id types",
       "dealer_id: must be a valid string (got array)"),
    _n("dealer_id_bad_characters.json", "wrong dealer_id types",
       "dealer_id: must match pattern", key=b"D 001/../etc",
       http="403 cannot submit events for 'D 001/../etc'"),
    _n("dealer_id_too_long.json", "wrong dealer_id types", "dealer_id: must match pattern",
       key=b"D" * 40, http="403 cannot submit events for 'DDDDDDDDDD"),
    _n("dealer_id_empty.json", "wrong dealer_id types", "dealer_id: must match pattern", key=b"",
       http="403 cannot submit events for ''"),
    # envelope and routing (HTTP sets key and topic itself)
    _n("key_mismatch.json", "routing",
       "key: message key 'SOMEONE-ELSE' must equal dealer_id 'NASTY01'", key=b"SOMEONE-ELSE",
       http="accepted"),
    _n("key_missing.json", "routing", "key: message key None must equal dealer_id 'NASTY01'",
       key=None, http="accepted"),
    _n("wrong_topic.json", "routing",
       "event_type: 'visit' arrived on topic 'csi.events.survey', which carries 'survey' events",
       http="accepted"),
    _n("unknown_event_type.json", "unknown event types", "unknown event_type 'gossip'"),
    _n("event_type_wrong_case.json", "unknown event types", "unknown event_type 'Survey'"),
    _n("event_type_number.json", "unknown event types", "unknown event_type 3"),
    _n("event_type_missing.json", "unknown event types", "event_type: is required (supported: "),
    _n("extra_field.json", "extra unknown fields", "utm_source: unknown field, not allowed"),
    _n("extra_field_long_name.json", "extra unknown fields", "…: unknown field, not allowed"),
    _n("missing_field.json", "null value", "customer_ref: is required"),
    _n("customer_ref_phone.json", "wrong types",
       "customer_ref: must be a pseudonymous hash, not PII (it looks like a phone number)"),
    _n("customer_ref_email.json", "wrong types",
       "customer_ref: must be a pseudonymous hash, not PII (it looks like an e-mail address)"),
    # huge strings (the megabyte ones: test_megabyte_payloads)
    _n("comment_too_long.json", "huge strings",
       f"comment: must be at most {MAX_COMMENT_CHARS} characters (got 6000)"),
    _n("visit_id_too_long.json", "huge strings", "visit_id: must have at most 128 characters",
       event_type="visit"),
    _n("rating_code_too_long.json", "huge strings", "ratings: key 'qqqqqqqqqq"),
    # event_id
    _n("event_id_not_uuid.json", "event_id not a UUID",
       "event_id: must be a valid UUID, invalid character"),
    _n("event_id_number.json", "event_id not a UUID", "event_id: must be a UUID string, e.g. "),
    _n("event_id_empty.json", "event_id not a UUID",
       "event_id: must be a valid UUID, invalid length"),
    _n("event_id_nil.json", "event_id not a UUID",
       "event_id: must be a unique id, not the placeholder UUID 00000000-0000-0000-0000-0000"),
    # time
    _n("occurred_at_no_timezone.json", "time zones missing",
       "occurred_at: must be timezone-aware, e.g. 2024-05-01T10:00:00+08:00 "
       "(got '2024-06-30T10:00:00')"),
    _n("occurred_at_date_only.json", "time zones missing", "occurred_at: must be a valid datetime"),
    _n("occurred_at_unix_seconds.json", "wrong types",
       "occurred_at: must be a valid datetime (got 1719712800)"),
    _n("occurred_at_garbage.json", "wrong types", "occurred_at: must be a valid datetime"),
    _n("occurred_at_1969.json", "dates in 1970 and 2100", RANGE),
    _n("occurred_at_1970_east_of_utc.json", "dates in 1970 and 2100", RANGE),
    _n("occurred_at_2100.json", "dates in 1970 and 2100", RANGE),
    _n("occurred_at_year_9999.json", "dates in 1970 and 2100", RANGE),
    _n("occurred_at_future.json", "occurred_at in the future",
       "occurred_at: must be at most 1 day in the future (got 2099-12-31T00:00:00+00:00"),
    _n("occurred_at_leap_second.json", "wrong types", "second value is outside expected range"),
    _n("occurred_at_offset_out_of_range.json", "time zones missing",
       "timezone offset must be less than 24 hours"),
    # schema_version
    _n("schema_version_2.json", "schema_version unknown",
       "schema_version: version 2 is not supported (supported: 1)"),
    _n("schema_version_0.json", "schema_version unknown",
       "schema_version: must be greater than or equal to 1 (got 0)"),
    _n("schema_version_string.json", "schema_version unknown",
       "schema_version: must be a valid integer (got '1')"),
    _n("schema_version_huge.json", "schema_version unknown",
       "schema_version: version 1000000000000000000000000000000 is not supported"),
)  # fmt: skip

BRIEF_CATEGORIES = {
    "truncated JSON", "huge strings", "NaN and infinities", "wrong types",
    "unknown event types", "invalid UTF-8", "time zones missing", "dates in 1970 and 2100",
    "empty value", "null value", "JSON array top level", "JSON number top level",
    "JSON string top level", "deeply nested JSON", "duplicate keys", "BOM",
    "extra unknown fields", "ratings out of scale", "negative/huge numbers",
    "wrong dealer_id types", "control characters", "emoji and Chinese text",
    "event_id not a UUID", "occurred_at in the future", "schema_version unknown",
}  # fmt: skip
"""Issue 7's list ("100 MB payloads": test_megabyte_payloads and the HTTP and e2e tests)."""


def corpus_records(offset: int = 0) -> list[tuple[Nasty, RawRecord]]:
    return [
        (item, RawRecord(item.topic, 0, offset + i, item.key, item.raw))
        for i, item in enumerate(CORPUS)
    ]


def processor(**options: Any) -> DealerProcessor:
    return DealerProcessor(DictStore(), CATALOGUE, clock=lambda: NOW, **options)


# --- what the worker does with a batch's output ---------------------------------------


def ship_like_the_worker(out: BatchOutput, rollups: RollupProcessor) -> None:
    """Serialise `out` as the worker does (pipeline.worker.ship) and read back what it
    reads back: the roll-up updates through JSON into the roll-up processor."""
    for dead_letter in out.dead_letters:
        orjson.dumps(dead_letter.to_message())
    for snapshot in out.snapshots:
        orjson.dumps(snapshot.to_message())
    for alert in out.alerts:
        orjson.dumps(alert.to_message())
    for case in out.cases:
        orjson.dumps(case.to_message())
    for rows in (out.event_rows, [d.to_row() for d in out.dead_letters]):
        if rows:
            encode_columns_json([list(column) for column in zip(*rows, strict=True)])
    updates = [
        RollupUpdate.from_message(orjson.loads(orjson.dumps(update.to_message())))
        for update in out.rollups
    ]
    for update in updates:
        assert all(isinstance(v, float) for v in update.stats.values()), update
    rollups.process([(0, update) for update in updates])


def assert_state_survives_json(dealers: DealerProcessor) -> None:
    """The worker's state goes to its changelog as JSON (Faust's codec is orjson): what
    does not come back equal (a NaN or infinity becomes null) cannot be recovered."""
    assert isinstance(dealers.store, DictStore)
    for key, value in dealers.store.data.items():
        assert orjson.loads(orjson.dumps(value)) == value, key


def assert_accounted(records: list[RawRecord], out: BatchOutput) -> None:
    """Every record is an event, a dead letter (its bytes kept, a reason), or a replay
    of an event counted before (whose row may go out again: the warehouse keeps one
    per event_id): events + dead letters + duplicates = records, nothing lost."""
    stored = [row[11] for row in out.event_rows]  # the source offset
    dead = [d.offset for d in out.dead_letters]
    assert len(stored) == len(set(stored)) and len(dead) == len(set(dead))
    assert not set(stored) & set(dead)
    stored_ids = {str(row[0]) for row in out.event_rows}
    assert len(stored_ids) + len(dead) + out.duplicates == len(records)
    by_offset = {r.offset: r for r in records}
    for dead_letter in out.dead_letters:
        record = by_offset[dead_letter.offset]
        assert dead_letter.raw == record.value
        assert (dead_letter.source_topic, dead_letter.partition) == (record.topic, record.partition)
        assert dead_letter.reason and "\n" not in dead_letter.reason
        assert len(dead_letter.reason) < 2000, dead_letter.reason[:200]
        assert not dead_letter.reason.startswith("internal error"), dead_letter.reason
    for offset in set(by_offset) - set(stored) - set(dead):
        replay = parse_event(by_offset[offset].value, now=NOW)
        assert str(replay.event_id) in stored_ids  # a duplicate of an event stored here


# --- the corpus, broker-free --------------------------------------------------------


def test_the_corpus_is_complete_and_small() -> None:
    files = {path.name for path in CORPUS_DIR.iterdir() if path.suffix in (".json", ".bin")}
    assert files == {item.file for item in CORPUS}
    assert len(files) == len(CORPUS)
    assert {item.category for item in CORPUS} >= BRIEF_CATEGORIES
    assert all((CORPUS_DIR / name).stat().st_size < 32 * 1024 for name in files)


def test_corpus_through_the_stream() -> None:
    records = corpus_records()
    dealers = processor()
    out = dealers.process([record for _, record in records])
    assert_accounted([record for _, record in records], out)
    assert out.duplicates == 0
    rows = {row[11]: row for row in out.event_rows}
    dead = {d.offset: d for d in out.dead_letters}
    for item, record in records:
        if item.expect == STORED:
            assert record.offset in rows, (item.file, dead[record.offset].reason)
            stored = parse_event(rows[record.offset][8], now=NOW)  # the canonical payload
            assert stored == parse_event(record.value, now=NOW), item.file
        else:
            assert record.offset in dead, item.file
            assert item.expect in dead[record.offset].reason, (item.file, item.expect)
            assert dead[record.offset].raw == record.value
            assert dead[record.offset].key == (record.key or b"").decode("utf-8", "replace")
    ship_like_the_worker(out, RollupProcessor(DictStore(), CATALOGUE, clock=lambda: NOW))
    assert_state_survives_json(dealers)


def test_hard_text_is_stored_exactly() -> None:
    """Emoji, Chinese, control characters and escapes reach the warehouse unchanged (a
    comment's phone numbers and e-mail addresses scrubbed); of duplicate keys the last
    one wins, as with Python's json and orjson."""
    records = corpus_records()
    out = processor().process([record for _, record in records])
    payloads = {row[11]: orjson.loads(row[8]) for row in out.event_rows}

    def stored(file: str) -> dict[str, Any]:
        [offset] = [r.offset for item, r in records if item.file == file]
        payload: dict[str, Any] = payloads[offset]
        return payload

    def sent(file: str) -> dict[str, Any]:
        value: dict[str, Any] = json.loads((CORPUS_DIR / file).read_bytes())
        return value

    for file in ("comment_emoji_chinese.json", "comment_control_chars.json"):
        assert stored(file)["comment"] == sent(file)["comment"]
    assert "\x00" in stored("comment_control_chars.json")["comment"]
    assert stored("comment_escaped_surrogate_pair.json")["comment"] == "car 🚗 ok"
    assert stored("comment_pii_chinese.json")["comment"] == "请拨打[phone]或发邮件到 [email] 联系我"
    assert stored("duplicate_keys_last_wins.json")["overall"] == 9
    for file in ("event_id_braces.json", "event_id_urn.json", "event_id_uppercase_no_hyphens.json"):
        canonical = str(uuid.UUID(sent(file)["event_id"]))
        assert stored(file)["event_id"] == canonical  # one spelling: dedup sees one id
    assert stored("occurred_at_1970.json")["occurred_at"] == "1970-01-01T00:00:00Z"


def big_survey(**changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((CORPUS_DIR / "valid_survey.json").read_bytes())
    return {**event, "event_id": str(uuid.uuid4()), **changes}


def padded(event: dict[str, Any], size: int) -> bytes:
    """`event` as JSON of exactly `size` bytes (whitespace inside, still valid)."""
    raw = orjson.dumps(event)
    return raw[:1] + b" " * (size - len(raw)) + raw[1:]


def test_megabyte_payloads() -> None:
    """100 MB and other large inputs: judged at once, without parsing what is too big,
    and the dead letter keeps the very bytes (not a copy)."""
    hundred_mb = b'{"comment": "' + b"x" * (100 * MB) + b'"}'
    cases = [
        (hundred_mb, f"event is larger than {MAX_EVENT_BYTES} bytes (got {len(hundred_mb)} bytes)"),
        (padded(big_survey(), MAX_EVENT_BYTES + 1), f"event is larger than {MAX_EVENT_BYTES}"),
        (orjson.dumps(big_survey(comment="好" * 340_000)), "comment: must be at most 5000"),
        (orjson.dumps(big_survey(comment="x" * (MAX_EVENT_BYTES - 600))), "comment: must be at"),
        (orjson.dumps(big_survey(ratings={f"q{i}": 5 for i in range(80_000)})),
         "ratings: must have at most 200 items"),
        (orjson.dumps(big_survey(**{f"x{i}": 1 for i in range(60_000)})),
         "… and 59990 more errors"),
        (b"[" * MAX_EVENT_BYTES, "not valid JSON: recursion limit exceeded"),
        (orjson.dumps(big_survey()).replace(b'"overall":8', b'"overall":1' + b"0" * 900_000),
         "not valid JSON: number out of range"),
        (padded(big_survey(), MAX_EVENT_BYTES), STORED),  # whitespace is allowed
    ]  # fmt: skip
    records = [
        RawRecord(topic("survey"), 0, i, DEALER.encode(), raw) for i, (raw, _) in enumerate(cases)
    ]
    started = time.perf_counter()
    out = processor().process(records)
    assert time.perf_counter() - started < 10  # ~1 s: sizes are checked before parsing
    assert_accounted(records, out)
    dead = {d.offset: d for d in out.dead_letters}
    for record, (_, expect) in zip(records, cases, strict=True):
        if expect == STORED:
            assert record.offset not in dead, dead[record.offset].reason
        else:
            assert expect in dead[record.offset].reason, (expect, dead[record.offset].reason)
            assert dead[record.offset].raw is record.value


PRODUCER_MAX_REQUEST = 1_000_000
"""Faust's default producer_max_request_size: the worker cannot send a bigger record."""


def test_every_dead_letter_fits_on_the_dead_letter_topic() -> None:
    """The worker sends each dead letter to csi.dead_letters as one record: whatever
    was rejected, that record must stay under the producer's limit (the warehouse row
    keeps every byte) and its reason must stay readable."""
    valid = (CORPUS_DIR / "valid_survey.json").read_bytes()
    near_limit = orjson.dumps(big_survey(comment="x" * (BROKER_MAX_VALUE - 1000)))
    records = [
        RawRecord(topic("survey"), 0, 0, DEALER.encode(), b"x" * (100 * MB)),
        RawRecord(topic("survey"), 0, 1, DEALER.encode(), near_limit),
        RawRecord(topic("survey"), 0, 2, b"K" * 500_000, valid),  # a key as big as a record
    ]
    out = processor().process(records)
    assert len(out.dead_letters) == len(records)
    for dead_letter, record in zip(out.dead_letters, records, strict=True):
        assert dead_letter.raw is record.value  # the warehouse row keeps them all
        assert len(dead_letter.reason) < 2000
        message = orjson.dumps(dead_letter.to_message())
        assert len(message) + len(dead_letter.key.encode()) < PRODUCER_MAX_REQUEST


def test_an_old_first_complaint_is_not_a_stall() -> None:
    visit = (CORPUS_DIR / "valid_visit.json").read_bytes()
    complaint = json.loads((CORPUS_DIR / "valid_complaint.json").read_bytes())
    complaint |= {"status": "opened", "satisfied_after": None, "complaint_id": "OLD-1"}
    complaint["occurred_at"] = "2021-06-30T10:00:00+08:00"  # three years back
    records = [
        RawRecord(topic("visit"), 0, 0, DEALER.encode(), visit),
        RawRecord(topic("complaint"), 0, 1, DEALER.encode(), orjson.dumps(complaint)),
    ]
    out = processor().process(records)
    assert len(out.event_rows) == 2  # a valid complaint: stored, counted in the backlog
    rolled = RollupProcessor(DictStore(), CATALOGUE, clock=lambda: NOW).process(
        [(0, update) for update in out.rollups]
    )
    # a window's worth of days per kind of window, not every day since 2021
    assert len(out.snapshots) < 1000, len(out.snapshots)  # 5485 re-emitted
    assert len(rolled.snapshots) < 3000, len(rolled.snapshots)  # 16455


@pytest.mark.parametrize(
    "comment",
    ["plate" + " " * 9990 + "!", "reg" + " " * 9990 + "!", "Reg" + " " * 4000 + "no" + " " * 5000],
    ids=["plate", "reg", "reg-no"],
)
def test_long_comments_are_scrubbed_in_linear_time(comment: str) -> None:
    """Scrubbing number plates was quadratic after "plate"/"reg" and a run of spaces:
    ~2 s for one 10 000-character comment, ~30 minutes for a batch of 1000."""
    started = time.perf_counter()
    with pytest.raises(InvalidEvent, match="comment: must be at most 5000"):
        parse_event(orjson.dumps(big_survey(comment=comment)), now=NOW)
    parse_event(orjson.dumps(big_survey(comment=comment[:4990])), now=NOW)
    assert time.perf_counter() - started < 0.5


# --- hypothesis: arbitrary bytes, mutated events --------------------------------------


def _base_events() -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for item in CORPUS:
        if item.file.startswith("valid_"):
            events.append(json.loads(item.raw))
    return events


BASE_EVENTS = _base_events()
FIELDS = sorted({name for event in BASE_EVENTS for name in event} | {"department", "expectation"})

NASTY_STRINGS = [
    "", " ", "\x00", "\ufeff", "\ud800", "好", "👍🏽", "NASTY01", "D002", "survey", "visit",
    "call", "complaint", "mystery_shop", "opened", "closed", "reached", "no_answer",
    "pass", "fail", "na", "service", "sales", "web", "sms", "dms",
    # no valid date years back: see test_an_old_first_complaint_is_not_a_stall
    "2024-06-30T10:00:00+08:00", "2024-06-30T10:00:00", "1969-12-31T23:59:59Z",
    "2100-01-01T00:00:00Z", "2099-12-31T00:00:00Z",
    "9999-12-31T23:59:59Z", "0001-01-01T00:00:00Z", "2024-06-30", "2024-02-30T00:00:00Z",
    "00000000-0000-0000-0000-000000000000", "urn:uuid:6b1f3c2e-58a4-4d7e-9c1a-0f2e3d4c5b6a",
    "plate" + " " * 500, "13812345678", "a@b.cc",
]  # fmt: skip

nasty_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(),  # NaN, ±inf, subnormals, ±1.7e308
    st.sampled_from([0, 1, -1, 0.0, -0.0, 5e-324, 1e-300, 1.7e308, 1e12, 2**63, 2**64, 10**30]),
    st.text(max_size=30),
    st.sampled_from(NASTY_STRINGS),
)
nasty_values = st.recursive(
    nasty_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
# Scales, ratings and audit items, mutated inside.
nested_values = st.one_of(
    st.fixed_dictionaries({"min": nasty_scalars, "max": nasty_scalars}),
    st.dictionaries(
        st.sampled_from(["work_quality", "booking_ease", "q1", "", "a.b", "x" * 70]),
        nasty_scalars,
        max_size=4,
    ),
    st.lists(
        st.fixed_dictionaries(
            {
                "code": st.sampled_from(["a", "b", "a"]),
                "section": st.sampled_from(["s", "t"]),
                "weight": nasty_scalars,
                "result": st.sampled_from(["pass", "fail", "na", "maybe"]),
            }
        ),
        max_size=4,
    ),
)


# Numbers at the edges: what the metrics divide by, multiply or sum must stay finite.
EXTREMES = [
    0, 1, -1, 0.0, -0.0, 5e-324, -5e-324, 1e-300, 0.001, 0.0009, 1e6, 1e6 + 1, 1e12,
    1e12 + 1, 1.7e308, -1.7e308, 10_000, -10_000, 10_001, 2**53 + 1, 2**63, 2**64,
    10**30, -(10**30), 10**400, -(10**400),
]  # fmt: skip
extreme_numbers = st.one_of(
    st.sampled_from([5e-324, -5e-324, 1.7e308, -1.7e308, 10**400]),
    st.sampled_from([5e-324, -5e-324, 1.7e308, -1.7e308, 10**400]),
    st.sampled_from(EXTREMES),
    st.floats(),
    st.integers(),
)


Path_ = tuple[str | int, ...]


def number_paths(value: object, path: Path_ = ()) -> Iterator[Path_]:
    """Where `value` holds a number (not a bool)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from number_paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from number_paths(item, (*path, index))
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield path


def replaced(value: Any, path: Path_, new: object) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: replaced(value[head], rest, new)}
    copy = list(value)
    copy[int(head)] = replaced(copy[int(head)], rest, new)
    return copy


@st.composite
def mutated_events(draw: st.DrawFn) -> tuple[str, bytes | None, bytes]:
    """(topic, key, value): a valid event with fields deleted, replaced or added, numbers
    pushed to their limits (a scale widened so that its answers stay valid), in JSON
    that may use NaN / Infinity, be cut short or start with a byte order mark."""
    event: dict[str, Any] = dict(draw(st.sampled_from(BASE_EVENTS)))
    event["event_id"] = str(uuid.UUID(int=draw(st.integers(1, 2**128 - 2))))
    if event["event_type"] == "survey" and draw(st.booleans()):
        event |= {"perception": 9, "expectation": 8}  # the CSS ratio divides them
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from([*FIELDS, "extra"]))
        action = draw(st.sampled_from(["delete", "set", "nested", "scale", *["number"] * 4]))
        paths = list(number_paths(event))
        if action == "delete":
            event.pop(name, None)
        elif action == "set":
            event[name] = draw(nasty_values)
        elif action == "nested":
            event[name] = draw(nested_values)
        elif action == "number" and paths:  # one number, or the same one twice, to the edge
            value = draw(extreme_numbers)
            for path in {draw(st.sampled_from(paths)), draw(st.sampled_from(paths))}:
                event = replaced(event, path, value)
        elif action == "scale":  # wider, so that the answers stay on it
            bound = draw(st.sampled_from([10, 10_000, 10_001, 10**6, 10**400, 10**400]))
            event["scale"] = {"min": draw(st.sampled_from([0, -bound])), "max": bound}
    raw = json.dumps(event, ensure_ascii=draw(st.booleans()), allow_nan=True).encode(
        "utf-8", "surrogatepass"
    )
    damage = draw(st.sampled_from(["none"] * 6 + ["truncate", "bom", "latin-1"]))
    if damage == "truncate":
        raw = raw[: draw(st.integers(0, max(len(raw) - 1, 0)))]
    elif damage == "bom":
        raw = b"\xef\xbb\xbf" + raw
    elif damage == "latin-1":
        raw = raw.replace("好".encode(), b"\xe9")
    event_type = event.get("event_type")
    chosen = event_type if isinstance(event_type, str) and event_type in EVENT_TOPICS else "survey"
    dealer = event.get("dealer_id")
    key = dealer.encode("utf-8", "surrogatepass") if isinstance(dealer, str) else None
    if draw(st.integers(0, 9)) == 0:
        key = draw(st.sampled_from([None, b"", b"D002", b"\xff"]))
    return topic(chosen), key, raw


any_record = st.one_of(
    mutated_events(),
    st.tuples(st.sampled_from([topic(t) for t in EVENT_TOPICS]), st.just(b"NASTY01"), st.binary()),
    st.tuples(  # a valid event as it is: a second one is a replay
        st.just(topic("survey")),
        st.just(b"NASTY01"),
        st.just((CORPUS_DIR / "valid_survey.json").read_bytes()),
    ),
)


@settings(
    max_examples=int(os.environ.get("NASTY_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(any_record, min_size=1, max_size=12))
def test_fuzzed_batches_never_raise_and_account_for_every_record(
    batch: list[tuple[str, bytes | None, bytes]],
) -> None:
    records = [RawRecord(t, 0, offset, key, value) for offset, (t, key, value) in enumerate(batch)]
    dealers = processor()
    out = dealers.process(records)
    assert_accounted(records, out)
    ship_like_the_worker(out, RollupProcessor(DictStore(), CATALOGUE, clock=lambda: NOW))
    assert_state_survives_json(dealers)


EDGES: tuple[object, ...] = (
    0, -0.0, 5e-324, -5e-324, 1e-300, 0.001, 1.5, 1e12, 1.7e308, -1.7e308,
    10_000, -10_000, 10**400, -(10**400),
)  # fmt: skip


@st.composite
def events_at_the_edges(draw: st.DrawFn) -> bytes:
    """A valid event with one number, two, or every number of one name (every audit
    weight, every rating) pushed to an edge; a survey also gets perception, expectation
    (the CSS ratio divides them) and a scale from 0."""
    event: dict[str, Any] = dict(draw(st.sampled_from(BASE_EVENTS)))
    event["event_id"] = str(uuid.UUID(int=draw(st.integers(1, 2**128 - 2))))
    if event["event_type"] == "survey":
        event |= {"perception": 9, "expectation": 8, "scale": {"min": 0, "max": 10}}
    paths = [path for path in number_paths(event) if path != ("schema_version",)]
    by_name: dict[str | int, list[tuple[str | int, ...]]] = {}
    for path in paths:
        by_name.setdefault(path[-1] if isinstance(path[-1], str) else path[0], []).append(path)
    mode = draw(st.sampled_from(["one", "two", "every"]))
    if mode == "every":
        value = draw(st.sampled_from(EDGES))
        for path in by_name[draw(st.sampled_from(sorted(by_name, key=str)))]:
            event = replaced(event, path, value)
    else:
        for _ in range(1 if mode == "one" else 2):
            event = replaced(event, draw(st.sampled_from(paths)), draw(st.sampled_from(EDGES)))
    return json.dumps(event).encode()


@settings(
    max_examples=int(os.environ.get("NASTY_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(events_at_the_edges(), min_size=1, max_size=8))
def test_numbers_at_the_edges_keep_every_statistic_finite(batch: list[bytes]) -> None:
    """What validation accepts, the metrics can sum, multiply and divide: a scale of
    10**400 used to raise OverflowError in the worker, and 412.5 / 5e-324 (an invoice
    over an estimate), 9 / 5e-324 (perception over expectation) or two audit weights of
    1.7e308 made an infinity that the roll-up topic and the changelog carry as null."""
    records = [
        RawRecord(topic(str(json.loads(raw)["event_type"])), 0, i, DEALER.encode(), raw)
        for i, raw in enumerate(batch)
    ]
    dealers = processor()
    out = dealers.process(records)
    assert_accounted(records, out)
    ship_like_the_worker(out, RollupProcessor(DictStore(), CATALOGUE, clock=lambda: NOW))
    assert_state_survives_json(dealers)


# --- HTTP: csi serve-http ---------------------------------------------------------------

Client = TestClient[web.Request, web.Application]


class RecordingSink:
    """An EventSink that keeps what it is sent."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, event: dict[str, Any]) -> None:
        self.sent.append(event)

    def flush(self, timeout: float | None = None) -> None:
        pass


@dataclass
class Http:
    app: web.Application
    sink: RecordingSink
    tokens: dict[str, str]

    def headers(self, dealer: str = DEALER) -> dict[str, str]:
        token = self.tokens.get(dealer, self.tokens[DEALER])
        return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def tokens() -> tuple[KeyStore, dict[str, str]]:
    keys = KeyStore()
    return keys, {dealer: keys.add(dealer)[1] for dealer in (DEALER, "NASTY1970")}


@pytest.fixture
def http(tokens: tuple[KeyStore, dict[str, str]]) -> Http:
    keys, by_dealer = tokens
    sink = RecordingSink()
    return Http(make_app(keys, sink, limits=Limits(), clock=lambda: NOW), sink, by_dealer)


def run_client(app: web.Application, scenario: Any) -> Any:
    async def main() -> Any:
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            return await scenario(client)

    return asyncio.run(main())


async def post(client: Client, headers: dict[str, str], data: Any) -> tuple[int, Any]:
    async with client.post("/v1/events", headers=headers, data=data) as response:
        return response.status, await response.json()


def test_corpus_through_http_one_request_each(http: Http) -> None:
    """Each item as a one-event batch: its own result, with the stream's reason; bytes
    that cannot be an element of a JSON array make the whole body 400 instead."""

    async def scenario(client: Client) -> list[tuple[int, Any]]:
        return [
            await post(client, http.headers((item.key or b"").decode()), b"[" + item.raw + b"]")
            for item in CORPUS
        ]

    for item, (status, body) in zip(CORPUS, run_client(http.app, scenario), strict=True):
        expect = item.http or ("accepted" if item.expect == STORED else f"400 {item.expect}")
        if expect.startswith("body "):
            assert status == 400 and "results" not in body, (item.file, body)
            assert expect.removeprefix("body ") in body["error"]["reason"], (item.file, body)
            continue
        [result] = body["results"]
        if expect == "accepted":
            assert (status, result["status"]) == (202, "accepted"), (item.file, body)
            continue
        code, fragment = expect.split(" ", 1)
        assert status == int(code) and result["error"]["code"] == int(code), (item.file, body)
        assert fragment in result["error"]["reason"], (item.file, fragment, body)
        assert (body["accepted"], body["rejected"]) == (0, 1)


def test_corpus_through_http_in_one_batch(http: Http) -> None:
    """Every corpus item that is JSON in one request: one result each, in order; the
    accepted ones, and only they, reach Kafka, canonical and valid."""
    items = [item for item in CORPUS if not (item.http or "").startswith("body ")]
    items = [item for item in items if item.key != b"NASTY1970"]  # another dealer's key
    body = b"[" + b",".join(item.raw for item in items) + b"]"

    async def scenario(client: Client) -> tuple[int, Any]:
        return await post(client, http.headers(), body)

    status, reply = run_client(http.app, scenario)
    assert status == 202
    results = reply["results"]
    assert [r["index"] for r in results] == list(range(len(items)))
    accepted = [item for item, r in zip(items, results, strict=True) if r["status"] == "accepted"]
    assert [i.file for i in accepted] == [
        i.file for i in items if i.expect == STORED or i.http == "accepted"
    ]
    assert reply["accepted"] + reply["rejected"] == len(items)
    assert len(http.sink.sent) == len(accepted)
    for sent in http.sink.sent:
        parse_event(orjson.dumps(sent), now=NOW)


@pytest.mark.parametrize("framing", ["content-length", "chunked", "unknown key"])
def test_a_100_mb_body_is_refused_before_it_is_read(http: Http, framing: str) -> None:
    """413 at once for a declared length over the limit, 413 after the first 5 MB of a
    chunked one (aiohttp's client_max_size), 401 before anything for a bad key: the
    client had produced a few of its hundred 1 MB chunks when the answer came."""
    produced = [0]

    async def hundred_mb() -> AsyncIterator[bytes]:
        chunk = b" " * MB
        for _ in range(100):
            produced[0] += 1
            yield chunk

    headers = http.headers()
    if framing != "chunked":
        headers["Content-Length"] = str(100 * MB)
    if framing == "unknown key":
        headers["Authorization"] = "Bearer csi_000000000000_" + "A" * 43

    async def scenario(client: Client) -> tuple[int, Any, float, int]:
        started = time.perf_counter()
        async with client.post("/v1/events", headers=headers, data=hundred_mb()) as response:
            elapsed, read_by_then = time.perf_counter() - started, produced[0]
            return response.status, await response.json(), elapsed, read_by_then

    status, body, elapsed, chunks = run_client(http.app, scenario)
    if framing == "unknown key":
        assert status == 401, body
    else:
        assert status == 413, body
        assert body["error"]["reason"].startswith(f"body is larger than {MAX_BODY_BYTES} bytes")
    assert elapsed < 5, elapsed
    assert chunks < 30, chunks  # not read to the end
    assert http.sink.sent == []


def test_an_event_over_the_event_limit_is_413_in_its_batch(http: Http) -> None:
    """Under the body limit but over the event limit once re-encoded: that event is 413
    and the others go through; whitespace does not count (it is re-encoded compactly)."""
    too_big = orjson.dumps(big_survey(comment="x" * (MAX_EVENT_BYTES + 1)))
    roomy = padded(big_survey(), 2 * MB)  # 2 MB of JSON, 500 bytes of event
    valid = orjson.dumps(big_survey())
    body = b"[" + b",".join([too_big, roomy, valid, too_big]) + b"]"
    assert len(body) < MAX_BODY_BYTES

    async def scenario(client: Client) -> tuple[int, Any]:
        return await post(client, http.headers(), body)

    status, reply = run_client(http.app, scenario)
    assert status == 202
    codes = [r.get("error", {}).get("code", r["status"]) for r in reply["results"]]
    assert codes == [413, "accepted", "accepted", 413]
    assert reply["results"][0]["error"]["reason"].startswith(
        f"event is larger than {MAX_EVENT_BYTES} bytes (got "
    )
    assert len(http.sink.sent) == 2


# --- end to end: embedded broker, csi worker, chdb -----------------------------------


WORKER_DEAD_LETTER_MAX = 740_000
"""About the largest rejected record the worker can put on csi.dead_letters: it carries
the bytes in base64 (4/3 of them) in a record that Faust's producer caps at 1 000 000."""


def csi(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        capture_output=True, timeout=120, env=env, check=True,
    )  # fmt: skip


def query(warehouse: str, sql: str) -> list[dict[str, Any]]:
    out = csi("query", "--warehouse", warehouse, "--format", "json", sql).stdout
    return [orjson.loads(line) for line in out.splitlines() if line.strip()]


@dataclass(frozen=True)
class Produced:
    what: str
    expect: str  # STORED or a reason fragment
    value: bytes


Where = tuple[str, int, int]  # topic, partition, offset


def produce(
    bootstrap: str, records: list[tuple[str, bytes | None, Produced]]
) -> dict[Where, Produced]:
    """Send raw bytes in order (kafka-python, acks=all); where each one landed."""
    from kafka import KafkaProducer

    producer = KafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=2 * MB,
        enable_idempotence=False, allow_auto_create_topics=False,
    )  # fmt: skip
    try:
        futures = [(producer.send(t, value=p.value, key=k), p) for t, k, p in records]
        landed = [(future.get(timeout=30), record) for future, record in futures]
    finally:
        producer.close(timeout=10)
    return {(meta.topic, meta.partition, meta.offset): record for meta, record in landed}


def run_worker(bootstrap: str, group: str, expected: int, env: dict[str, str], log: Path) -> float:
    """`csi worker` until it has committed `expected` input records (at most 60 s), then a
    graceful stop; it must neither die nor stall, nor crash an agent; returns seconds."""
    from pipeline.runner import ProgressReader

    started = time.monotonic()
    with open(log, "ab") as output:
        worker = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "worker"], env=env, stdout=output, stderr=output
        )
        reader = ProgressReader(bootstrap, group)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and worker.poll() is None:
                progress = reader.poll()
                if progress.processed >= expected and not progress.rollups_behind:
                    break
                time.sleep(0.5)
            assert worker.poll() is None, f"the worker died:\n{log.read_text()[-3000:]}"
            assert progress.produced == expected
            assert progress.processed == expected, f"stalled:\n{log.read_text()[-3000:]}"
        finally:
            reader.close()
            stop_worker(worker)
    text = log.read_text(errors="replace")
    assert worker.returncode == 0, text[-3000:]
    assert "Crashed" not in text and "Traceback" not in text, text[-3000:]
    return time.monotonic() - started


@dataclass
class Accounts:
    events: int
    dead_letters: int
    replays: int
    dead_by_what: dict[str, dict[str, Any]]


def account(warehouse: str, produced: dict[Where, Produced]) -> Accounts:
    """Every produced record is an event row, a dead letter with its bytes and the
    expected reason, or a replay of a stored event; each event is stored once."""
    rows = query(
        warehouse, "SELECT toString(event_id) AS id, topic, partition, offset FROM csi.events"
    )
    final = query(warehouse, "SELECT toString(event_id) AS id FROM csi.events FINAL")
    dead = query(
        warehouse,
        "SELECT dead_letter_id, source_topic, partition, offset, reason, raw_b64 "
        "FROM csi.dead_letters FINAL",
    )
    stored_at = {(r["topic"], r["partition"], r["offset"]): r for r in rows}
    dead_at = {(d["source_topic"], d["partition"], d["offset"]): d for d in dead}
    stored_ids = {r["id"] for r in rows}
    assert not set(stored_at) & set(dead_at)
    assert set(stored_at) | set(dead_at) <= set(produced)
    lost, missing_replays = [], 0
    for where, record in produced.items():
        if where in dead_at:
            letter = dead_at[where]
            assert record.expect != STORED, (record.what, letter["reason"])
            assert record.expect in letter["reason"], (record.what, letter["reason"])
            assert base64.b64decode(letter["raw_b64"]) == record.value, record.what
        elif where in stored_at:
            assert record.expect == STORED, record.what
            assert stored_at[where]["id"] == str(parse_event(record.value).event_id)
        elif record.expect == STORED and str(parse_event(record.value).event_id) in stored_ids:
            missing_replays += 1  # a replay, counted once
        else:
            lost.append(record.what)
    assert lost == []
    assert len(final) == len({r["id"] for r in final}) == len(stored_ids)  # each event once
    replays = len(stored_at) - len(stored_ids) + missing_replays  # their rows go out again, or not
    assert len(final) + len(dead) + replays == len(produced)
    dead_by_what = {produced[where].what: letter for where, letter in dead_at.items()}
    return Accounts(len(final), len(dead), replays, dead_by_what)


def worker_env(broker: Any, tmp_path: Path) -> tuple[str, str, dict[str, str]]:
    warehouse = f"chdb://{tmp_path / 'warehouse'}"
    group = f"csi-nasty-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ, "CSI_BOOTSTRAP": broker.bootstrap, "CSI_WAREHOUSE": warehouse,
        "CSI_DATA_DIR": str(tmp_path), "CSI_APP_ID": group, "CSI_FETCH_HOLD_MS": "200",
    }  # fmt: skip
    env.pop("CSI_REGISTRY", None)
    return warehouse, group, env


def valid_records(days: int, seed: int) -> list[tuple[str, bytes | None, Produced]]:
    from pipeline.simulator import simulate
    from pipeline.topics import topic_for

    events = simulate(2, days, end=datetime.now(UTC).date(), seed=seed)
    return [
        (topic_for(e["event_type"]), e["dealer_id"].encode(), Produced("valid", STORED, raw))
        for e in events
        for raw in [orjson.dumps(e)]
    ]


@pytest.mark.integration
def test_nasty_inputs_end_to_end(broker: Any, tmp_path: Path) -> None:
    """The corpus, megabyte payloads and valid events through the embedded broker and
    `csi worker` into chdb: no crash, no stall, every record accounted for; then an
    operator fixes a dead letter and replays it with `csi dlq`."""
    from kafka import KafkaProducer
    from kafka.errors import MessageSizeTooLargeError

    valid = valid_records(3, seed=5)
    replay = (valid[3][0], valid[3][1], Produced("replay", STORED, valid[3][2].value))
    largest_dead = orjson.dumps(big_survey(comment="x" * (WORKER_DEAD_LETTER_MAX - 1000)))
    records = [
        *valid[: len(valid) // 2],
        *((item.topic, item.key, Produced(item.file, item.expect, item.raw)) for item in CORPUS),
        (topic("survey"), DEALER.encode(), Produced("comment of 739 000 characters",
         "comment: must be at most 5000 characters (got 739000)", largest_dead)),
        (topic("survey"), DEALER.encode(), Produced("padded to the broker's limit", STORED,
         padded(big_survey(), BROKER_MAX_VALUE - 100))),
        *valid[len(valid) // 2 :],
        replay,
    ]  # fmt: skip
    produced = produce(broker.bootstrap, records)
    # 100 MB: kafka-python refuses it itself (over its max_request_size); 3 MB with a
    # producer that allows it: the broker refuses it (message.max.bytes). Neither is sent.
    with KafkaProducer(
        bootstrap_servers=broker.bootstrap, acks="all", max_request_size=4 * MB,
        enable_idempotence=False, allow_auto_create_topics=False,
    ) as producer:  # fmt: skip
        with pytest.raises(MessageSizeTooLargeError, match="max_request_size"):
            producer.send(topic("survey"), value=b" " * (100 * MB), key=DEALER.encode())
        with pytest.raises(MessageSizeTooLargeError):
            producer.send(topic("survey"), value=padded(big_survey(), 3 * MB)).get(timeout=30)

    warehouse, group, env = worker_env(broker, tmp_path)
    log = tmp_path / "worker.log"
    seconds = run_worker(broker.bootstrap, group, len(produced), env, log)
    accounts = account(warehouse, produced)
    expected_events = sum(p.expect == STORED and p.what != "replay" for p in produced.values())
    expected_dead = sum(p.expect != STORED for p in produced.values())
    assert (accounts.events, accounts.dead_letters, accounts.replays) == (
        expected_events, expected_dead, 1,
    )  # fmt: skip

    # The operator: list, show, correct and replay one dead letter.
    listed = csi("dlq", "list", "--warehouse", warehouse, "--format", "json", "--limit", "1000")
    assert len(listed.stdout.splitlines()) == expected_dead
    assert f"{expected_dead} dead letter(s)" in listed.stderr.decode()
    utf8 = accounts.dead_by_what["invalid_utf8.bin"]["dead_letter_id"]
    shown = csi("dlq", "show", utf8, "--warehouse", warehouse).stdout.decode()
    assert "not valid UTF-8" in shown and "not UTF-8 text" in shown
    no_zone = accounts.dead_by_what["occurred_at_no_timezone.json"]["dead_letter_id"]
    fixed = json.loads((CORPUS_DIR / "occurred_at_no_timezone.json").read_bytes())
    fixed["occurred_at"] += "+08:00"
    (tmp_path / "fix.json").write_bytes(orjson.dumps(fixed))
    csi(
        "dlq", "replay", no_zone, "--fix", str(tmp_path / "fix.json"),
        "--bootstrap", broker.bootstrap, "--warehouse", warehouse,
    )  # fmt: skip
    seconds += run_worker(broker.bootstrap, group, len(produced) + 1, env, log)
    [replayed] = query(
        warehouse,
        f"SELECT toString(occurred_at) AS at FROM csi.events FINAL WHERE event_id = "
        f"'{fixed['event_id']}'",
    )
    assert replayed["at"].startswith("2024-06-30 02:00:00")
    print(
        f"end to end: {len(produced)} records in, {accounts.events} events, "
        f"{accounts.dead_letters} dead letters, {accounts.replays} replay, 0 lost; "
        f"then 1 dead letter fixed and replayed; worker {seconds:.1f} s"
    )


@pytest.mark.integration
def test_a_rejected_record_near_the_broker_limit_does_not_stop_the_worker(
    broker: Any, tmp_path: Path
) -> None:
    near_limit = orjson.dumps(big_survey(comment="x" * (BROKER_MAX_VALUE - 1000)))
    assert BROKER_MAX_VALUE - 1000 < len(near_limit) <= BROKER_MAX_VALUE
    records = [
        (topic("survey"), DEALER.encode(), Produced("near the broker's limit",
         "comment: must be at most 5000 characters (got 1047512)", near_limit)),
        *valid_records(2, seed=6),  # after it: a crashed agent would leave them unread
    ]  # fmt: skip
    produced = produce(broker.bootstrap, records)
    warehouse, group, env = worker_env(broker, tmp_path)
    run_worker(broker.bootstrap, group, len(produced), env, tmp_path / "worker.log")
    accounts = account(warehouse, produced)
    assert (accounts.events, accounts.dead_letters) == (len(produced) - 1, 1)
