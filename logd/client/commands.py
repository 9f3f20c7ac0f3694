"""What the two clients share: each command written once, URLs, the retry policy, deadlines.

A `Call` is one command: what to send, whether it may be sent again after a
failure, and how its replies become a Python value. `Client` and
`AsyncClient` only move calls over their transports.
"""

from __future__ import annotations

import select
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog
import tenacity

from .. import defaults, errors
from ..protocol import (
    CURSORS_MAX,
    DEFAULT_PORT,
    Accept,
    Auth,
    Command,
    Commit,
    Cursor,
    Cursors,
    Drop,
    EndOfStream,
    ErrorReply,
    Head,
    Msg,
    OkReply,
    Ping,
    PongReply,
    Read,
    ReadRows,
    Record,
    Refuse,
    Reply,
    Shutdown,
    Stats,
    StatsReply,
)
from ..url import split_url

log = structlog.get_logger("logd.client")

DEFAULT_URL: str = f"logd://{defaults.HOST}:{DEFAULT_PORT}"
RECV_BYTES = 1 << 20
# The server closes the connection after these replies.
CLOSING_CODES = frozenset({"BUSY", "TIMEOUT", "DIVERGED"})

T = TypeVar("T")
Body = bytes | str


def parse_url(url: str) -> tuple[str, int]:
    """``logd://host:port`` (or ``logds://``, or ``host:port``; port defaults to 1774) -> (host, port)."""
    host, port, _tls, _token = split_url(url)
    return host, port


@dataclass(frozen=True)
class Retry:
    """How failed calls and lost connections are retried: a policy as data.

    ``attempts`` counts tries, the first included (1: never retry; None: no
    limit but the call's deadline). After the n-th failed try the wait is
    uniform in ``[0, min(maximum, initial * 2**(n-1))]`` seconds ("full
    jitter"), so clients that lost the same server do not all come back at
    the same instant.
    """

    attempts: int | None = 6
    initial: float = 0.05
    maximum: float = 2.0

    def policy(self, retriable: Callable[[BaseException], bool], limit: float | None) -> dict[str, Any]:
        """Keyword arguments for `tenacity.Retrying` / `AsyncRetrying`."""
        stop: Any = (
            tenacity.stop_never if self.attempts is None else tenacity.stop_after_attempt(self.attempts)
        )
        if limit is not None:
            stop = stop | tenacity.stop_before_delay(limit)
        return {
            "stop": stop,
            "wait": tenacity.wait_random_exponential(multiplier=self.initial, max=self.maximum),
            "retry": tenacity.retry_if_exception(retriable),
            "reraise": True,
        }


NO_RETRY = Retry(attempts=1)


def retriable(exc: BaseException, resend_ok: bool) -> bool:
    """Whether a failed call may be tried again (``resend_ok``: sending it twice is harmless)."""
    if isinstance(exc, errors.BusyError | errors.IdleTimeoutError):
        return True  # the server closed the connection without acting on anything
    return resend_ok and isinstance(exc, errors.ConnectionError)


# --- commands, each written once ----------------------------------------------


@dataclass(frozen=True)
class Call(Generic[T]):
    """One command: what to send, whether it can be resent, how its replies become a value."""

    command: Command
    result: Callable[[list[Reply]], T]
    idempotent: bool = True
    stream: bool = False  # answered by OK, records, +EOF


def checked(reply: Reply) -> Reply:
    """The reply, or the exception an ``ERR`` reply stands for."""
    if isinstance(reply, ErrorReply):
        raise errors.error_from_reply(reply.code, reply.message)
    return reply


def id_of(replies: list[Reply]) -> int:
    """The id of an ``OK <id>`` reply: ASCII digits only (``int`` would take any Unicode digit)."""
    reply = checked(replies[0])
    value = reply.value if isinstance(reply, OkReply) else None
    if value is not None and value.isascii() and value.isdigit() and len(value) <= 19:
        return int(value)
    raise errors.ProtocolError(f"expected OK <id>, got {reply!r}")


def last_id_of(replies: list[Reply], count: int) -> int:
    """The last id of a MSG of ``count`` messages: its ``OK <id>`` must leave room for all of them."""
    last = id_of(replies)
    if last < count:
        raise errors.ProtocolError(f"OK {last} cannot be the last id of {count} messages (ids start at 1)")
    return last


def ok_of(replies: list[Reply]) -> None:
    if not isinstance(checked(replies[0]), OkReply):
        raise errors.ProtocolError(f"expected OK, got {replies[0]!r}")


def pong_of(replies: list[Reply]) -> bool:
    if not isinstance(checked(replies[0]), PongReply):
        raise errors.ProtocolError(f"expected PONG, got {replies[0]!r}")
    return True


def stats_of(replies: list[Reply]) -> dict[str, str]:
    reply = checked(replies[0])
    if not isinstance(reply, StatsReply):
        raise errors.ProtocolError(f"expected STATS lines, got {reply!r}")
    return reply.values


def records_of(replies: list[Reply]) -> list[Record]:
    checked(replies[0])
    checked(replies[-1])  # an error can end a READ early (retention, storage)
    # collect() hands over OK, the records, then +EOF: everything between is a record.
    return replies[1:-1]  # type: ignore[return-value]


def read_call(start: int, limit: int, rows: bool = False) -> Call[list[Record]]:
    """READ start limit: exactly ``limit`` records (the server ends with ``+EOF`` after them).

    With ``rows`` the records are `RecordRow` tuples (`ReadRows`).
    """

    def records(replies: list[Reply]) -> list[Record]:
        out = records_of(replies)
        if len(out) != limit:
            raise errors.ProtocolError(f"READ {start} {limit} got {len(out)} records")
        return out

    return Call(ReadRows(start, limit) if rows else Read(start, limit), records, stream=True)


def corrupt_id_in(exc: errors.CorruptRecordError, start: int, end: int) -> int:
    """The id of the corrupt record, which must be in ``[start, end)`` to be skipped; else re-raise."""
    if not start <= exc.id < end:
        raise exc
    log.warning("corrupt_record_skipped", id=exc.id, error=str(exc))
    return exc.id


def as_bytes(body: Body) -> bytes:
    return body.encode() if isinstance(body, str) else body


def msg_call(bodies: Sequence[Body]) -> Call[list[int]]:
    if not bodies:
        raise ValueError("append needs at least one message")
    n = len(bodies)

    def ids(replies: list[Reply]) -> list[int]:
        last = last_id_of(replies, n)
        return list(range(last - n + 1, last + 1))

    return Call(Msg([as_bytes(b) for b in bodies]), ids, idempotent=False)


def cursors_of(replies: list[Reply]) -> dict[str, int]:
    values = stats_of(replies)
    # ASCII digits, at most 19 (as id_of): int() would take "²" or raise a ValueError on 5,000 digits.
    if not all(v.isascii() and v.isdigit() and len(v) <= 19 for v in values.values()):
        raise errors.ProtocolError(f"expected <name> <id> lines, got {str(values)[:200]}")
    return {name: int(v) for name, v in values.items()}


def commit_call(name: str, id: int) -> Call[None]:
    # Safe to resend: a cursor only moves forward, and committing its id again is OK.
    return Call(Commit(name, id), ok_of)


def cursor_call(name: str) -> Call[int]:
    return Call(Cursor(name), id_of)


def drop_call(name: str) -> Call[None]:
    # Not resent: after a lost OK the resend is NOT_FOUND, or drops a cursor made meanwhile.
    return Call(Drop(name), ok_of, idempotent=False)


CURSORS = Call(Cursors(), cursors_of)


def cursors_page_call(after: str | None) -> Call[dict[str, int]]:
    """``CURSORS <CURSORS_MAX> [<after>]``: the next page of cursors, for a server with more than a bare
    CURSORS lists (it answers that one TOO_LARGE)."""
    return Call(Cursors(CURSORS_MAX, after), cursors_of)


def next_page(after: str | None, page: dict[str, int]) -> str | None:
    """Where the page after ``page`` starts (its last name), or None when it was the last one."""
    if len(page) > CURSORS_MAX or (after is not None and any(name <= after for name in page)):
        raise errors.ProtocolError(f"CURSORS page after {after!r} is not a page: {len(page)} names")
    return max(page) if len(page) == CURSORS_MAX else None


def auth_call(token: str) -> Call[None]:
    return Call(Auth(token.encode()), ok_of)
HEAD = Call(Head(), id_of)
PING = Call(Ping(), pong_of)
STATS = Call(Stats(), stats_of)


def first_of(replies: list[Reply]) -> int:
    """The oldest id still retained, from STATS ``first``: 1 for an empty log or a server that does not say."""
    return max(1, int(stats_of(replies).get("first", "1")))


FIRST = Call(Stats(), first_of)
SHUTDOWN = Call(Shutdown(), ok_of, idempotent=False)
REFUSE = Call(Refuse(), ok_of)  # sending it twice is harmless
ACCEPT = Call(Accept(), ok_of)


def accept_call(next_id: int | None, min_replicas: int | None = None) -> Call[None]:
    return ACCEPT if next_id is None and min_replicas is None else Call(Accept(next_id, min_replicas), ok_of)


def clamp(start: int, limit: int, head: int) -> int:
    """How many records a non-waiting read of ``limit`` from ``start`` asks for."""
    if start < 1 or limit < 1:
        raise ValueError("read needs start >= 1 and limit >= 1")
    return max(0, min(limit, head - start + 1))


def deadline_after(limit: float | None) -> float | None:
    return None if limit is None else time.monotonic() + limit


def remaining(deadline: float | None, cap: float | None = None) -> float | None:
    """Seconds left before ``deadline`` (at most ``cap``); TimeoutError when none are."""
    if deadline is None:
        return cap
    left = deadline - time.monotonic()
    if left <= 0:
        raise errors.TimeoutError("timed out")
    return left if cap is None else min(left, cap)


def where(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def why(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def readable_now(fd: int) -> bool:
    """Whether reading ``fd`` would not block (data or end of stream waiting)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def tune(sock: Any) -> None:
    for level, option in ((socket.IPPROTO_TCP, socket.TCP_NODELAY), (socket.SOL_SOCKET, socket.SO_KEEPALIVE)):
        try:
            sock.setsockopt(level, option, 1)
        except (OSError, AttributeError):
            pass


def stream_step(replies: list[Reply], out: deque[Any]) -> tuple[int, bool]:
    """Take a tail's replies: records go to ``out``.

    Returns (the id after the last record, or 0 if none; whether the stream
    ended, i.e. the server sent ``+EOF`` because it is stopping). An ``ERR``
    (retention deleted what comes next, storage failed) is raised.
    """
    nxt = 0
    for reply in replies:
        if isinstance(reply, Record):
            out.append(reply)
            nxt = reply.id + 1
        elif type(reply) is tuple:  # a RecordRow (ReadRows)
            out.append(reply)
            nxt = reply[0] + 1
        elif isinstance(reply, EndOfStream):
            return nxt, True
        else:
            checked(reply)
    return nxt, False


# --- the blocking transport -----------------------------------------------------


def with_retry(policy: dict[str, Any], fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, retried as ``policy`` (from `Retry.policy`) says."""
    for attempt in tenacity.Retrying(**policy):
        with attempt:
            return fn(*args)
    raise AssertionError("unreachable")  # pragma: no cover - tenacity returns or raises


async def with_retry_async(policy: dict[str, Any], fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """``await fn(*args)``, retried as ``policy`` (from `Retry.policy`) says."""
    async for attempt in tenacity.AsyncRetrying(**policy):
        with attempt:
            return await fn(*args)
    raise AssertionError("unreachable")  # pragma: no cover
