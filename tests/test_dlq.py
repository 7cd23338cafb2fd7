"""`csi dlq list|show|replay` against a chdb warehouse holding the dead letters the
stream's own `DealerProcessor` produced; replay sends to the real embedded broker.

The commands run in-process through a parser built with `pipeline.dlq.register`;
`run` turns the errors `pipeline.cli.main` reports (ValueError, WarehouseError, …)
into its exit status 2 and one `csi: …` line, as `main` does.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka import KafkaConsumer
from kafka.structs import TopicPartition

from pipeline.broker import EmbeddedBroker
from pipeline.catalogue import load_catalogue
from pipeline.dlq import hex_dump, reason_class, register, revalidate, sql_string
from pipeline.producer import ProduceError
from pipeline.registry import Dealer, DealerRegistry, RegistryError, write_registry
from pipeline.simulator import simulate
from pipeline.stream import DealerProcessor, DictStore, RawRecord
from pipeline.topics import ALL_TOPICS, EVENT_TOPICS
from pipeline.warehouse import SinkSet, WarehouseError, create_schema, open_warehouse
from tests.test_warehouse import held_data_dir

SURVEY = EVENT_TOPICS["survey"].name
VISIT = EVENT_TOPICS["visit"].name
CALL = EVENT_TOPICS["call"].name
COMPLAINT = EVENT_TOPICS["complaint"].name
RECEIVED = datetime(2026, 5, 11, 10, 0, tzinfo=UTC)
NOWHERE = "127.0.0.1:1"  # no broker: proves that nothing is even attempted


def dealer(dealer_id: str) -> Dealer:
    return Dealer(dealer_id, f"Dealer {dealer_id}", "North", "Brand", "Group")


@dataclass(frozen=True)
class Letters:
    """The warehouse and what went into it."""

    url: str
    survey_d001: dict[str, Any]  # its ratings.test_drive is 11 on a 1-10 scale
    ids: dict[str, str]  # name → dead_letter_id


def _first(events: list[dict[str, Any]], event_type: str, dealer_id: str) -> dict[str, Any]:
    """A copy of the dealer's first event of that type."""
    return copy.deepcopy(
        next(e for e in events if e["event_type"] == event_type and e["dealer_id"] == dealer_id)
    )


@pytest.fixture(scope="module")
def letters(tmp_path_factory: pytest.TempPathFactory) -> Letters:
    events = list(simulate(2, 4, end=date(2026, 5, 10), seed=7))
    bad_d001 = _first(events, "survey", "D001")
    bad_d001["ratings"] = {**bad_d001["ratings"], "test_drive": 11}
    bad_d002 = _first(events, "survey", "D002")
    bad_d002["ratings"] = {**bad_d002["ratings"], "test_drive": 0}
    naive = {**_first(events, "visit", "D001"), "occurred_at": "2026-05-09T08:00:00"}
    unknown = {**_first(events, "survey", "D002"), "dealer_id": "D009"}
    records = [  # (name, record), received a minute apart in this order
        ("survey_d001", RawRecord(SURVEY, 1, 10, b"D001", orjson.dumps(bad_d001))),
        ("survey_d002", RawRecord(SURVEY, 2, 11, b"D002", orjson.dumps(bad_d002))),
        ("naive_visit", RawRecord(VISIT, 2, 5, b"D001", orjson.dumps(naive))),
        ("broken_json", RawRecord(CALL, 0, 7, b"D002", b'{"event_type": "call", oops')),
        ("not_utf8", RawRecord(COMPLAINT, 3, 1, b"D001", b'\xff\xfe{"event_type": 1}')),
        ("unknown_dealer", RawRecord(SURVEY, 0, 3, b"D009", orjson.dumps(unknown))),
        ("valid", RawRecord(VISIT, 0, 1, b"D002", orjson.dumps(_first(events, "visit", "D002")))),
    ]
    now = [RECEIVED]
    processor = DealerProcessor(
        DictStore(), load_catalogue(), registry=DealerRegistry([dealer("D001"), dealer("D002")]),
        clock=lambda: now[0],
    )  # fmt: skip
    url = f"chdb://{tmp_path_factory.mktemp('dlq') / 'warehouse'}"
    warehouse = open_warehouse(url)
    try:
        create_schema(warehouse)
        sinks = SinkSet(warehouse)
        for minute, (_, record) in enumerate(records):
            now[0] = RECEIVED + timedelta(minutes=minute)
            out = processor.process([record])
            sinks.dead_letters.write([dead.to_row() for dead in out.dead_letters])
        sinks.flush_all()
    finally:
        warehouse.close()
    ids = {name: f"{r.topic}:{r.partition}:{r.offset}" for name, r in records}
    return Letters(url, bad_d001, ids)


@pytest.fixture(autouse=True)
def no_registry_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CSI_REGISTRY", raising=False)


def parser() -> argparse.ArgumentParser:
    built = argparse.ArgumentParser(prog="csi")
    register(built.add_subparsers(dest="command", required=True))
    return built


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`csi dlq ARGV…`: exit status, stdout, stderr."""
    args = parser().parse_args(["dlq", *argv])
    try:
        status = int(args.func(args))
    except (ValueError, OSError, WarehouseError, ProduceError, RegistryError) as exc:
        print(f"csi: {exc}", file=sys.stderr)  # what pipeline.cli.main does
        status = 2
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ------------------------------------------------------------------------------ list


def test_list_shows_newest_first_with_reasons_and_counts(
    letters: Letters, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run(capsys, "list", "--warehouse", letters.url)
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == ["received_at", "dead_letter_id", "source_topic", "key", "reason"]
    shown = [line.split()[2] for line in lines[2:8]]
    names = ["unknown_dealer", "not_utf8", "broken_json", "naive_visit", "survey_d002"]
    assert shown == [letters.ids[n] for n in [*names, "survey_d001"]]
    assert letters.ids["valid"] not in out
    row = {line.split()[2]: line for line in lines[2:8]}
    assert "2026-05-11 10:05:00" in row[letters.ids["unknown_dealer"]]
    assert "dealer_id: 'D009' is not in the dealer registry" in row[letters.ids["unknown_dealer"]]
    assert "occurred_at: must be timezone-aware" in row[letters.ids["naive_visit"]]
    assert lines[8] == "(6 rows)"
    assert lines[9] == (
        "6 dead letter(s); by reason: not valid JSON 2, ratings.test_drive 2, dealer_id 1, "
        "occurred_at 1"
    )


def test_list_filters_limit_and_json(letters: Letters, capsys: pytest.CaptureFixture[str]) -> None:
    def listed(*argv: str) -> list[dict[str, Any]]:
        status, out, err = run(
            capsys, "list", "--warehouse", letters.url, "--format", "json", *argv
        )
        assert status == 0, err
        return [orjson.loads(line) for line in out.splitlines()]

    everything = listed()
    assert [r["dead_letter_id"] for r in everything][-1] == letters.ids["survey_d001"]
    first = everything[-1]
    assert first["source_topic"] == SURVEY
    assert (first["partition"], first["offset"], first["key"]) == (1, 10, "D001")
    assert first["reason_class"] == "ratings.test_drive"
    assert first["reason"].startswith("ratings.test_drive: must be")
    assert datetime.fromisoformat(first["received_at"]) == RECEIVED

    assert [r["dead_letter_id"] for r in listed("--reason", "TIMEZONE")] == [
        letters.ids["naive_visit"]
    ]
    assert {r["dead_letter_id"] for r in listed("--topic", "survey")} == {
        letters.ids[n] for n in ("survey_d001", "survey_d002", "unknown_dealer")
    }
    assert listed("--topic", SURVEY) == listed("--topic", "survey")
    assert [r["dead_letter_id"] for r in listed("--since", "2026-05-11T12:04:00+02:00")] == [
        letters.ids["unknown_dealer"], letters.ids["not_utf8"],
    ]  # fmt: skip
    assert listed("--reason", "it's \\ '; DROP TABLE csi.dead_letters") == []

    status, out, err = run(capsys, "list", "--warehouse", letters.url, "--limit", "2")
    assert status == 0
    assert "(2 rows)" in out
    assert "6 dead letter(s);" in out and "(showing the newest 2; --limit N for more)" in out
    status, _, err = run(capsys, "list", "--warehouse", letters.url, "--since", "yesterday")
    assert status == 2 and "--since 'yesterday': expected an ISO 8601 date" in err


# ------------------------------------------------------------------------------ show


def test_show_prints_the_record_its_raw_json_and_todays_verdict(
    letters: Letters, capsys: pytest.CaptureFixture[str]
) -> None:
    dead_id = letters.ids["survey_d001"]
    status, out, _ = run(capsys, "show", dead_id, "--warehouse", letters.url)
    assert status == 0
    assert f"dead letter  {dead_id}" in out
    assert f"from         topic '{SURVEY}', partition 1, offset 10, key 'D001'" in out
    assert "reason       ratings.test_drive: must be" in out
    assert orjson.dumps(letters.survey_d001).decode() in out.splitlines()  # the exact text
    assert orjson.dumps(letters.survey_d001, option=orjson.OPT_INDENT_2).decode() in out
    assert "re-validated now (no dealer registry):" in out
    assert "  still invalid: ratings.test_drive: must be" in out
    assert f"replay would refuse it: correct it with `csi dlq replay {dead_id} --fix FILE`" in out


def test_show_hex_dumps_bytes_that_are_not_utf8(
    letters: Letters, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run(capsys, "show", letters.ids["not_utf8"], "--warehouse", letters.url)
    assert status == 0
    assert "raw (19 bytes, not valid UTF-8: invalid start byte at byte 0):" in out
    assert '00000000  ff fe 7b 22 65 76 65 6e 74 5f 74 79 70 65 22 3a  |..{"event_type":|' in out
    assert "  still invalid: " in out
    status, out, _ = run(capsys, "show", letters.ids["broken_json"], "--warehouse", letters.url)
    assert '{"event_type": "call", oops\n(not valid JSON)' in out
    assert "  still invalid: not valid JSON" in out


def test_show_is_valid_now_after_a_registry_change(
    letters: Letters, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead_id = letters.ids["unknown_dealer"]
    write_registry([dealer("D001"), dealer("D002")], tmp_path / "before.csv")
    write_registry([dealer("D001"), dealer("D002"), dealer("D009")], tmp_path / "after.csv")
    show = ("show", dead_id, "--warehouse", letters.url, "--registry")
    status, out, _ = run(capsys, *show, str(tmp_path / "before.csv"))
    assert status == 0
    assert f"re-validated now (registry {tmp_path / 'before.csv'}):" in out
    assert "  still invalid: dealer_id: 'D009' is not in the dealer registry" in out
    status, out, _ = run(capsys, *show, str(tmp_path / "after.csv"))
    assert status == 0
    assert "  valid now: survey event " in out and " of dealer D009" in out
    assert f"`csi dlq replay {dead_id}` would send it to {SURVEY} with key D009" in out


def test_unknown_id_is_exit_2_with_a_clear_message(
    letters: Letters, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, "show", "csi.events.survey:9:999", "--warehouse", letters.url)
    assert (status, out) == (2, "")
    assert "csi: no dead letter with id 'csi.events.survey:9:999'" in err
    assert "see `csi dlq list`" in err
    status, out, err = run(
        capsys, "replay", letters.ids["survey_d001"], "nope", "--warehouse", letters.url,
        "--bootstrap", NOWHERE,
    )  # fmt: skip
    assert (status, out) == (2, "")
    assert "no dead letter with id 'nope'" in err


# ------------------------------------------------------------------------------ replay


def test_replay_dry_run_reports_and_sends_nothing(
    letters: Letters, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead_id = letters.ids["survey_d001"]
    fixed = {**letters.survey_d001, "ratings": {**letters.survey_d001["ratings"], "test_drive": 9}}
    fix = tmp_path / "fix.json"  # one id: a plain (indented) JSON file
    fix.write_bytes(orjson.dumps(fixed, option=orjson.OPT_INDENT_2))
    status, out, err = run(
        capsys, "replay", dead_id, "--fix", str(fix), "--dry-run", "--warehouse", letters.url,
        "--bootstrap", NOWHERE,
    )  # fmt: skip
    assert status == 0, err
    assert out.startswith(
        f"would send {dead_id} -> {SURVEY} key D001 ({len(orjson.dumps(fixed))} bytes, corrected):"
        f" valid now: survey event {fixed['event_id']} of dealer D001"
    )
    assert "1 would be sent, 0 refused, of 1 dead letter(s)" in err

    status, out, err = run(
        capsys, "replay", "--reason", "test_drive", "--dry-run", "--warehouse", letters.url
    )
    assert (status, out) == (1, "")
    assert err.count("refused ") == 2 and "still invalid: ratings.test_drive" in err
    assert "0 would be sent, 2 refused, of 2 dead letter(s)" in err


def test_replay_refuses_what_is_still_invalid(
    letters: Letters, capsys: pytest.CaptureFixture[str]
) -> None:
    dead_id = letters.ids["naive_visit"]
    # no broker at NOWHERE: a send would fail with exit status 2
    status, out, err = run(capsys, "replay", dead_id, "--warehouse", letters.url,
                           "--bootstrap", NOWHERE)  # fmt: skip
    assert (status, out) == (1, "")
    assert f"refused {dead_id} -> {VISIT} key D001" in err
    assert "still invalid: occurred_at: must be timezone-aware" in err
    assert "-- correct it with --fix FILE, or --force to send it anyway" in err
    assert "0 sent, 1 refused, of 1 dead letter(s)" in err

    status, out, err = run(capsys, "replay", dead_id, "--force", "--dry-run",
                           "--warehouse", letters.url)  # fmt: skip
    assert status == 0
    assert out.startswith(f"would send {dead_id} -> {VISIT} key D001 (")
    assert "still invalid: occurred_at: must be timezone-aware" in out


def test_a_dead_letter_from_no_topic_cannot_be_replayed() -> None:
    # `csi load` dead-letters a line without a known event_type on topic ''
    verdict = revalidate("", b'{"event_type": "nope"}', None)
    assert not verdict.valid and not verdict.replayable
    assert verdict.reason == "unknown event_type 'nope'"
    assert "is not a topic the worker reads, so it cannot be replayed" in verdict.note


def test_replay_selection_and_fix_file_mistakes_are_exit_2(
    letters: Letters, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ("--warehouse", letters.url, "--dry-run")
    no_id = tmp_path / "no_id.jsonl"
    no_id.write_bytes(b'{"event_type": "survey"}\n{"event_type": "visit"}\n')
    stray = tmp_path / "stray.jsonl"
    stray.write_bytes(orjson.dumps({"_dead_letter_id": letters.ids["broken_json"]}) + b"\n")
    for argv, message in [
        ((), "which dead letters?"),
        (("--all", "--reason", "x"), "not several"),
        (("--fix", str(no_id)), f"--fix {no_id}:1: no _dead_letter_id naming the dead letter"),
        (
            (letters.ids["survey_d001"], letters.ids["naive_visit"], "--fix", str(stray)),
            f"corrections for dead letters not selected: {letters.ids['broken_json']}",
        ),
        (("--fix", str(tmp_path / "missing.jsonl")), "No such file"),
    ]:
        status, out, err = run(capsys, "replay", *argv, *base)
        assert (status, out) == (2, ""), argv
        assert message in err, (argv, err)


@pytest.mark.integration
def test_replay_with_fix_sends_the_corrected_event_to_the_original_topic(
    letters: Letters, broker: EmbeddedBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fixed_id, refused_id = letters.ids["survey_d001"], letters.ids["naive_visit"]
    fixed = {**letters.survey_d001, "ratings": {**letters.survey_d001["ratings"], "test_drive": 9}}
    fix = tmp_path / "fixes.jsonl"
    fix.write_bytes(orjson.dumps({"_dead_letter_id": fixed_id, **fixed}) + b"\n")
    status, out, err = run(
        capsys, "replay", fixed_id, refused_id, "--fix", str(fix), "--warehouse", letters.url,
        "--bootstrap", broker.bootstrap,
    )  # fmt: skip
    assert status == 1  # one refused
    expected = orjson.dumps(fixed)
    assert out == (
        f"sent {fixed_id} -> {SURVEY} key D001 ({len(expected)} bytes, corrected): "
        f"valid now: survey event {fixed['event_id']} of dealer D001 (note: no dealer registry "
        "given (--registry or CSI_REGISTRY): dealer not checked)\n"
    )
    assert f"refused {refused_id}" in err and "1 sent, 1 refused, of 2 dead letter(s)" in err

    records = read_all(broker.bootstrap)
    assert records == [(SURVEY, b"D001", expected)]


def read_all(bootstrap: str) -> list[tuple[str, bytes | None, bytes]]:
    """Every record on every topic, from the beginning."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        partitions = [
            TopicPartition(spec.name, p) for spec in ALL_TOPICS for p in range(spec.partitions)
        ]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        expected = sum(consumer.end_offsets(partitions).values())
        records: list[tuple[str, bytes | None, bytes]] = []
        deadline = time.monotonic() + 15
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records += [(r.topic, r.key, r.value) for r in batch]
        return records
    finally:
        consumer.close()


# ------------------------------------------------------------------------------ the rest


@pytest.fixture
def held_warehouse(tmp_path: Path) -> Iterator[Path]:
    """A chdb data dir owned by another process, as a running worker owns its own."""
    with held_data_dir(tmp_path / "held"):
        yield tmp_path / "held"


@pytest.mark.integration
def test_a_warehouse_owned_by_the_worker_is_explained(
    held_warehouse: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, "list", "--warehouse", f"chdb://{held_warehouse}")
    assert (status, out) == (2, "")
    assert "the chdb warehouse is owned by a running worker" in err
    assert "--warehouse clickhouse://HOST:PORT/DB" in err and "stop the worker" in err


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("occurred_at: too late: 2026-01-02 is more than 35 days before", "occurred_at"),
        ("ratings.q1: must be at most 10 (got 11); overall: is required", "ratings.q1"),
        ("not valid JSON: expected value at line 1 column 1", "not valid JSON"),
        ("unknown event_type 'foo'", "unknown event_type 'foo'"),
        ("x" * 70 + ": y", "x" * 59 + "…"),
    ],
)
def test_reason_class_is_the_field_path(reason: str, expected: str) -> None:
    assert reason_class(reason) == expected


def test_sql_string_and_hex_dump() -> None:
    assert sql_string("it's a \\ \n") == "'it\\'s a \\\\ \\n'"
    assert hex_dump(b"ab\x00") == "00000000  61 62 00" + " " * 39 + "  |ab.|"
