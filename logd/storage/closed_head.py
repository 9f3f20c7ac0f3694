"""The head at the last clean close, kept so recovery can tell lost records from a torn tail.

A torn tail and a tail cut off by damage (a truncated or zero-filled file)
look alike; only a record of how far the log reached tells them apart. At a
clean close `Log.close` saves its head here (synced); at open, a log whose
records end before that id has lost acknowledged records and refuses to
start (protocol.md section 2). Ids only grow, so an old value is a safe
lower bound: after a crash the log holds at least what it held at the last
clean close.
"""

from __future__ import annotations

import os

from .files import replace_durably

FILE = "CLOSED_HEAD"


def load(directory: str | os.PathLike[str]) -> int:
    """The head saved at the last clean close; 0 when there is none (a new or older data dir)."""
    try:
        with open(os.path.join(directory, FILE), "rb") as f:
            token = f.read(32).strip()
    except FileNotFoundError:
        return 0
    if not token.isdigit() or len(token) > 19:
        # Written with a rename after an fsync: garbage here is damage too.
        raise ValueError(f"{os.path.join(directory, FILE)} does not hold an id: {token[:20]!r}")
    return int(token)


def save(directory: str | os.PathLike[str], head: int) -> None:
    """Replace the saved head with ``head``: a temp file, fsynced, renamed over, the dir fsynced."""
    replace_durably(os.path.join(directory, FILE), b"%d\n" % head)
