"""Segment files as plain files: their names, scanning their records, zeros at their end.

No state: `Segment` (segment.py), recovery and `logd check` build on these.
See protocol.md section 2 for the format.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

from .record import MAX_HEADER_BYTES, BadRecord, Decoded, decode_record

NAME_DIGITS = 20
SCAN_CHUNK = 1 << 20  # bytes read at a time when scanning a segment


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
    n = os.write(fd, data)
    if n < len(data):
        view = memoryview(data)[n:]
        while view:
            n = os.write(fd, view)
            view = view[n:]


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


def read_whole(fd: int) -> bytes:
    """The whole file behind ``fd``."""
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


# A record header (protocol.md section 1), for finding records after a bad one.
_HEADER = re.compile(rb"\+([1-9][0-9]{0,18}) (0|[1-9][0-9]{0,18}) [0-9a-f]{8}\r\n")


def find_valid_record(fd: int, start: int, min_id: int, end: int) -> tuple[int, int] | None:
    """The first ``(offset, id)`` in ``[start, end)`` where a whole valid record starts.

    Its header must parse, its CRC check and its id "fit": at least
    ``min_id`` (the id the bad record should have had) and no further on
    than the bytes left could hold. Recovery and `logd check` use this to
    tell corruption (valid records follow the bad bytes) from a torn tail.
    """
    max_id = min_id + (end - start)  # a record is well over one byte long
    pos = start
    while pos < end:
        chunk = os.pread(fd, min(SCAN_CHUNK + MAX_HEADER_BYTES, end - pos), pos)
        for match in _HEADER.finditer(chunk):
            if match.start() >= SCAN_CHUNK:
                break  # the next chunk starts here
            rid = int(match.group(1))
            if not min_id <= rid <= max_id:
                continue
            offset = pos + match.start()
            try:
                decode_record(chunk, match.start(), rid)
            except BadRecord as bad:
                if not bad.truncated:
                    continue
                try:  # a record running past the chunk: read it whole
                    whole = os.pread(fd, min(end - offset, int(match.group(2)) + len(match.group(0)) + 2), offset)
                    decode_record(whole, 0, rid)
                except BadRecord:
                    continue
            return offset, rid
        pos += SCAN_CHUNK
    return None


def count_records(fd: int, offset: int, first_id: int, end: int) -> tuple[int, int]:
    """How many valid records with continuous ids start at ``offset``, and where they end."""
    n = 0
    stop = offset
    try:
        for off, rec in scan_records(fd, offset, first_id, end):
            n += 1
            stop = off + rec.size
    except BadRecord:
        pass
    return n, stop


def fsync_dir(directory: str) -> None:
    """fsync a directory, so renames, creations and deletions in it are durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(path: str, data: bytes) -> None:
    """Make ``data`` the content of ``path``, whole or not at all, even across a power cut.

    Written to ``<path>.tmp`` and fsynced, renamed over ``path``, then the
    directory fsynced: a crash leaves either the old file or the new one,
    never a mix, and once this returns the new one survives.
    """
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        remove_quietly(tmp)  # a part-written temp file must not keep the space a full disk lacks
        raise
    fsync_dir(os.path.dirname(path) or ".")


def remove_quietly(path: str) -> None:
    """Delete ``path`` if it is there, ignoring failure (cleaning up after an error already raised)."""
    try:
        os.unlink(path)
    except OSError:
        pass
