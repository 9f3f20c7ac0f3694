"""Reading the log: what a read returns (`Span`, `Record`), and `LogReads`, the read side of `Log`."""

from __future__ import annotations

from bisect import bisect_right
from typing import NamedTuple

from ..errors import NotFoundError
from .record import Decoded
from .segment import ReadHandle, Segment


class Span(NamedTuple):
    """A byte range of one segment holding whole records ``first_id..last_id``."""

    handle: ReadHandle
    start: int  # byte offset of first_id's record
    end: int  # byte offset just after last_id's record
    first_id: int
    last_id: int
    path: str


class Record(NamedTuple):
    """A stored message, as returned by `Log.read`."""

    id: int
    body: bytes
    crc: int


class LogReads:
    """The read side of `Log`: where the log stands, and finding and reading its committed records.

    Reads only. `Log` (log.py) owns the state below: it opens the segments,
    appends, syncs and moves the commit point.
    """

    _segments: list[Segment]  # oldest first; the last one is active
    _firsts: list[int]  # their first ids, for bisect
    _head: int  # last id written
    _committed: int  # the commit point: readers never see past it

    # --- positions ------------------------------------------------------------

    @property
    def head(self) -> int:
        """Last committed id (0 when empty): what readers may see."""
        return self._committed

    @property
    def written(self) -> int:
        """Last id written to the OS, committed or not."""
        return self._head

    @property
    def first(self) -> int:
        """Oldest retained id (head + 1 when the log is empty)."""
        return self._segments[0].first_id

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    @property
    def size_bytes(self) -> int:
        return sum(s.size for s in self._segments)


    # --- reading --------------------------------------------------------------

    def _segment_for(self, id: int) -> Segment:
        return self._segments[bisect_right(self._firsts, id) - 1]

    def check_retained(self, start: int) -> None:
        """Raise `NotFoundError` if ``start`` is older than the oldest retained id."""
        if start < 1:
            raise ValueError("ids start at 1")
        if start < self.first:
            raise NotFoundError(f"id {start} is before the oldest retained id {self.first}")

    def span(self, start: int, max_count: int = 0, max_bytes: int = 0) -> Span | None:
        """The byte range of committed records from ``start`` within its segment.

        At most ``max_count`` records and ``max_bytes`` bytes when non-zero,
        but always at least one record. None when ``start`` is past the
        commit point (the caller waits). Raises `NotFoundError` when
        ``start`` is older than the oldest retained id.
        """
        self.check_retained(start)
        head = self._committed
        if start > head:
            return None
        seg = self._segment_for(start)
        last = min(head, seg.last_id)
        if max_count:
            last = min(last, start + max_count - 1)
        begin = seg.offset_of(start)
        end = seg.offset_of(last + 1)
        if max_bytes and end - begin > max_bytes and last > start:
            # Binary search on the index for the last record ending within max_bytes.
            lo, hi = start, last
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if seg.offset_of(mid + 1) - begin <= max_bytes:
                    lo = mid
                else:
                    hi = mid - 1
            last = lo
            end = seg.offset_of(last + 1)
        seg.check_range(begin, end, start, last)
        return Span(seg.reader(), begin, end, start, last, seg.log_path)

    def segment_of(self, id: int) -> int:
        """Name (first id) of the segment holding ``id``, or that would hold it if it were next."""
        return self._segment_for(id).first_id

    def offset_of(self, id: int) -> tuple[str, int]:
        """Segment path and byte offset of record ``id`` (which must be retained)."""
        self.check_retained(id)
        if id > self._head:
            raise NotFoundError(f"id {id} is past the head {self._head}")
        seg = self._segment_for(id)
        return seg.log_path, seg.offset_of(id)

    def read(self, start: int, max_count: int = 1000, max_bytes: int = 1 << 24) -> list[Record]:
        """Committed records from ``start``, each checked against its CRC.

        Returns at least one record when ``start`` is committed (even if it is
        larger than ``max_bytes``). Raises `CorruptRecordError` naming the
        segment, offset and id of a bad record.
        """
        out: list[Record] = []
        total = 0
        id = start
        while len(out) < max_count:
            span = self.span(id, max_count - len(out))
            if span is None:
                break
            seg = self._segment_for(id)
            for rid in range(span.first_id, span.last_id + 1):
                rec: Decoded = seg.read_record(rid)
                if out and total + rec.size > max_bytes:
                    return out
                out.append(Record(rec.id, rec.body, rec.crc))
                total += rec.size
            id = span.last_id + 1
        return out

    def crc_of(self, id: int) -> int:
        """CRC of stored record ``id`` (verified), for replication's divergence check."""
        self.check_retained(id)
        return self._segment_for(id).read_record(id).crc
