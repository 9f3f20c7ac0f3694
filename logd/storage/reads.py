"""What reading the log returns: `Span` (a byte range of whole records) and `Record`."""

from __future__ import annotations

from typing import NamedTuple

from .segment import ReadHandle


class Span(NamedTuple):
    """A byte range of one segment holding whole records ``first_id..last_id``."""

    handle: ReadHandle
    start: int  # byte offset of first_id's record
    end: int  # byte offset just after last_id's record
    first_id: int
    last_id: int
    path: str


class Record(NamedTuple):
    """A stored message, as returned by `Log.read`."""

    id: int
    body: bytes
    crc: int
