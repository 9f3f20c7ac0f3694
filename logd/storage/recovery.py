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

from ..errors import CorruptRecordError, DamagedLogError
from .files import (
    SCAN_CHUNK,
    count_records,
    cut_zero_tail,
    find_valid_record,
    nonzero_end,
    read_whole,
    scan_records,
    segment_firsts,
    write_all,
)
from .record import BadRecord, Decoded, decode_record
from .segment import INDEX_ENTRY, Segment


def open_segments(directory: str, closed_head: int = 0) -> tuple[list[Segment], int]:
    """Open a data dir's segments, oldest first, the newest recovered as the active one.

    Returns them and the bytes a crash left cut off (protocol.md section 2,
    "Recovery at open"); no segments for an empty dir. Raises
    `DamagedLogError`, having changed nothing, when a bad record is followed
    by valid ones or the records end before ``closed_head`` (the head at the
    last clean close).
    """
    firsts = segment_firsts(directory)
    active = None
    cut_bytes = 0
    while firsts:
        active, cut = recover_active(directory, firsts[-1], closed_head)
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
    try:
        closed = _open_closed(directory, firsts)
    except BaseException:
        if active is not None:
            active.close()  # the caller never sees it, so nothing else would close its descriptors
        raise
    return (closed + [active] if active is not None else closed), cut_bytes


def _open_closed(directory: str, firsts: list[int]) -> list[Segment]:
    """The closed segments (all of ``firsts`` but the last), oldest first."""
    closed: list[Segment] = []
    check_tail = True
    try:
        for first, nxt in reversed(list(zip(firsts, firsts[1:], strict=False))):
            check_tail = check_tail and cut_zero_tail(Segment(directory, first).log_path)
            try:
                closed.append(Segment.open_closed(directory, first, nxt - first))
            except CorruptRecordError as exc:  # its index had to be rebuilt, and the segment is bad
                raise DamagedLogError(
                    f"{exc}; run `logd check DATA_DIR` (and --repair to move the bad bytes aside)",
                    path=exc.where,
                    offset=exc.offset,
                    id=exc.id,
                ) from None
    except BaseException:
        for seg in closed:
            seg.close()  # an index map may be open
        raise
    closed.reverse()
    return closed


def recover_active(directory: str, first_id: int, closed_head: int = 0) -> tuple[Segment, int]:
    """Open the newest segment for appending, cutting off a torn tail.

    Returns the segment and the number of bytes cut from its data; raises
    `DamagedLogError` (before cutting anything) if what follows its last
    valid record is corruption rather than a torn tail.
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
        offsets, end, cut = _recover_files(probe.log_path, log_fd, idx_fd, first_id, closed_head)
    except BaseException:
        os.close(log_fd)
        os.close(idx_fd)
        raise
    return Segment.adopt_active(directory, first_id, log_fd, idx_fd, offsets, end), cut


def _recover_files(
    log_path: str, log_fd: int, idx_fd: int, first_id: int, closed_head: int
) -> tuple[array, int, int]:
    """Cut the segment after its last valid record and rewrite its index; return offsets, end, bytes cut.

    The index only says where to start scanning: after a power cut it may be
    short or hold garbage (it is never synced), so it is never taken as
    evidence of how many records there are.
    """
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
        pass  # a torn tail, unless valid records follow (checked next)
    # Zeros written ahead are free space, not lost data: count only the rest.
    used = nonzero_end(log_fd, end, data_size)
    cut = used - end
    next_id = first_id + len(offsets)
    _refuse_damage(log_path, log_fd, end, used, next_id, closed_head)
    if data_size > end:
        os.ftruncate(log_fd, end)
    os.ftruncate(idx_fd, 0)
    write_all(idx_fd, offsets.tobytes())
    os.lseek(log_fd, end, os.SEEK_SET)
    return offsets, end, cut


def _refuse_damage(log_path: str, fd: int, end: int, used: int, next_id: int, closed_head: int) -> None:
    """Raise `DamagedLogError` if the bytes after the last valid record are not a torn tail."""
    found = find_valid_record(fd, end, next_id, used) if used > end else None
    if found is not None:
        at, found_id = found
        following, _stop = count_records(fd, at, found_id, used)
        raise DamagedLogError(
            f"{log_path}: bad record at offset {end} (id {next_id}), followed by {following} valid records "
            f"from offset {at} (ids {found_id}..{found_id + following - 1}): this is corruption, not a torn "
            "tail; logd will not cut acknowledged records or hand their ids out again. "
            "Run `logd check --repair DATA_DIR` to move the bad bytes and everything after them "
            f"to {log_path}.broken",
            path=log_path,
            offset=end,
            id=next_id,
            following=following,
        )
    if next_id <= closed_head:
        raise DamagedLogError(
            f"{log_path}: the log was closed cleanly at id {closed_head} but its records end at id "
            f"{next_id - 1} (offset {end}): ids {next_id}..{closed_head} were lost to damage (a truncated or "
            "overwritten file), not to a crash; logd will not hand their ids out again. Restore the data dir "
            "from a replica or backup, or run `logd check --repair DATA_DIR` to accept the loss",
            path=log_path,
            offset=end,
            id=next_id,
        )


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
