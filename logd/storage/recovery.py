"""Recovery at open (protocol.md section 2): find where each segment's valid records end.

Only the newest segments are examined, so start-up time does not grow with
the log: the active one is scanned from its last good index entry, and the
newest closed ones are checked for zeros a crash left after their records.
"""

from __future__ import annotations

import operator
import os
from array import array
from itertools import islice

from .files import SCAN_CHUNK, cut_zero_tail, nonzero_end, read_whole, scan_records, segment_firsts, write_all
from .record import BadRecord, Decoded, decode_record
from .segment import INDEX_ENTRY, Segment


def open_segments(directory: str) -> tuple[list[Segment], int]:
    """Open a data dir's segments, oldest first, the newest recovered as the active one.

    Returns them and the bytes a crash left cut off (protocol.md section 2,
    "Recovery at open"); no segments for an empty dir.
    """
    firsts = segment_firsts(directory)
    active = None
    cut_bytes = 0
    while firsts:
        active, cut = recover_active(directory, firsts[-1])
        cut_bytes += cut
        if active.count or len(firsts) == 1:
            break
        # A crash right after a roll: drop the newest segment, which holds
        # no record, and recover the previous one, which may not have been synced.
        active.close()
        active.delete()
        firsts.pop()
    # A crash between a roll and its sync may leave zeros after the newest
    # closed segments; those before the newest clean one were synced.
    closed: list[Segment] = []
    check_tail = True
    for first, nxt in reversed(list(zip(firsts, firsts[1:], strict=False))):
        check_tail = check_tail and cut_zero_tail(Segment(directory, first).log_path)
        closed.append(Segment.open_closed(directory, first, nxt - first))
    closed.reverse()
    return (closed + [active] if active is not None else closed), cut_bytes


def recover_active(directory: str, first_id: int) -> tuple[Segment, int]:
    """Open the newest segment for appending, cutting off a torn tail.

    Returns the segment and the number of bytes cut from its data.
    """
    probe = Segment(directory, first_id)
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
    log_fd = os.open(probe.log_path, flags, 0o644)
    try:
        idx_fd = os.open(probe.idx_path, flags, 0o644)
    except OSError:
        os.close(log_fd)
        raise
    try:
        offsets, end, cut = _recover_files(log_fd, idx_fd, first_id)
    except BaseException:
        os.close(log_fd)
        os.close(idx_fd)
        raise
    return Segment.adopt_active(directory, first_id, log_fd, idx_fd, offsets, end), cut


def _recover_files(log_fd: int, idx_fd: int, first_id: int) -> tuple[array, int, int]:
    """Cut the segment after its last valid record and rewrite its index; return offsets, end, bytes cut."""
    data_size = os.fstat(log_fd).st_size
    raw = read_whole(idx_fd)
    offsets = array("Q")
    offsets.frombytes(raw[: len(raw) - len(raw) % INDEX_ENTRY])
    keep = _valid_index_prefix(offsets, data_size)
    # The last kept entry must point at a record with the right id.
    while keep > 0:
        try:
            _read_record_at(log_fd, offsets[keep - 1], first_id + keep - 1, data_size)
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
        for off, rec in scan_records(log_fd, scan_from, scan_id, data_size):
            offsets.append(off)
            end = off + rec.size
    except BadRecord:
        pass  # a torn tail: everything from `end` on goes
    # Zeros written ahead are free space, not lost data: count only the rest.
    cut = nonzero_end(log_fd, end, data_size) - end
    if data_size > end:
        os.ftruncate(log_fd, end)
    os.ftruncate(idx_fd, 0)
    write_all(idx_fd, offsets.tobytes())
    os.lseek(log_fd, end, os.SEEK_SET)
    return offsets, end, cut


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
