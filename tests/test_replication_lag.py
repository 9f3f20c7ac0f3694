"""Replica lag in seconds: what `CommitTimes` keeps, and that it stays bounded however many commits (issue 29)."""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from logd.replication import ReplicaSet
from logd.replication.lag import CAPACITY, CommitTimes

ROUNDS = 140_000  # commit rounds: past what the old history kept before trimming (2 x 65,536 pairs)
BOUND = 256 << 10  # bytes: CommitTimes holds at most 2 x CAPACITY samples of 16 bytes


def retained_after(rounds: int, replicas: ReplicaSet, start: int) -> int:
    """Bytes still allocated (tracemalloc) after ``rounds`` more commit rounds."""
    for head in range(start + 1, start + rounds + 1):
        replicas.on_commit(head)
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def test_a_servers_commit_history_does_not_grow_with_its_commits() -> None:
    """A follower's memory grew about 0.8 bytes per replicated message (72 bytes per commit round)
    until 131,072 rounds: the leader-side lag history kept a Python (int, float) pair per round,
    on every server. Whatever the clock does, what it keeps is bounded by its capacity."""
    replicas = ReplicaSet(min_replicas=0, timeout=5.0, head=0)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        after_n = retained_after(ROUNDS, replicas, 0) - base
        after_2n = retained_after(ROUNDS, replicas, ROUNDS) - base
    finally:
        tracemalloc.stop()
    assert after_n < BOUND and after_2n < BOUND, (after_n, after_2n)
    assert len(replicas.commits) <= 2 * CAPACITY
    assert replicas.head == 2 * ROUNDS and replicas.hw == 2 * ROUNDS


def test_one_sample_per_slot_and_lag_is_never_understated() -> None:
    times = CommitTimes(resolution=0.01, capacity=4)
    times.note(10, 100.000)
    times.note(12, 100.004)  # the same 10 ms slot: the sample now ends at 12, keeps the slot's first time
    times.note(15, 100.030)
    assert len(times) == 2
    assert times.committed_at(11) == times.committed_at(12) == 100.000  # really 100.004: never later
    assert times.committed_at(13) == 100.030
    assert times.committed_at(16) is None  # not committed yet


def test_the_window_keeps_capacity_samples_and_older_ids_get_the_oldest_time() -> None:
    times = CommitTimes(resolution=1.0, capacity=4)
    for i in range(1, 10):  # one commit per second, each its own slot
        times.note(i * 10, float(i))
    assert 4 <= len(times) <= 8
    oldest = times.committed_at(1)
    assert oldest is not None and oldest > 1.0  # id 1 left the window: a later time, a lag at least that long
    assert times.committed_at(90) == 9.0 and times.committed_at(81) == 9.0


def test_a_replica_behind_the_window_is_out_of_sync() -> None:
    """The window spans at least four replica timeouts, so a replica older than it is never in sync."""
    replicas = ReplicaSet(min_replicas=1, timeout=5.0, head=0)
    assert replicas.commits.resolution * replicas.commits.capacity >= 4 * 5.0
    slow = object()
    replicas.on_commit(1)
    replicas.ack(slow, 0)
    assert replicas.lag_seconds(0) >= 0.0 and replicas.lag_seconds(1) == 0.0
    replicas.commits = CommitTimes(resolution=1.0, capacity=4)
    replicas.commits.note(1, 0.0)  # id 1 committed at time 0 of the monotonic clock: long ago
    assert replicas.lag_seconds(0) > 5.0 and replicas.in_sync() == 0


@pytest.mark.parametrize("bad", [(0.0, 4), (0.01, 0)])
def test_commit_times_refuses_a_window_of_nothing(bad: tuple[float, int]) -> None:
    with pytest.raises(ValueError):
        CommitTimes(*bad)
