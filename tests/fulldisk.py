"""A real full disk for tests: a small tmpfs mounted under the test's directory, filled to the brim.

Mounting needs root (the tests run as root, as CI does); where it is
impossible the test is skipped, saying why. tmpfs hands out space a page
(4 KiB) at a time, so once it is full a write that crosses into a new page
is cut short there: the short write a real disk gives when it fills up.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

PAGE = 4096


@contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """``where`` as the mount point of a new tmpfs of ``size`` (e.g. ``8m``), unmounted afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to play a full disk (it needs root, as CI runs): {done.stderr.strip()}")
    try:
        yield where
    finally:
        # A server the test started may still hold files here (the fixture stops it after us):
        # a lazy unmount detaches the mount now and frees it once the last file is closed.
        if subprocess.run(["umount", str(where)], capture_output=True, timeout=60).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=60, check=True)


def fill(directory: Path, name: str = "filler") -> Path:
    """Write a file in ``directory`` until its file system has not one byte left; return its path."""
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for size in (1 << 20, 1 << 16, PAGE, 1):
            block = b"\xa5" * size
            try:
                while os.write(fd, block) == size:
                    pass
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return path


def free_space(directory: Path) -> int:
    """Bytes a new file could take on ``directory``'s file system."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize
