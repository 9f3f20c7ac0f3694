"""One segment file and its dense index (protocol.md section 2).

A segment is ``<first id, 20 digits>.log`` holding records back to back, and
``<same>.idx`` holding one little-endian u64 byte offset per record. The
active segment keeps its index in memory as well (an ``array('Q')``) because
it grows; a closed segment maps its index file read-only.

Under ``fsync=always`` the active segment's file may run past its data with
zero bytes (`Segment.keep_zeroed_ahead`): an fdatasync that must also record a
new file size or new blocks costs a journal commit (about 210 µs here), one
into blocks already written costs about 115 µs. PostgreSQL zero-fills its WAL
segments for the same reason. A closed segment is always exactly its records.
"""

from __future__ import annotations

import mmap
import os
import sys
from array import array

from ..errors import CorruptRecordError, UnavailableError
from .files import SCAN_CHUNK, replace_durably, scan_records, segment_name, write_all
from .handles import HandleCache, ReadHandle
from .record import BadRecord, Decoded, decode_record

INDEX_ENTRY = 8
# The active index is written to its file in runs of this many entries (and
# at roll and close), not once per batch: it is not synced and recovery
# rebuilds a short one by scanning, so a write(2) per batch bought nothing.
INDEX_WRITE_ENTRIES = 8192
_ZEROS = memoryview(bytes(SCAN_CHUNK))

if sys.byteorder != "little":  # pragma: no cover - the index format is little-endian
    raise ImportError("logd's index format assumes a little-endian machine")


class Segment:
    """One segment: its files, its record count and byte size, its index."""

    def __init__(self, directory: str, first_id: int) -> None:
        self.directory = directory
        self.first_id = first_id
        stem = os.path.join(directory, segment_name(first_id))
        self.log_path = stem + ".log"
        self.idx_path = stem + ".idx"
        self.count = 0  # records written (may be ahead of the commit point)
        self.size = 0  # bytes written
        self.allocated = 0  # bytes in the .log file: `size`, then zeros written ahead
        self.active = False
        # Active segment: write descriptors and the in-memory index.
        self._log_fd = -1
        self._idx_fd = -1
        self._offsets: array | None = None
        self._idx_written = 0  # entries of _offsets in the .idx file
        # Closed segment: the mapped index, created on first use.
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        # Shared read descriptors (set by the log); None: open one per call.
        self.handles: HandleCache | None = None

    # --- opening -------------------------------------------------------------

    @classmethod
    def create(cls, directory: str, first_id: int) -> Segment:
        """A new, empty active segment."""
        seg = cls(directory, first_id)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        seg._log_fd = os.open(seg.log_path, flags | os.O_TRUNC, 0o644)
        try:
            seg._idx_fd = os.open(seg.idx_path, flags | os.O_TRUNC, 0o644)
        except OSError:
            os.close(seg._log_fd)
            raise
        seg._offsets = array("Q")
        seg.active = True
        return seg

    @classmethod
    def open_closed(cls, directory: str, first_id: int, count: int) -> Segment:
        """A closed segment that holds ``count`` records; rebuild its index if it is wrong."""
        seg = cls(directory, first_id)
        seg.count = count
        seg.size = seg.allocated = os.stat(seg.log_path).st_size
        try:
            idx_size = os.stat(seg.idx_path).st_size
        except FileNotFoundError:
            idx_size = -1
        if idx_size != count * INDEX_ENTRY:
            seg.rebuild_index()
        return seg

    @classmethod
    def adopt_active(
        cls, directory: str, first_id: int, log_fd: int, idx_fd: int, offsets: array, end: int
    ) -> Segment:
        """The active segment over files recovery has opened and checked (recovery.py)."""
        seg = cls(directory, first_id)
        seg._log_fd, seg._idx_fd = log_fd, idx_fd
        seg.active = True
        seg._offsets = offsets
        seg._idx_written = seg.count = len(offsets)
        seg.size = seg.allocated = end
        return seg

    def rebuild_index(self) -> None:
        """Rewrite the index of a closed segment by scanning it (tmp file, fsync, rename)."""
        offsets = array("Q")
        fd = os.open(self.log_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for off, _rec in scan_records(fd, 0, self.first_id, self.size):
                offsets.append(off)
        except BadRecord as bad:
            raise CorruptRecordError(
                f"cannot rebuild the index of {self.log_path}: bad record at offset {bad.offset}, "
                f"id {self.first_id + len(offsets)}: {bad.reason}",
                where=self.log_path,
                offset=bad.offset,
                id=self.first_id + len(offsets),
            ) from None
        finally:
            os.close(fd)
        if len(offsets) != self.count:
            raise CorruptRecordError(
                f"{self.log_path} holds {len(offsets)} records, expected {self.count} (ids {self.first_id}.."
                f"{self.first_id + self.count - 1})",
                where=self.log_path,
                id=self.first_id + len(offsets),
            )
        replace_durably(self.idx_path, offsets.tobytes())  # whole or not at all; no debris on a full disk

    # --- writing (active segment only) ----------------------------------------

    def append(self, data: bytes | memoryview, offsets: array) -> None:
        """Write records (their index entries follow in runs); on failure, undo to the previous end."""
        assert self._offsets is not None
        old_size, old_count, old_written = self.size, self.count, self._idx_written
        self._offsets.extend(offsets)
        try:
            write_all(self._log_fd, data)
            if len(self._offsets) - old_written >= INDEX_WRITE_ENTRIES:
                self._write_index()
        except OSError as exc:
            # Put both files back as they were so nothing partial is ever read.
            del self._offsets[old_count:]
            self._idx_written = old_written
            try:
                self.allocated = old_size
                os.ftruncate(self._log_fd, old_size)
                os.ftruncate(self._idx_fd, old_written * INDEX_ENTRY)
                os.lseek(self._log_fd, old_size, os.SEEK_SET)
            except OSError as undo_exc:
                # Not an OSError, so the log fails for good instead of writing after the debris.
                raise UnavailableError(f"write to {self.log_path} failed and could not be undone: {undo_exc}") from exc
            raise
        self.size += len(data)
        self.count += len(offsets)
        if self.size > self.allocated:
            self.allocated = self.size

    def keep_zeroed_ahead(self, ahead: int) -> None:
        """Keep about ``ahead`` bytes of zeros written after the data, so syncs keep the file's size.

        Tops up when less than a quarter is left, so the extra journal
        commit comes once per ``3 * ahead / 4`` bytes appended. Only an
        optimisation: if the disk is full the zeros written so far stay
        (recovery and readers ignore them) and the data is unaffected.
        """
        pos = self.allocated
        if pos - self.size >= ahead // 4:
            return
        target = self.size + ahead
        try:
            while pos < target:
                pos += os.pwrite(self._log_fd, _ZEROS[: target - pos], pos)
        except OSError:
            pass
        self.allocated = pos

    def sync_data(self) -> None:
        """fdatasync the records (not the index: it can be rebuilt)."""
        os.fdatasync(self._log_fd)

    def _write_index(self) -> None:
        # At an explicit offset: a write cut short by an error must not shift the next one.
        assert self._offsets is not None
        view = memoryview(self._offsets[self._idx_written :].tobytes())
        pos = self._idx_written * INDEX_ENTRY
        while view:
            n = os.pwrite(self._idx_fd, view, pos)
            pos += n
            view = view[n:]
        self._idx_written = len(self._offsets)

    def seal(self) -> None:
        """At a roll, on the appending thread: cut the zeros and complete the index (`finish` syncs)."""
        self._cut_zeros()
        self._write_index()

    def finish(self) -> None:
        """Make a rolled (sealed) segment durable and read-only: sync both files, close writers."""
        os.fdatasync(self._log_fd)
        os.fdatasync(self._idx_fd)
        os.close(self._log_fd)
        os.close(self._idx_fd)
        self._log_fd = self._idx_fd = -1
        self._offsets = None

    def _cut_zeros(self) -> None:
        if self.allocated > self.size:
            os.ftruncate(self._log_fd, self.size)
            self.allocated = self.size

    def close(self) -> None:
        """Close every descriptor (the log is being closed); a clean stop leaves no zeros behind."""
        if self._log_fd >= 0:
            try:
                self._cut_zeros()
                self._write_index()
            except OSError:
                pass  # harmless: the next open cuts the zeros and rebuilds the index
        for fd in (self._log_fd, self._idx_fd):
            if fd >= 0:
                os.close(fd)
        self._log_fd = self._idx_fd = -1
        self.close_index_map()
        if self.handles is not None:
            self.handles.forget(self.log_path)

    # --- reading ---------------------------------------------------------------

    @property
    def last_id(self) -> int:
        """Id of the last record written (first_id - 1 when empty)."""
        return self.first_id + self.count - 1

    def reader(self) -> ReadHandle:
        """A read descriptor for pread, shared through the log's cache; `UnavailableError` if it cannot be opened."""
        if self.handles is not None:
            return self.handles.get(self.log_path)
        return ReadHandle(self.log_path)

    def offset_of(self, id: int) -> int:
        """Byte offset of record ``id``; ``id == last_id + 1`` gives the end of the data."""
        k = id - self.first_id
        if k == self.count:
            return self.size
        offsets = self._offsets  # read once: a sync on another thread may `finish` us meanwhile
        if offsets is not None:
            return offsets[k]
        return self._index_view()[k]

    def _index_view(self) -> memoryview:
        if self._view is None:
            if self.count == 0:
                return memoryview(array("Q"))
            with open(self.idx_path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._view = memoryview(self._map).cast("Q")
            if self.handles is not None:
                self.handles.note_mapped(self)  # bounded: each mapping holds a descriptor
        return self._view

    def check_range(self, begin: int, end: int, first: int, last: int) -> None:
        """Raise `CorruptRecordError` unless bytes ``begin..end`` (ids ``first..last``, from the
        index) lie inside the segment file.

        A closed index is only size-checked at open: a garbage entry must become
        an error, never a bad pread (negative or huge counts) or the wrong bytes.
        """
        if not 0 <= begin < end <= self.size:
            ids = f"id {first}" if first == last else f"ids {first}..{last}"
            raise CorruptRecordError(
                f"bad index entry in {self.idx_path} for {ids}: byte range {begin}..{end} is not inside"
                f" the {self.size} bytes of {self.log_path} (run `logd check`)",
                where=self.log_path,
                offset=begin,
                id=first,
            )

    def read_record(self, id: int) -> Decoded:
        """Read and verify one record, raising `CorruptRecordError` if it is bad."""
        offset = self.offset_of(id)
        end = self.offset_of(id + 1)
        self.check_range(offset, end, id, id)
        handle = self.reader()  # held until pread returns: its last reference closes it
        data = os.pread(handle.fd, end - offset, offset)
        try:
            return decode_record(data, 0, id)
        except BadRecord as bad:
            raise CorruptRecordError(
                f"bad record in {self.log_path} at offset {offset}, id {id}: {bad.reason}",
                where=self.log_path,
                offset=offset,
                id=id,
            ) from None

    def delete(self) -> None:
        """Remove the files (readers holding our ReadHandle can still finish)."""
        self.close_index_map()
        if self.handles is not None:
            self.handles.forget(self.log_path)
        for path in (self.log_path, self.idx_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def close_index_map(self) -> None:
        """Unmap a closed segment's index (it is mapped again on next use)."""
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            self._map.close()
            self._map = None
            if self.handles is not None:
                self.handles.forget_mapped(self)
