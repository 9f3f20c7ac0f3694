"""Helpers shared by the storage tests: file surgery and child processes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from array import array
from pathlib import Path

from logd.storage.record import encode_record

ROOT = str(Path(__file__).resolve().parents[2])


def log_files(directory: str | Path) -> list[Path]:
    """The segment ``.log`` files of a data dir, oldest first."""
    return sorted(Path(directory).glob("*.log"))


def first_id_of(path: Path) -> int:
    return int(path.name[:20])


def flip_bit(path: str | Path, offset: int, bit: int = 0) -> None:
    """Flip one bit of a file in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def read_index(path: str | Path) -> list[int]:
    """The entries of an index file (ignoring a partial last entry)."""
    raw = Path(path).read_bytes()
    entries = array("Q")
    entries.frombytes(raw[: len(raw) - len(raw) % 8])
    return list(entries)


def layout(first_id: int, bodies: list[bytes]) -> list[tuple[int, int]]:
    """``(offset, end)`` of each record of a segment holding ``bodies`` from ``first_id``."""
    out = []
    pos = 0
    for k, body in enumerate(bodies):
        size = len(encode_record(first_id + k, body))
        out.append((pos, pos + size))
        pos += size
    return out


def python_child(code: str, *args: str, **kwargs: object) -> subprocess.Popen[bytes]:
    """Start ``python -c code args...`` with logd importable and pipes for stdin and stdout."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        **kwargs,
    )


def crash_body(id: int) -> bytes:
    """A body that encodes its id, of varying length, binary (the crash test's messages)."""
    return b"%d|" % id + bytes((id * 7 + k) % 256 for k in range(id % 300))


def forget_clean_close(directory: str | Path) -> None:
    """Remove the head saved at the last clean close, as if the log had crashed instead of closing.

    Tests that simulate a crash by closing a log and then cutting its files
    call this: a real crash leaves no up-to-date CLOSED_HEAD behind.
    """
    Path(directory, "CLOSED_HEAD").unlink(missing_ok=True)


def open_fds_under(directory: str | Path) -> set[str]:
    """This process's descriptors open on files under ``directory``.

    Only those: a thread or finalizer another test left behind may open or
    close descriptors of its own meanwhile.
    """
    prefix = os.path.realpath(directory) + os.sep
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            if os.readlink(f"/proc/self/fd/{fd}").startswith(prefix):
                fds.add(fd)
    return fds
