"""Replies (server -> client): the server's encoders and the client's reply types (protocol.md 3.2)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from logd.errors import (
    ServerError,
)

# --- replies (server -> client) ----------------------------------------------

PONG: bytes = b"PONG\r\n"
EOF: bytes = b"+EOF\r\n"


def _clean(text: str) -> bytes:
    """Reply text on one line: CR and LF would end it early."""
    return text.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace")


def ok(value: int | str | None = None) -> bytes:
    """``OK`` or ``OK <value>``."""
    if value is None:
        return b"OK\r\n"
    if isinstance(value, int):
        return b"OK %d\r\n" % value
    return b"OK %s\r\n" % _clean(value)


# ``OK <id>`` for a committed MSG: the hottest reply, formatted at C speed.
ok_id = b"OK %d\r\n".__mod__

# ERR replies built in this process, by code (the server's metrics: failures by error code).
ERRORS_SENT: Counter[str] = Counter()


def error_reply(exc: ServerError) -> bytes:
    """``ERR <CODE> <message>`` for any server-side error (counted in `ERRORS_SENT`)."""
    ERRORS_SENT[exc.code] += 1
    if not exc.message:
        return b"ERR %s\r\n" % exc.code.encode()
    return b"ERR %s %s\r\n" % (exc.code.encode(), _clean(exc.message))


def stats_reply(stats: dict[str, object]) -> bytes:
    """``OK <n>`` then one ``<name> <value>`` line per entry (spaces in values become ``_``)."""
    lines = [b"OK %d\r\n" % len(stats)]
    for name, value in stats.items():
        lines.append(b"%s %s\r\n" % (_word(name), _word(str(value))))
    return b"".join(lines)


def _word(text: str) -> bytes:
    """A STATS name or value: no spaces (they separate the two), no line ends."""
    return _clean(text).replace(b" ", b"_") or b"-"



@dataclass(frozen=True, slots=True)
class OkReply:
    """``OK`` (value None) or ``OK <value>``; READ/REPLICATE get one before their records."""

    value: str | None


@dataclass(frozen=True, slots=True)
class PongReply:
    """``PONG``."""


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """``ERR <code> <message>``; `errors.error_from_reply` makes the matching exception."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class StatsReply:
    """The ``<name> <value>`` lines of a STATS reply."""

    values: dict[str, str]


@dataclass(frozen=True, slots=True)
class Record:
    """One record of a READ/REPLICATE stream; framing, id and CRC already checked."""

    id: int
    body: bytes


# A record as a plain ``(id, body)`` tuple: what `ReadRows` streams give, checked as a `Record` is.
# A plain tuple is what database drivers bind fastest (sqlite3's executemany, COPY), with no
# per-row Python work; it is built in C straight from the received bytes.
RecordRow = tuple[int, bytes]


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """``+EOF``: the READ is over."""


Reply = OkReply | PongReply | ErrorReply | StatsReply | Record | RecordRow | EndOfStream

_PONG_REPLY = PongReply()
_EOF_REPLY = EndOfStream()
_OK_REPLY = OkReply(None)
# Slot setters, to build records without the frozen dataclass __init__.
_set_record_id = Record.__dict__["id"].__set__
_set_record_body = Record.__dict__["body"].__set__

# What each outstanding command will be answered with.
