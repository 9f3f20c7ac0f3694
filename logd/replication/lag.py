"""When recent ids were committed, in bounded memory: what a replica's lag in seconds is measured with.

A replica's lag is how long ago the first id it does not hold was committed.
The leader used to keep one ``(commit point, time)`` pair of Python objects
per commit round, up to 131,072 of them: about 9 MB, reached only after
131,072 rounds (15 minutes of a follower committing 150 rounds a second), so
a soak saw a server's memory grow with what it committed (issue 29).

`CommitTimes` keeps one sample per ``resolution`` seconds instead (the
commits of one slot share it) in two typed arrays: at most ``2 * capacity``
samples of 16 bytes, whatever the commit rate.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left

CAPACITY = 4096  # samples kept at least (at most twice as many)
MIN_RESOLUTION_S = 0.01


class CommitTimes:
    """Commit points and when they were reached, one sample per ``resolution`` seconds.

    Sample k holds the last commit point of its slot and the time of the
    slot's first commit, so `committed_at` is never later than the real
    commit time, and at most ``resolution`` earlier: a lag measured with it
    can only be over-stated, by less than ``resolution``. The samples cover
    at least ``capacity * resolution`` seconds of commits; an id older than
    the oldest sample is given that sample's time (a lag at least that long).
    """

    def __init__(self, resolution: float = MIN_RESOLUTION_S, capacity: int = CAPACITY) -> None:
        if resolution <= 0 or capacity < 1:
            raise ValueError("CommitTimes needs a positive resolution and capacity")
        self.resolution = resolution
        self.capacity = capacity
        self._ids = array("q")  # commit points, increasing: each slot's last one
        self._times = array("d")  # the time of each slot's first commit (time.monotonic())

    def __len__(self) -> int:
        return len(self._ids)

    def note(self, head: int, now: float) -> None:
        """The commit point reached ``head`` at ``now`` (times never go back)."""
        ids, times = self._ids, self._times
        if ids and now - times[-1] < self.resolution:
            ids[-1] = head  # the same slot: it now ends at this commit point
            return
        ids.append(head)
        times.append(now)
        if len(ids) > 2 * self.capacity:
            del ids[: self.capacity], times[: self.capacity]

    def committed_at(self, id: int) -> float | None:
        """When ``id`` was committed (within ``resolution``, never later); None if it is not yet."""
        ids = self._ids
        i = bisect_left(ids, id)
        if i == len(ids):
            return None
        return self._times[i]
