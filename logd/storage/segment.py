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
import operator
import os
import sys
from array import array
from collections.abc import Iterator
from itertools import islice

from ..errors import CorruptRecordError, UnavailableError
from .record import BadRecord, Decoded, decode_record

INDEX_ENTRY = 8
# The active index is written to its file in runs of this many entries (and
# at roll and close), not once per batch: it is not synced and recovery
# rebuilds a short one by scanning, so a write(2) per batch bought nothing.
INDEX_WRITE_ENTRIES = 8192
SCAN_CHUNK = 1 << 20  # bytes read at a time when scanning a segment
_ZEROS = memoryview(bytes(SCAN_CHUNK))
NAME_DIGITS = 20

if sys.byteorder != "little":  # pragma: no cover - the index format is little-endian
    raise ImportError("logd's index format assumes a little-endian machine")


def segment_name(first_id: int) -> str:
    """File stem of the segment whose first id is ``first_id``."""
    return f"{first_id:0{NAME_DIGITS}d}"


def segment_firsts(path: str) -> list[int]:
    """First ids of the segments in data dir ``path``, oldest first."""
    return sorted(
        int(name[:NAME_DIGITS])
        for name in os.listdir(path)
        if name.endswith(".log") and len(name) == NAME_DIGITS + 4 and name[:NAME_DIGITS].isdigit()
    )


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until every byte is written (a file write may be short)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class ReadHandle:
    """A read-only file descriptor closed when the last reference goes.

    Readers hold the segment (and so this handle) across awaits; retention may
    unlink the files meanwhile, and an unlinked file stays readable through an
    open descriptor. Closing on the last reference means a descriptor number
    is never reused under a reader's feet.
    """

    __slots__ = ("fd",)

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def scan_records(
    fd: int, start_offset: int, first_id: int, end_offset: int
) -> Iterator[tuple[int, Decoded]]:
    """Yield ``(offset, record)`` for each valid record from ``start_offset`` to ``end_offset``.

    Raises `BadRecord` (with ``offset`` set) at the first record that is bad
    or cut off. Reads in large chunks, so a scan costs one pread per MiB.
    """
    pos = start_offset
    expect = first_id
    buf = b""
    buf_start = pos
    while pos < end_offset:
        try:
            rec = decode_record(buf, pos - buf_start, expect)
        except BadRecord as bad:
            buf_end = buf_start + len(buf)
            if not bad.truncated or buf_end >= end_offset:
                bad.offset = pos
                raise
            # The record runs past the buffer: read on from it, growing for big records.
            want = max(SCAN_CHUNK, 2 * (buf_end - pos))
            buf = os.pread(fd, min(want, end_offset - pos), pos)
            buf_start = pos
            continue
        yield pos, rec
        pos += rec.size
        expect += 1


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
        self._reader: ReadHandle | None = None

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
    def recover_active(cls, directory: str, first_id: int) -> tuple[Segment, int]:
        """Open the newest segment for appending, cutting off a torn tail.

        Returns the segment and the number of bytes cut from its data.
        """
        seg = cls(directory, first_id)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        seg._log_fd = os.open(seg.log_path, flags, 0o644)
        seg._idx_fd = os.open(seg.idx_path, flags, 0o644)
        seg.active = True
        data_size = os.fstat(seg._log_fd).st_size
        raw = _read_whole(seg._idx_fd)
        offsets = array("Q")
        offsets.frombytes(raw[: len(raw) - len(raw) % INDEX_ENTRY])
        keep = _valid_index_prefix(offsets, data_size)
        # The last kept entry must point at a record with the right id.
        while keep > 0:
            try:
                _read_record_at(seg._log_fd, offsets[keep - 1], first_id + keep - 1, data_size)
                break
            except BadRecord:
                keep -= 1
        del offsets[keep:]
        # Scan forward from the last indexed record (or the start) for more valid records.
        if keep:
            scan_from, scan_id = offsets[keep - 1], first_id + keep - 1
            del offsets[keep - 1 :]
        else:
            scan_from, scan_id = 0, first_id
        end = scan_from
        try:
            for off, rec in scan_records(seg._log_fd, scan_from, scan_id, data_size):
                offsets.append(off)
                end = off + rec.size
        except BadRecord:
            pass  # a torn tail: everything from `end` on goes
        # Zeros written ahead are free space, not lost data: count only the rest.
        cut = nonzero_end(seg._log_fd, end, data_size) - end
        if data_size > end:
            os.ftruncate(seg._log_fd, end)
        os.ftruncate(seg._idx_fd, 0)
        write_all(seg._idx_fd, offsets.tobytes())
        os.lseek(seg._log_fd, end, os.SEEK_SET)
        seg._offsets = offsets
        seg._idx_written = len(offsets)
        seg.count = len(offsets)
        seg.size = seg.allocated = end
        return seg, cut

    def rebuild_index(self) -> None:
        """Rewrite the index of a closed segment by scanning it (tmp file, fsync, rename)."""
        offsets = array("Q")
        fd = os.open(self.log_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for off, _rec in scan_records(fd, 0, self.first_id, self.size):
                offsets.append(off)
        except BadRecord as bad:
            raise CorruptRecordError(
                f"cannot rebuild index: {bad.reason}",
                where=self.log_path,
                offset=bad.offset,
                id=self.first_id + len(offsets),
            ) from None
        finally:
            os.close(fd)
        if len(offsets) != self.count:
            raise CorruptRecordError(
                f"segment holds {len(offsets)} records, expected {self.count}",
                where=self.log_path,
                id=self.first_id + len(offsets),
            )
        tmp = self.idx_path + ".tmp"
        tfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            write_all(tfd, offsets.tobytes())
            os.fsync(tfd)
        finally:
            os.close(tfd)
        os.replace(tmp, self.idx_path)

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
        self._reader = None

    # --- reading ---------------------------------------------------------------

    @property
    def last_id(self) -> int:
        """Id of the last record written (first_id - 1 when empty)."""
        return self.first_id + self.count - 1

    def reader(self) -> ReadHandle:
        """A shared read descriptor for pread."""
        if self._reader is None:
            self._reader = ReadHandle(self.log_path)
        return self._reader

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
        return self._view

    def read_record(self, id: int) -> Decoded:
        """Read and verify one record, raising `CorruptRecordError` if it is bad."""
        offset = self.offset_of(id)
        end = self.offset_of(id + 1)
        if not 0 <= offset < end <= self.size:
            # A closed index is only size-checked at open; a garbage entry must not
            # reach pread (negative or huge counts) or return the wrong bytes.
            raise CorruptRecordError(
                f"bad index entry in {self.idx_path} for id {id}: byte range {offset}..{end}"
                f" is not inside the {self.size} bytes of {self.log_path}",
                where=self.log_path,
                offset=offset,
                id=id,
            )
        data = os.pread(self.reader().fd, end - offset, offset)
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


def nonzero_end(fd: int, start: int, end: int) -> int:
    """The offset just after the last non-zero byte of ``[start, end)`` (``start`` if all zero)."""
    while end > start:
        chunk_start = max(start, end - SCAN_CHUNK)
        data = os.pread(fd, end - chunk_start, chunk_start)
        kept = len(data.rstrip(b"\0"))
        if kept:
            return chunk_start + kept
        end = chunk_start
    return start


def cut_zero_tail(path: str) -> bool:
    """Truncate the zeros ending a closed segment file, if any (records end with LF); say if there were."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if not size or os.pread(fd, 1, size - 1) != b"\0":
            return False
        os.ftruncate(fd, nonzero_end(fd, 0, size))
        os.fsync(fd)
        return True
    finally:
        os.close(fd)


def _read_whole(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


def _valid_index_prefix(offsets: array, data_size: int) -> int:
    """How many leading entries are plausible: start at 0, strictly increase, inside the data.

    After a crash the index may hold zeroed or missing pages (it is not
    synced with the data); such entries break the strict increase.
    """
    n = len(offsets)
    if n == 0 or offsets[0] != 0:
        return 0
    if all(map(operator.lt, offsets, islice(offsets, 1, None))):
        keep = n  # the usual case, checked at C speed
    else:
        keep = 1
        while offsets[keep - 1] < offsets[keep]:
            keep += 1
    while keep and offsets[keep - 1] >= data_size:
        keep -= 1
    return keep


def _read_record_at(fd: int, offset: int, id: int, data_size: int) -> Decoded:
    head = os.pread(fd, min(SCAN_CHUNK, data_size - offset), offset)
    try:
        return decode_record(head, 0, id)
    except BadRecord as bad:
        if not bad.truncated or len(head) >= data_size - offset:
            raise
    data = os.pread(fd, data_size - offset, offset)
    return decode_record(data, 0, id)
