"""The worker's own at-least-once checks around Faust's consumer (upstream
faust-streaming issues #596/#606), tested on plain data: which acks may be
refilled, and which skipped offsets must be re-read."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.worker import OffsetGuard, unacked_head


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


def test_refill_only_acks_of_processed_records() -> None:
    # committed 123 (next to read), acked from 126: 123–125 were processed → refill
    assert unacked_head(123, [126, 127], {123, 124, 125, 126, 127}) == [123, 124, 125]
    # 124 never processed: a gap that must stay (the commit may not pass it)
    assert unacked_head(123, [126, 127], {123, 125, 126, 127}) == []
    # a lost tail: nothing acked, 121–132 processed → refill the processed run
    assert unacked_head(121, [], {121, 122, 123, 125}) == [121, 122, 123]
    # no gap, nothing processed past the commit, or nothing committed yet: nothing
    assert unacked_head(123, [123, 124], {123, 124}) == []
    assert unacked_head(123, [], {120, 122}) == []
    assert unacked_head(None, [5], {0, 1, 2, 3, 4, 5}) == []


def test_guard_re_reads_a_skipped_offset_once() -> None:
    guard = OffsetGuard()

    def committed(tp: str) -> int | None:
        return {"visit-3": 580}.get(tp)

    assert guard.record(batch("visit-3", 580, 581), committed) == []
    # 582 never reached the agent: seek back to it
    assert guard.record(batch("visit-3", 583, 584), committed) == [("visit-3", 582)]
    assert guard.skips_found == 1
    # the re-read brings 582..584 again: no new gap
    assert guard.record(batch("visit-3", 582, 583, 584, 585), committed) == []
    # a gap that persists after its one re-read is not chased forever
    assert guard.record(batch("visit-3", 588), committed) == [("visit-3", 586)]
    assert guard.record(batch("visit-3", 588, 589), committed) == []


def test_guard_starts_from_the_committed_offset_and_forgets_on_rebalance() -> None:
    guard = OffsetGuard()
    # the very first record after a restart is checked against the commit
    assert guard.record(batch("survey-0", 11), lambda tp: 10) == [("survey-0", 10)]
    guard.forget_assignment()
    # after a rebalance the partition restarts wherever it was committed
    assert guard.record(batch("survey-0", 40), lambda tp: 40) == []
