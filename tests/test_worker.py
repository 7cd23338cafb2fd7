"""The worker's own at-least-once checks around Faust's consumer (upstream
faust-streaming issues #596/#606), tested on plain data: which acks may be
refilled, and which skipped offsets must be re-read."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from pipeline.worker import OffsetGuard, next_commit


@dataclass(frozen=True)
class Message:
    tp: str
    offset: int


@dataclass(frozen=True)
class Event:
    """The two attributes of a Faust event the guard reads."""

    message: Message


def batch(tp: str, *offsets: int) -> list[Event]:
    return [Event(Message(tp, o)) for o in offsets]


def test_next_commit_steps_over_acked_or_processed_offsets() -> None:
    # committed 123; Faust acked 126–127 only (its acks of 123–125 got lost),
    # but this worker processed 123–127: commit 128
    assert next_commit(123, [126, 127], {123, 124, 125, 126, 127}) == 128
    # 124 neither acked nor processed (never reached the agent): stop there
    assert next_commit(123, [126, 127], {123, 125, 126, 127}) == 124
    # a lost tail: nothing acked, 121–123 processed
    assert next_commit(121, [], {121, 122, 123, 125}) == 124
    # nothing new past the commit: nothing to commit
    assert next_commit(123, [], {120, 122}) is None
    assert next_commit(123, [], set()) is None
    # never committed yet: from the lowest offset done
    assert next_commit(None, [0, 1], {2, 4}) == 3


def offsets(events: list[Event]) -> list[int]:
    return [e.message.offset for e in events]


def test_guard_holds_back_what_follows_a_skipped_offset_and_re_reads_it_first() -> None:
    clock = [0.0]
    guard = OffsetGuard(clock=lambda: clock[0])

    def committed(tp: str) -> int | None:
        return {"visit-3": 580}.get(tp)

    admitted, seeks = guard.admit(batch("visit-3", 580, 581), committed)
    assert offsets(admitted) == [580, 581] and seeks == []
    guard.record(admitted)
    # 582 never reached the agent: 583 and 584 wait, the partition seeks back
    admitted, seeks = guard.admit(batch("visit-3", 583, 584), committed)
    assert admitted == [] and seeks == [("visit-3", 582)]
    assert guard.skips_found == 1
    # records fetched before the seek still arrive: held back, no second seek yet
    assert guard.admit(batch("visit-3", 585, 586), committed) == ([], [])
    # the re-read brings 582 onwards, in order
    admitted, seeks = guard.admit(batch("visit-3", 582, 583, 584, 585), committed)
    assert offsets(admitted) == [582, 583, 584, 585] and seeks == []
    guard.record(admitted)
    assert guard.processed["visit-3"] == set(range(580, 586))
    # an offset already processed (a re-read overlapping) passes: dedup drops it
    admitted, _ = guard.admit(batch("visit-3", 584, 586), committed)
    assert offsets(admitted) == [584, 586]


def test_guard_seeks_again_after_a_while_then_gives_up_in_order_not_in_loss() -> None:
    clock = [0.0]
    guard = OffsetGuard(clock=lambda: clock[0])
    committed = {"call-1": 10}.get
    assert guard.admit(batch("call-1", 12), committed) == ([], [("call-1", 10)])
    clock[0] += 1.0
    assert guard.admit(batch("call-1", 12), committed) == ([], [])  # too soon to re-seek
    for _ in range(OffsetGuard.MAX_SEEKS - 1):
        clock[0] += OffsetGuard.RESEEK_AFTER_S
        assert guard.admit(batch("call-1", 12), committed) == ([], [("call-1", 10)])
    # the gap never came back: 12 is processed out of order rather than held forever
    admitted, seeks = guard.admit(batch("call-1", 12, 13), committed)
    assert offsets(admitted) == [12, 13] and seeks == []
    guard.record(admitted)
    # and the commit still stops at the gap (next_commit: 10 and 11 not done)
    assert next_commit(10, [], guard.processed["call-1"]) is None


def test_guard_starts_from_the_committed_offset_and_forgets_on_rebalance() -> None:
    guard = OffsetGuard()
    # the very first record after a restart is checked against the commit
    assert guard.admit(batch("survey-0", 11), lambda tp: 10) == ([], [("survey-0", 10)])
    guard.forget_assignment()
    # after a rebalance the partition restarts wherever it was committed
    admitted, seeks = guard.admit(batch("survey-0", 40), lambda tp: 40)
    assert offsets(admitted) == [40] and seeks == []
    # a partition never committed starts wherever its first record is
    admitted, _ = guard.admit(batch("survey-1", 7), lambda tp: None)
    assert offsets(admitted) == [7]


@dataclass
class AckBook:
    """The three bookkeeping maps of Faust's consumer the repair touches
    (plain data, the shape `faust.transport.consumer.Consumer` keeps)."""

    _committed_offset: dict[str, int]
    _acked: defaultdict[str, list[int]]
    _acked_index: defaultdict[str, set[int]]


def test_installed_guard_decides_the_commit_and_forgets_what_it_covers() -> None:
    guard = OffsetGuard()
    book = AckBook({"call-0": 10}, defaultdict(list), defaultdict(set))
    guard.install(book)
    guard.record(batch("call-0", 10, 11, 12))
    book._acked["call-0"].extend([12, 13])  # Faust acked 12 and 13, lost 10 and 11
    book._acked_index["call-0"].update([12, 13])
    assert book._new_offset("call-0") == 14  # type: ignore[attr-defined]
    assert book._acked["call-0"] == [] and book._acked_index["call-0"] == set()
    assert guard.processed["call-0"] == set()
