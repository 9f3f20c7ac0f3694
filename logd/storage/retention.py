"""Retention: deleting the oldest closed segments of a `Log` by total size and age."""

from __future__ import annotations

import os
import threading
import time

from .reads import LogReads
from .segment import Segment


class LogRetention(LogReads):
    """`Log.apply_retention`; `Log` owns the state below and runs this on its appending thread."""

    _lock: threading.Lock  # guards the fields `Log.sync` shares with the appender
    _rolled: list[Segment]  # closed by a roll, not yet synced
    retention_bytes: int | None
    retention_ms: int | None
    forced: list[int]  # segments the last retention deleted although a cursor needed them

    def apply_retention(
        self, now: float | None = None, *, keep_from: int | None = None, cap_bytes: int | None = None
    ) -> list[int]:
        """Delete old closed segments by size and age; return their first ids.

        ``keep_from`` is the oldest id a reader still needs (the lowest
        cursor + 1): a segment holding it or a later id is kept, unless the
        total is over ``cap_bytes`` (None: no cap). Segments deleted over a
        cursor anyway are listed in `forced`.
        """
        self.forced = []
        if self.retention_bytes is None and self.retention_ms is None:
            return []
        now = time.time() if now is None else now
        deleted: list[int] = []
        total = self.size_bytes
        while len(self._segments) > 1:
            oldest = self._segments[0]
            if oldest in self._rolled:
                break  # not yet synced; wait for the next sync
            if oldest.last_id >= self._head:
                # It holds the last record (the active segment is empty, as on a
                # follower told +SEG before the records): its CRC is what
                # resuming replication needs (protocol.md 3.4).
                break
            too_big = self.retention_bytes is not None and total > self.retention_bytes
            too_old = False
            if self.retention_ms is not None:
                mtime = os.stat(oldest.log_path).st_mtime
                too_old = (now - mtime) * 1000 > self.retention_ms
            if not (too_big or too_old):
                break
            if keep_from is not None and self._segments[1].first_id > keep_from:
                if cap_bytes is None or total <= cap_bytes:
                    break
                self.forced.append(oldest.first_id)
            with self._lock:
                self._segments.pop(0)
                self._firsts.pop(0)
            oldest.delete()
            total -= oldest.size
            deleted.append(oldest.first_id)
        return deleted
