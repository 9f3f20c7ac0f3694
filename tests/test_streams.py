"""Parked streams are indexed by the id they wait for: a commit touches only those it lets advance."""

from __future__ import annotations

from logd.streams import ParkedStreams


class FakeStream:
    """What ParkedStreams reads of a stream: the id it waits for, and where it is parked."""

    def __init__(self, next_id: int) -> None:
        self.next = next_id
        self.parked = 0


class Untouchable(FakeStream):
    """A stream far ahead: reading its id once it is parked would mean the index walked it."""

    def __getattribute__(self, name: str) -> object:
        if name == "next" and object.__getattribute__(self, "parked"):
            raise AssertionError("a stream parked far ahead was looked at")
        return object.__getattribute__(self, name)


def test_a_commit_wakes_only_the_streams_it_lets_advance() -> None:
    parked = ParkedStreams()
    far = [Untouchable(1_000_000_000 + i % 7) for i in range(10_000)]
    near = [FakeStream(5), FakeStream(6), FakeStream(6)]
    for s in far + near:
        parked.park(s)  # type: ignore[arg-type]
    assert len(parked) == 10_003
    assert parked.ready(4) == []
    woken = parked.ready(6)
    assert sorted(map(id, woken)) == sorted(map(id, near))
    assert all(s.parked == 0 for s in near) and len(parked) == 10_000


def test_unparked_streams_are_never_returned_and_stale_ids_are_dropped() -> None:
    parked = ParkedStreams()
    streams = [FakeStream(10 + i) for i in range(1000)]
    for s in streams:
        parked.park(s)  # type: ignore[arg-type]
    for s in streams[:-1]:
        parked.unpark(s)  # type: ignore[arg-type]  # connections gone
    assert len(parked) == 1
    assert len(parked._ids) < 200  # the heap does not keep every id ever waited for
    assert parked.ready(10_000) == [streams[-1]]
    assert len(parked) == 0


def test_parking_twice_counts_once() -> None:
    parked = ParkedStreams()
    s = FakeStream(3)
    parked.park(s)  # type: ignore[arg-type]
    parked.park(s)  # type: ignore[arg-type]
    assert len(parked) == 1
    assert parked.ready(3) == [s]
