"""Offline verification and repair of a data directory (``logd check``).

Modelled on leveldb's log reader: every problem is reported with where it is
(segment file, byte offset, id), why, and how many bytes it costs. A record
cut off at the very end of the active segment is a crash during a write, not
corruption: it is reported as a note (logd itself cuts it at open), like an
active index of the wrong size (it is written after the data and not synced)
and zeros written ahead of the data (preallocation under ``fsync=always``).

The files are read directly, never through a `Log` opened for writing, but the
LOCK flock is held while checking so a server cannot start meanwhile.
"""

from __future__ import annotations

import os
import sys
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TextIO

from ..errors import LockedError, StorageError
from . import closed_head
from .cursors import FILE as CURSORS_FILE
from .cursors import CursorStore, decode_lines
from .epochs import FILE as EPOCHS_FILE
from .epochs import Epochs
from .files import (
    count_records,
    find_valid_record,
    fsync_dir,
    nonzero_end,
    replace_durably,
    scan_records,
    segment_firsts,
    segment_name,
    write_all,
)
from .log import take_lock
from .record import BadRecord, decode_record
from .segment import INDEX_ENTRY

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_CANNOT_CHECK = 2


@dataclass
class _Scan:
    """What scanning one segment found: its valid records, then what stopped the scan."""

    first_id: int
    log_path: str
    idx_path: str
    size: int  # bytes in the .log file
    offsets: array = field(default_factory=lambda: array("Q"))  # of the valid records
    end: int = 0  # byte just after the last valid record
    bad: str | None = None  # why the bytes at `end` are not the next record
    truncated: bool = False  # ... and whether they are a record cut off by the end of file
    zeros: int = 0  # zero bytes ending the active segment's file (written ahead of the data)
    following: int = 0  # valid records found after the bad bytes (0: a torn tail, if active)
    following_at: int = -1  # ... the byte offset of the first of them
    following_id: int = 0  # ... and its id

    @property
    def next_id(self) -> int:
        return self.first_id + len(self.offsets)


def _scan(path: str, first_id: int, limit: int | None) -> _Scan:
    """Scan a segment from its start, verifying each record, up to ``limit`` records."""
    stem = os.path.join(path, segment_name(first_id))
    fd = os.open(stem + ".log", os.O_RDONLY | os.O_CLOEXEC)
    try:
        s = _Scan(first_id, stem + ".log", stem + ".idx", os.fstat(fd).st_size)
        try:
            # Stop at the limit before decoding further: the bytes after it are not records.
            for off, rec in scan_records(fd, 0, first_id, s.size):
                s.offsets.append(off)
                s.end = off + rec.size
                if len(s.offsets) == limit:
                    break
        except BadRecord as bad:
            s.bad, s.truncated = bad.reason, bad.truncated
            if limit is None:
                _look_past_zeros(fd, s)
            if s.bad is not None:
                _look_for_valid_records(fd, s)
    finally:
        os.close(fd)
    return s


def _look_past_zeros(fd: int, s: _Scan) -> None:
    """Tell zeros written ahead (and a record cut off by them) from a bad record, in the active segment."""
    used = nonzero_end(fd, s.end, s.size)
    s.zeros = s.size - used
    if used == s.end:
        s.bad = None  # nothing but zeros after the last record
        return
    try:
        decode_record(os.pread(fd, used - s.end, s.end), 0, s.next_id)
    except BadRecord as bad:
        s.bad, s.truncated = bad.reason, bad.truncated


def _look_for_valid_records(fd: int, s: _Scan) -> None:
    """Count the valid records after a bad one: any at all make it corruption, not a torn tail."""
    used = s.size - s.zeros
    found = find_valid_record(fd, s.end, s.next_id, used)
    if found is not None:
        s.following_at, s.following_id = found
        s.following, _stop = count_records(fd, s.following_at, s.following_id, used)


def _iter_crcs(path: str) -> Iterator[tuple[int, int]]:
    """``(id, crc)`` of each record of a data dir, up to its first bad record or missing id."""
    firsts = segment_firsts(path)
    for i, first in enumerate(firsts):
        limit = firsts[i + 1] - first if i + 1 < len(firsts) else None
        stem = os.path.join(path, segment_name(first))
        fd = os.open(stem + ".log", os.O_RDONLY | os.O_CLOEXEC)
        n = 0
        try:
            for _off, rec in scan_records(fd, 0, first, os.fstat(fd).st_size):
                yield rec.id, rec.crc
                n += 1
                if n == limit:
                    break
        except BadRecord:
            return
        finally:
            os.close(fd)
        if limit is not None and n < limit:
            return


def diverge_point(dir_a: str, dir_b: str) -> int | None:
    """The first id whose record differs between two data dirs, or None.

    Compares the CRCs of the ids both dirs hold (from the larger first id to
    the smaller last id). None means they agree there: one log is a prefix of
    the other (or they share no id). Each log counts up to its first bad
    record or missing id, as `check_data_dir` would repair it. Takes no lock,
    so it is meant for stopped servers or copies. Raises `StorageError` if a
    path is not a data dir.
    """
    for path in (dir_a, dir_b):
        if not os.path.isdir(path) or not segment_firsts(path):
            raise StorageError(f"{path} is not a logd data dir (no segment files)")
    a, b = _iter_crcs(dir_a), _iter_crcs(dir_b)
    ra, rb = next(a, None), next(b, None)
    while ra is not None and rb is not None:
        if ra[0] < rb[0]:
            ra = next(a, None)
        elif rb[0] < ra[0]:
            rb = next(b, None)
        elif ra[1] != rb[1]:
            return ra[0]
        else:
            ra, rb = next(a, None), next(b, None)
    return None


def check_data_dir(path: str, *, repair: bool = False, out: TextIO = sys.stdout) -> int:
    """Verify every record and index entry of the data dir ``path``; with ``repair``, fix it.

    Prints one line per problem (segment or index file, byte offset, id,
    reason) and a summary to ``out``. Repair truncates the log at the first
    bad record (that segment is cut and its index rewritten, every later
    segment deleted) after printing which ids and bytes that loses; an index
    that does not match good data is rebuilt. Returns 0 if the dir is sound,
    1 if problems were found (and repaired, with ``repair``), 2 if it cannot
    be checked (not a data dir, or locked by a running logd).
    """

    def say(line: str) -> None:
        print(line, file=out)

    if not os.path.isdir(path) or not segment_firsts(path):
        say(f"logd check: {path} is not a logd data dir (no segment files)")
        return EXIT_CANNOT_CHECK
    try:
        lock_fd = take_lock(path)
    except (LockedError, OSError) as exc:
        say(f"logd check: cannot check: {exc}")
        return EXIT_CANNOT_CHECK
    try:
        return _check(path, repair, say)
    except (OSError, ValueError) as exc:  # e.g. a directory named like a segment
        say(f"logd check: cannot check {path}: {exc}")
        return EXIT_CANNOT_CHECK
    finally:
        os.close(lock_fd)  # drops the flock


def _check(path: str, repair: bool, say: Callable[[str], None]) -> int:
    firsts = segment_firsts(path)  # again, now that no server can roll or delete
    scans = [
        _scan(path, first, firsts[i + 1] - first if i + 1 < len(firsts) else None) for i, first in enumerate(firsts)
    ]
    problems = 0
    cut: tuple[int, int] | None = None  # (segment index, byte offset) where the log must end
    for i, s in enumerate(scans):
        active = i == len(scans) - 1
        where = f"{s.log_path}: offset {s.end}: id {s.next_id}:"
        ok = False
        if s.zeros and (s.bad is None or s.truncated):
            say(
                f"{s.log_path}: offset {s.size - s.zeros}: note: {s.zeros} bytes of zeros written ahead "
                "(preallocated under fsync=always; logd cuts them at open)"
            )
        if s.bad is not None and active and not s.following:
            # What recovery cuts at open: a record cut off, or bytes no valid record follows.
            what = "a cut-off record" if s.truncated else f"bytes that are not a record ({s.bad})"
            say(
                f"{where} note: torn tail, {what} of {s.size - s.zeros - s.end} bytes "
                "that no valid record follows (a crash during a write; logd cuts it at open)"
            )
            ok = True
        elif s.bad is not None and s.following:
            say(
                f"{where} bad record: {s.bad}; {s.following} valid records follow from offset "
                f"{s.following_at} (ids {s.following_id}..{s.following_id + s.following - 1}): corruption, "
                f"not a torn tail ({s.size - s.end} bytes from here)"
            )
        elif s.bad is not None:
            say(f"{where} bad record: {s.bad} ({s.size - s.end} bytes from here unreadable)")
        elif not active and s.next_id < firsts[i + 1]:
            say(
                f"{where} segment ends early: ids {s.next_id}..{firsts[i + 1] - 1} missing "
                f"(next segment starts at {firsts[i + 1]})"
            )
        else:
            ok = True
            if s.end + s.zeros < s.size:  # only a closed segment stops before its end
                say(f"{where} {s.size - s.end} bytes after the segment's last id {s.next_id - 1}")
                problems += 1
        if not ok:
            problems += 1
            cut = cut or (i, s.end)
        problems += _check_index(s, complete=ok, active=active, say=say)

    kept = scans if cut is None else scans[: cut[0] + 1]
    last_id = kept[-1].next_id - 1
    try:
        # Loaded before anything is changed: a repair that stopped half-way, at
        # an EPOCHS it cannot read, would leave the log cut and EPOCHS unmatched.
        epochs: Epochs | None = Epochs.load(path)
    except StorageError as exc:
        say(f"{exc} (logd will not start with it)")
        epochs = None
        problems += 1
    if epochs is not None and epochs.unverified:
        say(f"{epochs.path}: note: {epochs.unverified}; it may have lost its `refused` line, so logd starts "
            "read-only until ACCEPT")
    if not repair:
        _note_cursors_past(path, last_id, "logd moves them back to it at open" if cut is None
                           else "--repair moves them back to it", say)
    try:
        saved = closed_head.load(path)
    except ValueError as exc:
        say(f"{exc} (logd will not start with it)")
        saved = 0
        problems += 1
    if saved > last_id and cut is None:  # with a cut, the bad record is the damage reported
        s = kept[-1]
        say(
            f"{s.log_path}: offset {s.end}: id {last_id + 1}: the log was closed cleanly at id {saved} but its "
            f"records end at id {last_id}: ids {last_id + 1}..{saved} lost to damage (logd will not start)"
        )
        problems += 1
    ids = f"ids {firsts[0]}..{last_id}" if last_id >= firsts[0] else "no records"
    say(
        f"{len(scans)} segments, {sum(len(s.offsets) for s in kept)} records, {ids}, "
        f"{sum(s.size for s in scans)} bytes: " + (f"{problems} problem{'s' * (problems > 1)}" if problems else "OK")
    )
    if repair and epochs is None:
        say(f"logd check: refusing to repair: {os.path.join(path, EPOCHS_FILE)} cannot be read; "
            "nothing was changed; fix or restore it (protocol.md section 2) and run the repair again")
        return EXIT_CANNOT_CHECK
    if repair and epochs is not None:
        _repair(path, scans, cut, epochs, say)
    return EXIT_PROBLEMS if problems else EXIT_OK


def _check_index(s: _Scan, *, complete: bool, active: bool, say: Callable[[str], None]) -> int:
    """Compare a segment's index with its valid records; print and count the problems."""
    try:
        with open(s.idx_path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        say(f"{s.idx_path}: offset 0: id {s.first_id}: index missing")
        return 1
    entries = array("Q")
    entries.frombytes(raw[: len(raw) - len(raw) % INDEX_ENTRY])
    n = len(s.offsets)
    common = min(n, len(entries))
    if entries[:common] != s.offsets[:common]:
        wrong = [k for k in range(common) if entries[k] != s.offsets[k]]
        k = wrong[0]
        what = (
            f"{s.idx_path}: offset {k * INDEX_ENTRY}: id {s.first_id + k}: index entry says "
            f"offset {entries[k]}, the record is at {s.offsets[k]} ({len(wrong)} entries wrong)"
        )
        if active:  # never synced, so a crash leaves garbage in it; recovery rebuilds it
            say(f"{what.replace(' index entry', ' note: index entry', 1)} (logd fixes the active index at open)")
            return 0
        say(what)
        return 1
    if not complete or len(raw) == n * INDEX_ENTRY:
        return 0
    where = f"{s.idx_path}: offset {min(len(raw), n * INDEX_ENTRY)}: id {s.first_id + common}:"
    size = f"index is {len(raw)} bytes, {n} records need {n * INDEX_ENTRY}"
    if active:  # the index is written after the data and not synced: a crash leftover
        say(f"{where} note: {size} (logd fixes the active index at open)")
        return 0
    say(f"{where} {size}")
    return 1


def _repair(
    path: str, scans: list[_Scan], cut: tuple[int, int] | None, epochs: Epochs, say: Callable[[str], None]
) -> None:
    """Cut the log at ``cut``, moving what follows to ``.broken`` files; make kept files match their records."""
    if cut is not None:
        i, offset = cut
        s = scans[i]
        later = scans[i + 1 :]
        moved = s.following + sum(len(t.offsets) for t in later)
        say(
            f"repair: truncating the log after id {s.next_id - 1}: moving the bad record at id {s.next_id} and "
            f"everything after it ({moved} valid records, {s.size - offset + sum(t.size for t in later)} bytes, "
            f"{len(later)} later segments) to .broken files; they are kept, not deleted"
        )
        for t in reversed(later):  # newest first: a crash leaves a valid prefix
            broken = _free_name(t.log_path + ".broken")
            say(f"repair: moving segment {t.log_path} ({len(t.offsets)} valid records) to {broken}")
            os.replace(t.log_path, broken)
            if os.path.exists(t.idx_path):
                os.unlink(t.idx_path)  # derived from the segment; rebuilt if it is ever put back
        if later:
            fsync_dir(os.path.dirname(later[0].log_path))  # the renames are durable before any cut
        scans = scans[: i + 1]
    for s in scans:
        if s.size != s.end:
            _move_tail(s, say)
        want = s.offsets.tobytes()
        try:
            with open(s.idx_path, "rb") as f:
                same = f.read() == want
        except FileNotFoundError:
            same = False
        if not same:
            say(f"repair: {s.idx_path}: rebuilt ({len(s.offsets)} entries)")
            replace_durably(s.idx_path, want)
    first, last = scans[0].first_id, scans[-1].next_id - 1
    try:
        saved = closed_head.load(path)
    except ValueError:
        saved = last + 1
    if saved > last:
        say(f"repair: accepting the loss of ids {last + 1}..{saved}: the next message gets id {last + 1}")
    _forget_epochs_after(epochs, last + 1, say)
    _cut_cursors_back(path, last, say)
    closed_head.save(path, last)  # fsyncs the dir, making the renames above durable too
    say("repair: done; the log now holds " + (f"ids {first}..{last}" if last >= first else "no records"))


def _forget_epochs_after(epochs: Epochs, next_id: int, say: Callable[[str], None]) -> None:
    """Leader epochs that start past the repaired log's next id no longer describe it (protocol.md 3.4)."""
    before = list(epochs.entries)
    epochs.truncate_after(next_id)  # keeps an epoch that starts at the next id (no record yet)
    if epochs.entries != before:
        say(f"repair: EPOCHS: forgot the epochs that started after id {next_id}")


def _note_cursors_past(path: str, last_id: int, fix: str, say: Callable[[str], None]) -> None:
    """Say which cursors are past the log's last id (and what moves them back: ``fix``)."""
    try:
        with open(os.path.join(path, CURSORS_FILE), "rb") as f:
            cursors, _bad = decode_lines(f.read())
    except FileNotFoundError:
        return
    past = {name: id for name, id in cursors.items() if id > last_id}
    if past:
        say(f"{os.path.join(path, CURSORS_FILE)}: note: {len(past)} cursors past the last id {last_id} "
            f"({_some(past)}); {fix}")


def _cut_cursors_back(path: str, last: int, say: Callable[[str], None]) -> None:
    """Cursors past the repaired log's last id go back to it: their consumers must read the ids handed out again."""
    if not os.path.exists(os.path.join(path, CURSORS_FILE)):
        return
    store = CursorStore(path)
    try:
        past = store.cut_back(last)
    finally:
        store.close()
    if past:
        say(f"repair: CURSORS: {len(past)} cursors moved back to {last} ({_some(past)}): their consumers read "
            f"ids {last + 1}.. again when they are written")


def _some(cursors: dict[str, int], shown: int = 10) -> str:
    """``name at id, ...`` for the first few cursors by name."""
    names = sorted(cursors)
    text = ", ".join(f"{name} at {cursors[name]}" for name in names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _free_name(path: str) -> str:
    """``path``, or ``path.2``, ``path.3``, ... if it exists (an earlier repair's file is kept)."""
    name, n = path, 1
    while os.path.exists(name):
        n += 1
        name = f"{path}.{n}"
    return name


def _move_tail(s: _Scan, say: Callable[[str], None]) -> None:
    """Cut a segment after its valid records; bytes other than trailing zeros go to ``<segment>.broken`` first."""
    fd = os.open(s.log_path, os.O_RDWR | os.O_CLOEXEC)
    try:
        used = nonzero_end(fd, s.end, s.size)
        if used > s.end:
            broken = _free_name(s.log_path + ".broken")
            say(f"repair: {s.log_path}: moving {used - s.end} bytes from offset {s.end} to {broken}")
            out = os.open(broken, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                pos = s.end
                while pos < used:
                    chunk = os.pread(fd, min(1 << 20, used - pos), pos)
                    write_all(out, chunk)
                    pos += len(chunk)
                os.fsync(out)  # the copy is durable before the original is cut
            finally:
                os.close(out)
            fsync_dir(os.path.dirname(s.log_path))  # and so is its name
        else:
            say(f"repair: {s.log_path}: cutting {s.size - s.end} zero bytes at offset {s.end}")
        os.ftruncate(fd, s.end)
        os.fsync(fd)
    finally:
        os.close(fd)
