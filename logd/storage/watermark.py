"""The saved high watermark: what readers could see, kept across restarts (protocol.md 2)."""

from __future__ import annotations

import os

from .files import remove_quietly

FILE = "HIGH_WATERMARK"


def load(directory: str | os.PathLike[str]) -> int:
    """The high watermark last saved in ``directory``; 0 when there is none or it is unreadable.

    0 is always safe: it only hides records until replicas confirm them again.
    """
    try:
        with open(os.path.join(directory, FILE), "rb") as f:
            text = f.read(32)
    except OSError:
        return 0
    token = text.strip()
    return int(token) if token.isdigit() and len(token) <= 19 else 0


def save(directory: str | os.PathLike[str], hw: int) -> None:
    """Replace the saved high watermark with ``hw`` (write a temp file, rename it over).

    Not fsynced: after a power loss the file may be old or empty, and either
    only shows readers less until the replicas confirm more.
    """
    path = os.path.join(directory, FILE)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:  # a buffered file: a short write is retried, a failure raised
            f.write(b"%d\n" % hw)
        os.replace(tmp, path)
    except OSError:
        remove_quietly(tmp)
        raise
