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
    guard.record(batch("call-0", 10, 11, 12), lambda tp: 10)
    book._acked["call-0"].extend([12, 13])  # Faust acked 12 and 13, lost 10 and 11
    book._acked_index["call-0"].update([12, 13])
    assert book._new_offset("call-0") == 14  # type: ignore[attr-defined]
    assert book._acked["call-0"] == [] and book._acked_index["call-0"] == set()
    assert guard.processed["call-0"] == set()
