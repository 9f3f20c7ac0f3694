"""The segmented log: ids, rolling, the commit point, truncation and the lock.

`Log.append` writes a batch (to the OS) and assigns ids; `Log.sync` makes
everything written so far durable. Under ``fsync=always`` the commit point
only moves in `sync`, so one sync covers every batch written before it
(group commit, driven by the server's queue). Under ``interval`` and
``never`` the commit point moves at `append`. Readers never see past it.

Threads: appends, reads and retention run on one thread (the server's event
loop); `sync` may run on one other thread at a time. `_lock` guards the
few fields they share.

The read side (positions, `span`, `read`) is in reads.py (`LogReads`),
retention in retention.py (`LogRetention`): `Log` inherits both and holds
the state they use.
"""

from __future__ import annotations

import os
import threading
from array import array
from bisect import bisect_right
from collections.abc import Sequence
from typing import Protocol

from .. import defaults
from ..errors import DamagedLogError, NotFoundError, StorageError, UnavailableError
from ..hot import ext
from . import closed_head, truncate
from .files import fsync_dir
from .handles import HandleCache
from .lock import take_lock
from .policy import FsyncPolicy
from .reads import Record, Span
from .record import MAX_HEADER_BYTES, encode_batch
from .recovery import open_segments
from .retention import LogRetention
from .segment import Segment

DEFAULT_SEGMENT_BYTES = defaults.SEGMENT_BYTES
# Zeros kept written ahead of the data when preallocating (see segment.py).
# A batch bigger than a quarter of it grows the file itself: its sync is
# dominated by its own bytes, and zeros written for it would only be overwritten.
PREALLOCATE_BYTES = 1 << 20
# Segment read descriptors kept open for readers (see handles.py); logd's
# descriptor budget counts them (server.py).
READ_HANDLES = 16


class Log(LogRetention):
    """A directory of segments with continuous ids from 1."""

    def __init__(
        self,
        directory: str,
        *,
        fsync: FsyncPolicy | str = "always",
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        retention_bytes: int | None = None,
        retention_ms: int | None = None,
        preallocate: bool | None = None,
    ) -> None:
        self.directory = os.path.abspath(directory)
        self.policy = fsync if isinstance(fsync, FsyncPolicy) else FsyncPolicy.parse(fsync)
        # Worth it only when every commit syncs (the default: on with fsync=always).
        self.preallocate = self.policy.mode == "always" if preallocate is None else preallocate
        if segment_bytes < 1:
            raise ValueError("segment_bytes must be positive")
        self.segment_bytes = segment_bytes
        self.retention_bytes = retention_bytes
        self.retention_ms = retention_ms
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()  # one sync at a time
        self._segments: list[Segment] = []
        self._firsts: list[int] = []  # first ids, for bisect
        self._rolled: list[Segment] = []  # closed by a roll, not yet synced
        self._dir_dirty = False
        self._head = 0  # last id written
        self._committed = 0  # the commit point
        self._synced = 0  # last id made durable by sync (or found on disk at open)
        self._failed: BaseException | None = None
        self._lock_fd = -1
        self.recovered_bytes_cut = 0
        self._companions: list[Companion] = []  # small files synced with the log (cursors)
        self.forced: list[int] = []  # segments the last retention deleted although a cursor needed them
        self.handles = HandleCache(READ_HANDLES)
        self._open()

    # --- open / close -------------------------------------------------------

    def _open(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        self._take_lock()
        try:
            self._remove_stray_tmp()
            try:
                saved_head = closed_head.load(self.directory)
            except ValueError as exc:
                raise DamagedLogError(f"{exc}; remove it if the segments are sound (`logd check`)") from None
            self._segments, self.recovered_bytes_cut = open_segments(self.directory, saved_head)
            active = self._segments[-1] if self._segments else None
            if active is not None:
                # What survived the crash becomes visible now: make it durable
                # first, or a second crash could take back what readers saw.
                active.sync_data()
            else:
                active = Segment.create(self.directory, 1)
                self._fsync_dir()
                self._segments.append(active)
            for seg in self._segments:
                seg.handles = self.handles
            self._firsts = [s.first_id for s in self._segments]
            self._head = self._committed = self._synced = active.last_id
        except BaseException:
            self._release_lock()
            raise

    def _remove_stray_tmp(self) -> None:
        for name in os.listdir(self.directory):
            if name.endswith(".idx.tmp"):
                os.unlink(os.path.join(self.directory, name))

    def _take_lock(self) -> None:
        self._lock_fd = take_lock(self.directory)

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = -1

    def close(self) -> None:
        """Sync what was written (whatever the policy), close files, release the lock."""
        if self._lock_fd < 0:
            return
        try:
            if self._failed is None:
                self.sync()
                # Only now is everything up to the head durable: the next open
                # treats a log ending before it as damage, not a torn tail.
                try:
                    closed_head.save(self.directory, self._head)
                except OSError:
                    pass  # the old value stays: a lower bound, still safe
        finally:
            for seg in self._segments:
                seg.close()
            self.handles.clear()
            self._release_lock()

    def __enter__(self) -> Log:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def attach(self, companion: Companion) -> None:
        """Sync ``companion`` (a small file kept beside the log, e.g. `CursorStore`) in every `sync`.

        So under ``fsync=always`` one group commit's sync covers its writes too.
        """
        self._companions.append(companion)

    # --- writing --------------------------------------------------------------

    def append(self, bodies: Sequence[bytes], nbytes: int | None = None) -> int:
        """Write a batch; return the id of its last message.

        The batch goes into one segment. ``nbytes`` is the bodies' total size
        when the caller knows it already. On an I/O error nothing of it is
        kept and `UnavailableError` is raised; the log stays usable unless
        undoing the partial write failed too.
        """
        if not bodies:
            raise ValueError("empty batch")
        if self._failed is not None:
            self._check_failed()
        active = self._segments[-1]
        if nbytes is None:
            nbytes = sum(map(len, bodies))
        bound = nbytes + len(bodies) * (MAX_HEADER_BYTES + 2)
        if active.size and active.size + bound > self.segment_bytes:
            active = self._roll()
        first_id = self._head + 1
        data, offsets = encode_batch(first_id, bodies, active.size)
        self._write(active, data, offsets)
        return self._head

    def append_encoded(self, data: bytes | memoryview, offsets: Sequence[int], count: int) -> int:
        """Append records already encoded and verified by the caller (a replica).

        ``data`` holds ``count`` whole records with ids from ``written + 1``;
        ``offsets`` are their starts relative to ``data``. Unlike `append` this
        never rolls: a replica starts segments only where its leader did
        (`start_segment`), so closed segments are byte-identical on both.
        """
        if len(offsets) != count:
            raise ValueError(f"{len(offsets)} offsets for {count} records")
        if not count:
            return self._head
        self._check_failed()
        active = self._segments[-1]
        base = active.size
        self._write(active, data, _rebase(offsets, base))
        return self._head

    def start_segment(self, first_id: int) -> None:
        """Close the active segment and start one named ``first_id`` (a replica following a roll).

        ``first_id`` must be the next id. A no-op when the active segment is
        empty and already has that name.
        """
        self._check_failed()
        active = self._segments[-1]
        if first_id != self._head + 1:
            raise ValueError(f"a segment can only start at the next id {self._head + 1}, not {first_id}")
        if active.size == 0:
            if active.first_id == first_id:
                return
            raise ValueError(f"active segment {active.first_id} is empty but the next id is {first_id}")
        try:
            self._roll()
        except OSError as exc:
            raise UnavailableError(f"cannot start segment {first_id}: {os.strerror(exc.errno or 0)}") from exc

    def _write(self, active: Segment, data: bytes | memoryview, offsets: object) -> None:
        try:
            active.append(data, offsets)  # type: ignore[arg-type]
            if self.preallocate and len(data) < PREALLOCATE_BYTES // 4:
                active.keep_zeroed_ahead(PREALLOCATE_BYTES)
        except OSError as exc:
            raise UnavailableError(f"write failed: {os.strerror(exc.errno or 0)}") from exc
        except BaseException as exc:  # undo failed: refuse further writes
            self._failed = exc
            raise
        with self._lock:
            self._head = active.last_id
            if self.policy.mode != "always":
                self._committed = self._head

    def _roll(self) -> Segment:
        try:
            self._segments[-1].seal()
            new = Segment.create(self.directory, self._head + 1)
            new.handles = self.handles
        except OSError as exc:  # e.g. no inodes or descriptors left: as for a failed write
            raise UnavailableError(f"cannot start a segment: {os.strerror(exc.errno or 0)}") from exc
        with self._lock:
            self._rolled.append(self._segments[-1])
            self._segments.append(new)
            self._firsts.append(new.first_id)
            self._dir_dirty = True
        return new

    @property
    def needs_sync(self) -> bool:
        """Whether `sync` has work: rolled segments to finish, or data the policy wants synced.

        Under ``never`` data is left to the OS, so only a roll makes work;
        under ``interval`` and ``always`` any id written since the last sync does.
        """
        if self._rolled or self._dir_dirty:
            return True
        if self.policy.mode == "never":
            return False
        return self._synced < self._head or any(c.dirty for c in self._companions)

    def sync(self) -> int:
        """Make everything written so far durable; return the new commit point.

        Safe to call from another thread than the appender; one call runs at
        a time. After a failed fsync the log refuses all further writes: the
        kernel may have dropped the dirty pages, so nothing unsynced can be
        trusted (the lesson of PostgreSQL's "fsyncgate").
        """
        with self._sync_lock:
            self._check_failed()
            with self._lock:
                target = self._head
                rolled, self._rolled = self._rolled, []
                dir_dirty, self._dir_dirty = self._dir_dirty, False
                active = self._segments[-1]
            try:
                for seg in rolled:
                    seg.finish()
                if dir_dirty:
                    self._fsync_dir()
                active.sync_data()
                for companion in self._companions:
                    companion.sync()
            except OSError as exc:
                self._failed = exc
                raise UnavailableError(f"fsync failed: {os.strerror(exc.errno or 0)}") from exc
            with self._lock:
                if target > self._committed:
                    self._committed = target
                if target > self._synced:
                    self._synced = target
                return self._committed

    def _fsync_dir(self) -> None:
        fsync_dir(self.directory)

    @property
    def failed(self) -> BaseException | None:
        """The I/O error that made this log refuse writes, if any."""
        return self._failed

    def _check_failed(self) -> None:
        if self._failed is not None:
            raise UnavailableError(f"log is failed after an I/O error ({self._failed}); restart logd")

    # --- truncation (a follower repairing divergence) ------------------------------

    def truncate_after(self, last_id: int, dropped_path: str) -> int:
        """Cut the log after ``last_id``, first copying the records cut into ``dropped_path``.

        Returns how many records were dropped (0: nothing past ``last_id``, no
        file written). ``last_id`` must not be older than the oldest retained
        id - 1. Only for a follower: no MSG may be in flight.
        """
        self.sync()
        if last_id >= self._head:
            return 0
        if last_id < self.first - 1:
            raise NotFoundError(f"cannot cut after id {last_id}: the oldest retained id is {self.first}")
        dropped = self._head - last_id
        i = bisect_right(self._firsts, last_id + 1) - 1
        cut, later = self._segments[i], self._segments[i + 1 :]
        offset, keep = cut.offset_of(last_id + 1), last_id + 1 - cut.first_id
        truncate.save_dropped(self.directory, self._segments[i:], last_id + 1, dropped_path)
        fsync_dir(self.directory)
        for seg in self._segments:
            seg.close()
        self.handles.clear()
        try:
            # A deliberate cut: the clean-close head must not make the next open
            # take it for damage (recovery refuses a log ending before it).
            if closed_head.load(self.directory) > last_id:
                closed_head.save(self.directory, last_id)
            truncate.cut_files(self.directory, cut, offset, keep, later)
            self._segments, _cut = open_segments(self.directory)
            for seg in self._segments:
                seg.handles = self.handles
            self._segments[-1].sync_data()
        except BaseException as exc:  # the segments are closed: refuse everything rather than use them
            self._failed = exc
            raise
        with self._lock:
            self._firsts = [s.first_id for s in self._segments]
            self._rolled = []
            self._head = self._committed = self._synced = self._segments[-1].last_id
        return dropped

    def stats(self) -> dict[str, int | str]:
        """Figures for STATS."""
        return {
            "head": self.head,
            "first": self.first,
            "segments": len(self._segments),
            "bytes": self.size_bytes,
            "fsync_policy": str(self.policy),
        }


class Companion(Protocol):
    """A small file synced with the log (`Log.attach`)."""

    @property
    def dirty(self) -> bool: ...

    def sync(self) -> None: ...


__all__ = ["Companion", "FsyncPolicy", "Log", "Record", "Span", "StorageError"]


def _rebase(offsets: Sequence[int], base: int) -> array:
    """Offsets within a buffer, as an ``array('Q')`` of positions in a segment where it starts at ``base``."""
    out = array("Q")
    if ext is not None and isinstance(offsets, array) and offsets.typecode == "Q":
        out.frombytes(ext.rebase(offsets, base))
    else:
        out.extend([base + o for o in offsets])
    return out
