"""A fixed-bucket histogram cheap enough to observe on a hot path (one bisect and three adds).

One thread observes; another may read a `snapshot` (the metrics endpoint):
a snapshot taken mid-observation can be one sample off in a bucket, never
inconsistent, since its count is the sum of its buckets.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

# fsync durations, seconds: 50 µs to 1 s.
FSYNC_BUCKETS_S = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# Messages per group commit round.
ROUND_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)


class Histogram:
    """Counts of observations per bucket (``value <= bound``), their sum and count."""

    __slots__ = ("bounds", "_counts", "_sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self.bounds, value)] += 1
        self._sum += value

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """Cumulative ``(bound, count <= bound)`` pairs ending with +Inf, the sum, and the count."""
        counts = list(self._counts)
        total = 0
        cumulative: list[tuple[float, int]] = []
        for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
            total += n
            cumulative.append((bound, total))
        return cumulative, self._sum, total
