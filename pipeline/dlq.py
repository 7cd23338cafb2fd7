"""`csi dlq list|show|replay`: inspect, fix and replay dead letters.

The worker keeps every message it rejects in `csi.dead_letters` with its exact
bytes (`raw_b64`), where it came from and why it was rejected. This module reads
them back (always with FINAL: the table is a ReplacingMergeTree), checks their
bytes again with the worker's own validation (`DealerProcessor.validate`, so
today's schemas and dealer registry decide), and puts them back on the topic
they came from — as they are, or replaced by a corrected event.

Replaying is safe: the worker deduplicates events by `event_id` (and case
actions by `action_id`), so a record sent twice, or one that had in fact been
counted, is counted once. A replayed dead letter stays in the table; if the
worker rejects it again, it is dead-lettered again under its new offset.

`register(sub)` adds the `dlq` command to `csi`'s parser; each action's function
takes the parsed arguments and returns an exit status, and raises ValueError (or
a WarehouseError / ProduceError) for anything the operator must fix, which
`pipeline.cli.main` prints as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import base64
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson

from pipeline.catalogue import Catalogue
from pipeline.config import Settings
from pipeline.registry import DealerRegistry
from pipeline.topics import CASE_ACTIONS, EVENT_TOPICS
from pipeline.warehouse import (
    DEAD_LETTERS_TABLE,
    Warehouse,
    WarehouseLockedError,
    open_warehouse,
    quote_identifier,
    quote_table,
)

FIX_ID_FIELD = "_dead_letter_id"
"""The field of a `--fix` line naming the dead letter it corrects; removed before sending."""

REASON_CLASS_CHARS = 60
"""Longest reason class; a longer one (no field path in front) is shortened."""

LIST_REASON_CHARS = 80
"""How much of a reason `csi dlq list` shows in its table."""

DEFAULT_LIMIT = 50

REPLAYABLE_TOPICS: frozenset[str] = frozenset(
    {spec.name for spec in EVENT_TOPICS.values()} | {CASE_ACTIONS.name}
)
"""The topics the worker reads: the only ones a dead letter can be replayed to."""

_LIST_COLUMNS = (
    "dead_letter_id", "received_at", "source_topic", "partition", "offset", "key", "reason",
)  # fmt: skip
_FULL_COLUMNS = (*_LIST_COLUMNS, "raw_b64")


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class DeadLetterRecord:
    """One row of `csi.dead_letters` as read back; `raw` is empty when not fetched."""

    dead_letter_id: str
    received_at: datetime
    source_topic: str
    partition: int
    offset: int
    key: str
    reason: str
    raw: bytes = b""

    @property
    def reason_class(self) -> str:
        return reason_class(self.reason)

    def to_json(self, *, with_raw: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dead_letter_id": self.dead_letter_id,
            "received_at": self.received_at.isoformat(),
            "source_topic": self.source_topic,
            "partition": self.partition,
            "offset": self.offset,
            "key": self.key,
            "reason_class": self.reason_class,
            "reason": self.reason,
        }
        if with_raw:
            out["raw_b64"] = base64.b64encode(self.raw).decode("ascii")
        return out


def reason_class(reason: str) -> str:
    """What a reason is about: its field path ("ratings.q1", "occurred_at", "key"),
    i.e. the part before the first ':', else the whole reason, shortened if long.

    >>> reason_class("occurred_at: too late: 2026-01-02 is more than 35 days before ...")
    'occurred_at'
    >>> reason_class("unknown event_type 'foo'")
    "unknown event_type 'foo'"
    """
    head, sep, _ = reason.partition(":")
    head = head.strip()
    if sep and head and len(head) <= REASON_CLASS_CHARS:
        return head
    return shorten(reason.strip(), REASON_CLASS_CHARS) or "(no reason)"


def shorten(text: str, limit: int) -> str:
    """`text` on one line, at most `limit` characters (an ellipsis marks a cut)."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _utc(value: Any) -> datetime:
    """A DateTime64(3, 'UTC') value from either backend, as an aware UTC datetime."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise TypeError(f"expected a datetime, got {value!r}")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _record(columns: Sequence[str], row: Sequence[Any]) -> DeadLetterRecord:
    values = dict(zip(columns, row, strict=True))
    raw_b64 = values.get("raw_b64")
    return DeadLetterRecord(
        dead_letter_id=str(values["dead_letter_id"]),
        received_at=_utc(values["received_at"]),
        source_topic=str(values["source_topic"]),
        partition=int(values["partition"]),
        offset=int(values["offset"]),
        key=str(values["key"]),
        reason=str(values["reason"]),
        raw=base64.b64decode(raw_b64) if raw_b64 else b"",
    )


# --------------------------------------------------------------------------- queries


_SQL_ESCAPES = str.maketrans(
    {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\0": "\\0"}
)


def sql_string(text: str) -> str:
    """A ClickHouse string literal holding exactly `text`."""
    return "'" + text.translate(_SQL_ESCAPES) + "'"


def parse_since(text: str) -> datetime:
    """`--since`: an ISO 8601 date or date-time; without a zone it is UTC."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"--since {text!r}: expected an ISO 8601 date or time, e.g. 2026-05-01 or "
            "2026-05-01T08:00:00+02:00"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def topic_name(text: str) -> str:
    """`--topic`: a topic name, or an event type ("survey") for its topic."""
    return EVENT_TOPICS[text].name if text in EVENT_TOPICS else text


@dataclass(frozen=True)
class Selection:
    """Which dead letters: all of them, these ids, or those matching the filters."""

    ids: tuple[str, ...] = ()
    reason: str | None = None
    topic: str | None = None
    since: datetime | None = None

    def where(self) -> str:
        conditions: list[str] = []
        if self.ids:
            conditions.append(f"dead_letter_id IN ({', '.join(sql_string(i) for i in self.ids)})")
        if self.reason:
            conditions.append(f"positionCaseInsensitiveUTF8(reason, {sql_string(self.reason)}) > 0")
        if self.topic:
            conditions.append(f"source_topic = {sql_string(self.topic)}")
        if self.since is not None:
            moment = self.since.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
            conditions.append(f"received_at >= toDateTime64({sql_string(moment)}, 3, 'UTC')")
        return " WHERE " + " AND ".join(conditions) if conditions else ""


def fetch_dead_letters(
    warehouse: Warehouse,
    selection: Selection,
    *,
    newest_first: bool = True,
    limit: int | None = None,
    with_raw: bool = True,
) -> list[DeadLetterRecord]:
    """The dead letters `selection` picks, newest first (or oldest first)."""
    columns = _FULL_COLUMNS if with_raw else _LIST_COLUMNS
    direction = "DESC" if newest_first else "ASC"
    sql = (
        f"SELECT {', '.join(quote_identifier(c) for c in columns)} "
        f"FROM {quote_table(DEAD_LETTERS_TABLE)} FINAL{selection.where()} "
        f"ORDER BY received_at {direction}, source_topic {direction}, "
        f"`partition` {direction}, `offset` {direction}"
        + (f" LIMIT {int(limit)}" if limit is not None else "")
    )
    names, rows = warehouse.query(sql)
    return [_record(names, row) for row in rows]


def count_by_class(warehouse: Warehouse, selection: Selection) -> Counter[str]:
    """How many dead letters `selection` picks, by reason class."""
    _, rows = warehouse.query(
        f"SELECT reason, count() AS n FROM {quote_table(DEAD_LETTERS_TABLE)} FINAL"
        f"{selection.where()} GROUP BY reason"
    )
    counts: Counter[str] = Counter()
    for reason, n in rows:
        counts[reason_class(str(reason))] += int(n)
    return counts


def fetch_by_ids(warehouse: Warehouse, ids: Sequence[str]) -> list[DeadLetterRecord]:
    """The dead letters with these ids, in the order given; ValueError naming any unknown."""
    wanted = list(dict.fromkeys(ids))
    found = {r.dead_letter_id: r for r in fetch_dead_letters(warehouse, Selection(tuple(wanted)))}
    missing = [i for i in wanted if i not in found]
    if missing:
        names = ", ".join(repr(i) for i in missing)
        raise ValueError(
            f"no dead letter with id {names} (ids are TOPIC:PARTITION:OFFSET; see `csi dlq list`)"
        )
    return [found[i] for i in wanted]


def open_dlq_warehouse(url: str) -> Warehouse:
    """`open_warehouse`, explaining the usual cause of a locked chdb data dir."""
    try:
        return open_warehouse(url)
    except WarehouseLockedError as exc:
        raise WarehouseLockedError(
            f"cannot read dead letters from {url}: the chdb warehouse is owned by a running "
            "worker (`csi worker` / `csi run`), and only one process can own a chdb data dir. "
            "Read it through a ClickHouse server (--warehouse clickhouse://HOST:PORT/DB) or "
            f"stop the worker first. ({exc})"
        ) from exc


# --------------------------------------------------------------------------- re-validation


@dataclass(frozen=True)
class Verdict:
    """Today's judgement of some bytes destined for a topic."""

    valid: bool
    reason: str = ""
    """Why not, when not valid."""
    what: str = ""
    """What the bytes are when valid, e.g. "survey event 1f0e… of dealer D001"."""
    replayable: bool = True
    """False when the topic is not one the worker reads: nothing can be sent there."""
    note: str = ""
    """What re-validation cannot tell (lateness, a case's state)."""

    def describe(self) -> str:
        text = f"valid now: {self.what}" if self.valid else f"still invalid: {self.reason}"
        return text + (f" (note: {self.note})" if self.note else "")


def dealer_key(raw: bytes, original_key: str) -> bytes | None:
    """The key to replay with: the event's dealer_id, else the original key (None if empty)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("dealer_id"), str) and data["dealer_id"]:
        return str(data["dealer_id"]).encode("utf-8")
    return original_key.encode("utf-8") if original_key else None


def revalidate(
    topic: str,
    raw: bytes,
    key: bytes | None,
    *,
    registry: DealerRegistry | None = None,
    original_reason: str = "",
    now: datetime | None = None,
) -> Verdict:
    """Judge `raw`, sent to `topic` with `key`, with the worker's own validation now.

    Checks what a message alone can show: the schemas, the event type against
    the topic, the key against dealer_id and, with a registry, the dealer. Not
    lateness or a case's state, which depend on the worker's state (`note`).
    """
    from pipeline.stream import DealerProcessor, DictStore, RawRecord
    from schemas import InvalidEvent, parse_event
    from schemas.cases import parse_case_action

    moment = now or datetime.now(UTC)
    if topic not in REPLAYABLE_TOPICS:
        # e.g. '' for a `csi load` line without a known event_type: judge the bytes anyway
        cannot = (
            f"source topic {topic!r} is not a topic the worker reads, so it cannot be replayed "
            "(a dead letter of `csi load`? correct the file and load it again)"
        )
        try:
            event = parse_event(raw, now=moment)
        except InvalidEvent as exc:
            try:
                action = parse_case_action(raw)
            except InvalidEvent:
                return Verdict(False, exc.reason, replayable=False, note=cannot)
            return Verdict(True, what=_case_what(action), replayable=False, note=cannot)
        return Verdict(True, what=_event_what(event), replayable=False, note=cannot)
    record = RawRecord(topic, 0, 0, key, raw)
    processor = DealerProcessor(DictStore(), _catalogue(), registry=registry, clock=lambda: moment)
    try:
        if topic == CASE_ACTIONS.name:
            action = processor.validate_case_action(record)
            return Verdict(
                True, what=_case_what(action),
                note="the worker checks the action against the case's state when it arrives",
            )  # fmt: skip
        event = processor.validate(record)
    except InvalidEvent as exc:
        return Verdict(False, exc.reason)
    note = ""
    if original_reason.startswith("occurred_at: too late"):
        note = (
            "lateness is judged against the dealer's newest event in the worker's state; "
            "the worker may reject it as too late again"
        )
    elif registry is None:
        note = "no dealer registry given (--registry or CSI_REGISTRY): dealer not checked"
    return Verdict(True, what=_event_what(event), note=note)


@lru_cache(maxsize=1)
def _catalogue() -> Catalogue:
    """The questionnaire `DealerProcessor` wants (validation itself does not use it)."""
    from pipeline.catalogue import load_catalogue

    return load_catalogue()


def _event_what(event: Any) -> str:
    return f"{event.event_type} event {event.event_id} of dealer {event.dealer_id}"


def _case_what(action: Any) -> str:
    return f"case action {action.action} {action.case_id} ({action.action_id})"


# --------------------------------------------------------------------------- rendering


def hex_dump(data: bytes, width: int = 16) -> str:
    """`hexdump -C`-style lines: offset, bytes in hex, printable ASCII."""
    lines = []
    for start in range(0, len(data), width):
        chunk = data[start : start + width]
        hex_part = " ".join(f"{b:02x}" for b in chunk).ljust(width * 3 - 1)
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        lines.append(f"{start:08x}  {hex_part}  |{text}|")
    return "\n".join(lines) or "(no bytes)"


def render_raw(raw: bytes) -> list[str]:
    """The raw bytes for a person: UTF-8 text (else a hex dump), then indented JSON."""
    try:
        text: str | None = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = None
        lines = [f"raw ({len(raw)} bytes, not valid UTF-8: {exc.reason} at byte {exc.start}):"]
        lines.append(hex_dump(raw))
    else:
        lines = [f"raw ({len(raw)} bytes, UTF-8 text):", text if text else "(empty)"]
    if text is not None:
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            lines.append("(not valid JSON)")
        else:
            lines += ["", "as JSON:", orjson.dumps(parsed, option=orjson.OPT_INDENT_2).decode()]
    return lines


def render_record(record: DeadLetterRecord, verdict: Verdict, checked_with: str) -> str:
    key = dealer_key(record.raw, record.key)
    shown_key = key.decode("utf-8", "replace") if key else "(none)"
    if not verdict.replayable:
        replay = "cannot be replayed (see the note)"
    elif verdict.valid:
        replay = (
            f"`csi dlq replay {record.dead_letter_id}` would send it to {record.source_topic} "
            f"with key {shown_key}"
        )
    else:
        replay = (
            f"replay would refuse it: correct it with `csi dlq replay {record.dead_letter_id} "
            f"--fix FILE` (it goes to {record.source_topic}, keyed by its dealer_id)"
        )
    lines = [
        f"dead letter  {record.dead_letter_id}",
        f"received at  {record.received_at.isoformat()}",
        f"from         topic {record.source_topic!r}, partition {record.partition}, "
        f"offset {record.offset}, key {record.key!r}",
        f"reason       {record.reason}",
        f"class        {record.reason_class}",
        "",
        *render_raw(record.raw),
        "",
        f"re-validated now ({checked_with}):",
        f"  {verdict.describe()}",
        f"  {replay}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- fixes


def load_fixes(path: str, ids: Sequence[str]) -> dict[str, bytes]:
    """Corrected bytes by dead_letter_id from a `--fix` file.

    JSON lines, each an object naming the dead letter it corrects in
    `_dead_letter_id` (removed before sending); or, with exactly one id, one JSON
    object (which may span lines) for that id.
    """
    content = Path(path).read_bytes()
    if len(ids) == 1:
        try:
            whole = orjson.loads(content)
        except orjson.JSONDecodeError:
            whole = None
        if isinstance(whole, dict):
            named = whole.pop(FIX_ID_FIELD, ids[0])
            if named != ids[0]:
                raise ValueError(f"--fix {path}: {FIX_ID_FIELD} is {named!r}, not {ids[0]!r}")
            return {ids[0]: orjson.dumps(whole)}
    fixes: dict[str, bytes] = {}
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"--fix {path}:{number}"
        try:
            data = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a JSON object (a corrected event)")
        dead_letter_id = data.pop(FIX_ID_FIELD, None)
        if not isinstance(dead_letter_id, str) or not dead_letter_id:
            raise ValueError(
                f"{where}: no {FIX_ID_FIELD} naming the dead letter this line corrects"
            )
        if dead_letter_id in fixes:
            raise ValueError(f"{where}: a second correction for {dead_letter_id}")
        fixes[dead_letter_id] = orjson.dumps(data)
    if not fixes:
        raise ValueError(f"--fix {path}: no corrected events in it")
    return fixes


# --------------------------------------------------------------------------- commands


def _warehouse_url(args: argparse.Namespace) -> str:
    return args.warehouse or f"chdb://{Path(args.data_dir) / 'warehouse'}"


def _registry(args: argparse.Namespace) -> tuple[DealerRegistry | None, str]:
    from pipeline.registry import load_registry

    path = args.registry or Settings().registry
    if not path:
        return None, "no dealer registry"
    return load_registry(path), f"registry {path}"


def _filters(args: argparse.Namespace) -> Selection:
    limit = getattr(args, "limit", None)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1 (got {limit})")
    return Selection(
        reason=args.reason or None,
        topic=topic_name(args.topic) if args.topic else None,
        since=parse_since(args.since) if args.since else None,
    )


def cmd_dlq_list(args: argparse.Namespace) -> int:
    """Dead letters, newest first, and how many there are by reason class."""
    selection = _filters(args)
    warehouse = open_dlq_warehouse(_warehouse_url(args))
    try:
        records = fetch_dead_letters(warehouse, selection, limit=args.limit, with_raw=False)
        counts = count_by_class(warehouse, selection)
    finally:
        warehouse.close()
    total = sum(counts.values())
    by_class = ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=_by_count))
    summary = f"{total} dead letter(s)" + (f"; by reason: {by_class}" if by_class else "")
    if len(records) < total:
        summary += f" (showing the newest {len(records)}; --limit N for more)"
    if args.format == "json":
        for record in records:
            sys.stdout.buffer.write(orjson.dumps(record.to_json()) + b"\n")
        sys.stdout.flush()
        print(summary, file=sys.stderr)
        return 0
    from pipeline.cli import format_table

    columns = ("received_at", "dead_letter_id", "source_topic", "key", "reason")
    rows = [
        (f"{r.received_at:%Y-%m-%d %H:%M:%S}", r.dead_letter_id, r.source_topic, r.key,
         shorten(r.reason, LIST_REASON_CHARS))
        for r in records
    ]  # fmt: skip
    if rows:
        print(format_table(columns, rows))
    print(summary)
    return 0


def _by_count(item: tuple[str, int]) -> tuple[int, str]:
    return -item[1], item[0]


def cmd_dlq_show(args: argparse.Namespace) -> int:
    """One dead letter in full, and what validation says about its bytes today."""
    registry, checked_with = _registry(args)
    warehouse = open_dlq_warehouse(_warehouse_url(args))
    try:
        [record] = fetch_by_ids(warehouse, [args.id])
    finally:
        warehouse.close()
    key = dealer_key(record.raw, record.key)
    verdict = revalidate(
        record.source_topic, record.raw, key, registry=registry, original_reason=record.reason
    )
    print(render_record(record, verdict, checked_with))
    return 0


@dataclass(frozen=True)
class Replay:
    """One dead letter on its way back: the bytes to send, their key and verdict."""

    record: DeadLetterRecord
    value: bytes
    key: bytes | None
    fixed: bool
    verdict: Verdict

    def line(self, prefix: str) -> str:
        key = self.key.decode("utf-8", "replace") if self.key is not None else "(none)"
        how = "corrected" if self.fixed else "as received"
        return (
            f"{prefix} {self.record.dead_letter_id} -> {self.record.source_topic} key {key} "
            f"({len(self.value)} bytes, {how}): {self.verdict.describe()}"
        )


def plan_replays(
    records: Iterable[DeadLetterRecord],
    fixes: dict[str, bytes],
    *,
    registry: DealerRegistry | None = None,
    now: datetime | None = None,
) -> list[Replay]:
    """What replaying `records` (with `fixes` replacing raw bytes) would send, judged now."""
    moment = now or datetime.now(UTC)
    plans = []
    for record in records:
        fixed = record.dead_letter_id in fixes
        value = fixes.get(record.dead_letter_id, record.raw)
        key = dealer_key(value, record.key)
        verdict = revalidate(
            record.source_topic, value, key, registry=registry,
            original_reason=record.reason, now=moment,
        )  # fmt: skip
        plans.append(Replay(record, value, key, fixed, verdict))
    return plans


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    """Re-validate dead letters (optionally corrected) and produce them to their topic."""
    chosen = [bool(args.ids), bool(args.reason), bool(args.all)]
    if sum(chosen) > 1:
        raise ValueError(
            "csi dlq replay: give dead letter ids, --reason TEXT or --all, not several"
        )
    if sum(chosen) == 0 and not args.fix:
        raise ValueError(
            "csi dlq replay: which dead letters? give ids, --reason TEXT, --all, or --fix FILE"
        )
    if (args.topic or args.since) and not (args.reason or args.all):
        raise ValueError("--topic and --since narrow --reason or --all")
    fixes = load_fixes(args.fix, args.ids) if args.fix else {}
    registry, _ = _registry(args)
    warehouse = open_dlq_warehouse(_warehouse_url(args))
    try:
        if args.ids or not (args.reason or args.all):
            records = fetch_by_ids(warehouse, args.ids or list(fixes))
        else:
            records = fetch_dead_letters(warehouse, _filters(args), newest_first=False)
    finally:
        warehouse.close()
    strays = sorted(set(fixes) - {r.dead_letter_id for r in records})
    if strays:
        raise ValueError(
            f"--fix {args.fix}: corrections for dead letters not selected: {', '.join(strays)}"
        )
    plans = plan_replays(records, fixes, registry=registry)
    to_send: list[Replay] = []
    refused = 0
    for plan in plans:
        if not plan.verdict.replayable:
            refused += 1
            print(plan.line("cannot replay"), file=sys.stderr)
        elif plan.verdict.valid or args.force:
            to_send.append(plan)
        else:
            refused += 1
            print(
                plan.line("refused")
                + " -- correct it with --fix FILE, or --force to send it anyway",
                file=sys.stderr,
            )
    if args.dry_run:
        for plan in to_send:
            print(plan.line("would send"))
        print(
            f"csi dlq replay (dry run): {len(to_send)} would be sent, {refused} refused, "
            f"of {len(plans)} dead letter(s)",
            file=sys.stderr,
        )
        return 1 if refused else 0
    if to_send:
        _produce(args.bootstrap or Settings().bootstrap, to_send)
        for plan in to_send:
            print(plan.line("sent" if plan.verdict.valid else "sent (forced)"))
    print(
        f"csi dlq replay: {len(to_send)} sent, {refused} refused, of {len(plans)} dead letter(s)",
        file=sys.stderr,
    )
    return 1 if refused else 0


def _produce(bootstrap: str, plans: Sequence[Replay]) -> None:
    """Send every plan's bytes to its original topic and wait for the broker's acks."""
    from kafka.errors import KafkaError

    from pipeline.producer import EventProducer, ProduceError

    try:
        producer = EventProducer(bootstrap)
    except KafkaError as exc:
        raise ProduceError(len(plans), exc) from exc
    with producer:
        for plan in plans:
            producer.send_raw(plan.record.source_topic, plan.value, plan.key)
        producer.flush(timeout=30)


# --------------------------------------------------------------------------- the parser


def _add_warehouse_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default=".csi")
    parser.add_argument("--warehouse", help="URL; default chdb://DATA_DIR/warehouse")


def _add_filter_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", metavar="TEXT", help="only reasons containing TEXT (any case)")
    parser.add_argument(
        "--topic", metavar="T", help="only from this source topic (or event type, e.g. survey)"
    )
    parser.add_argument(
        "--since", metavar="ISO", help="only received at or after this time (UTC if no zone)"
    )


def _add_registry_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--registry", help="dealer registry CSV to check dealers against (default $CSI_REGISTRY)"
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `csi dlq list|show|replay` to `csi`'s subcommands."""
    dlq = sub.add_parser(
        "dlq",
        help="dead letters: list them, show one, replay them (corrected) to their topic",
        description=(
            "Inspect, fix and replay the messages the worker rejected (csi.dead_letters)."
        ),
    )
    actions = dlq.add_subparsers(dest="dlq_command", required=True)

    listing = actions.add_parser(
        "list", help="dead letters, newest first, with counts by reason class"
    )
    _add_filter_args(listing)
    listing.add_argument(
        "--limit", type=int, default=DEFAULT_LIMIT, help=f"at most N rows (default {DEFAULT_LIMIT})"
    )
    listing.add_argument(
        "--format", choices=("table", "json"), default="table", help="json: one object a line"
    )
    _add_warehouse_args(listing)
    listing.set_defaults(func=cmd_dlq_list)

    show = actions.add_parser(
        "show", help="one dead letter in full, and whether its bytes are valid today"
    )
    show.add_argument("id", metavar="ID", help="dead_letter_id, TOPIC:PARTITION:OFFSET")
    _add_registry_arg(show)
    _add_warehouse_args(show)
    show.set_defaults(func=cmd_dlq_show)

    replay = actions.add_parser(
        "replay",
        help="re-validate dead letters and produce them to their original topic",
        description=(
            "Re-validate the chosen dead letters (their bytes as received, or the corrected "
            "events of --fix) and produce the valid ones to the topic they came from, keyed by "
            "dealer_id. Anything still invalid is refused (exit status 1) unless --force. "
            "Replaying is safe: the worker deduplicates by event_id (case actions by "
            "action_id), so an event replayed twice, or one already counted, counts once."
        ),
    )
    replay.add_argument("ids", nargs="*", metavar="ID", help="dead_letter_id(s)")
    replay.add_argument("--all", action="store_true", help="every dead letter (with the filters)")
    _add_filter_args(replay)
    replay.add_argument(
        "--fix", metavar="FILE",
        help=f"corrected events: JSON lines, each naming its dead letter in {FIX_ID_FIELD} "
        "(removed before sending); with one ID, a JSON file holding the corrected event",
    )  # fmt: skip
    replay.add_argument(
        "--force", action="store_true", help="send even what still fails validation"
    )
    replay.add_argument("--dry-run", action="store_true", help="only report what would be sent")
    replay.add_argument("--bootstrap", help="Kafka bootstrap servers (CSI_BOOTSTRAP)")
    _add_registry_arg(replay)
    _add_warehouse_args(replay)
    replay.set_defaults(func=cmd_dlq_replay)
