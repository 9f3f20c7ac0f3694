"""The data dir's LOCK: one logd process per directory (flock, holding the owner's pid)."""

from __future__ import annotations

import errno
import fcntl
import os

from ..errors import LockedError

LOCK_NAME = "LOCK"


def take_lock(directory: str) -> int:
    """Take the data dir's LOCK flock (protocol.md section 2) and write our pid; return its fd.

    Raises `LockedError` naming the holder's pid when another process has it.
    Closing the fd releases the lock.
    """
    fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            os.close(fd)
            raise
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        pid = int(holder) if holder.isdigit() else None
        raise LockedError(
            f"data dir {directory} is in use by another logd process (pid {holder or '?'})", pid=pid
        ) from None
    os.ftruncate(fd, 0)
    line = f"{os.getpid()}\n".encode()
    try:
        if os.pwrite(fd, line, 0) < len(line):
            os.ftruncate(fd, 0)  # a cut pid would name another process; none names none
    except OSError:
        pass  # the pid is for the operator's messages; the flock is the lock
    return fd
