"""Cutting a log back to an earlier id, keeping what is cut in a file (a follower repairing divergence).

A follower whose newest records were never on its new leader (protocol.md
3.4, "Truncation") drops them, but never silently: first they are copied, as
stored, into ``dropped-e<epoch>-<first id>.dropped`` in the data dir (a valid
record stream: ``cat``, `logd read`-style tools and `decode_record` read it),
synced, and only then are the segments cut.
"""

from __future__ import annotations

import os

from .files import fsync_dir, remove_quietly, write_all
from .segment import INDEX_ENTRY, Segment

DROPPED_PREFIX = "dropped-"


def dropped_name(epoch: int, first_id: int) -> str:
    """The file holding records dropped from ``first_id`` on, the first of them in ``epoch``."""
    return f"{DROPPED_PREFIX}e{epoch}-{first_id:020d}.dropped"


def save_dropped(directory: str, segments: list[Segment], first_id: int, path: str) -> int:
    """Copy the records from ``first_id`` to the end of ``segments`` into ``path``; return the bytes.

    The segments must be closed to writes or synced (their sizes and indexes
    are what is on disk). Written to a temp file, fsynced and renamed.
    """
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        total = _copy_records(fd, segments, first_id)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except OSError:
        if fd >= 0:
            os.close(fd)
        remove_quietly(tmp)  # nothing was cut yet: a full disk leaves the log whole and no debris
        raise
    return total


def _copy_records(fd: int, segments: list[Segment], first_id: int) -> int:
    """Write the stored records from ``first_id`` on to ``fd``; return the bytes written."""
    total = 0
    for seg in segments:
        if seg.last_id < first_id:
            continue
        begin = seg.offset_of(max(first_id, seg.first_id))
        rfd = os.open(seg.log_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            pos = begin
            while pos < seg.size:
                data = os.pread(rfd, min(1 << 20, seg.size - pos), pos)
                if not data:
                    break
                write_all(fd, data)
                pos += len(data)
                total += len(data)
        finally:
            os.close(rfd)
    return total


def cut_files(directory: str, cut: Segment, offset: int, keep: int, later: list[Segment]) -> None:
    """Cut the files: ``later`` segments deleted (newest first), ``cut`` truncated to ``keep`` records
    ending at byte ``offset``. The `Segment` objects must be closed already.

    A crash part-way leaves a valid prefix that recovery at open accepts
    (and the follower simply cuts again at its next handshake).
    """
    for seg in reversed(later):
        for p in (seg.log_path, seg.idx_path):
            if os.path.exists(p):
                os.unlink(p)
    for path, size in ((cut.log_path, offset), (cut.idx_path, keep * INDEX_ENTRY)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(directory)
