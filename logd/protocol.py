"""The logd wire protocol, sans-IO (protocol.md, sections 1 and 3).

Nothing here touches a socket or an event loop. The server feeds received
bytes to a `CommandParser` and gets `Command` objects back, then encodes its
answers with `ok`, `error_reply`, `stats_reply`, `PONG` and `EOF`. The client
encodes commands through a `ClientProtocol`, which remembers what reply each
outstanding command will get, and feeds it the bytes it receives. Both parsers
accept any split of the stream into chunks and keep partial input between
calls, so the tests can cut a stream at every byte.

Cost model: per-command Python work is what counts (a pipelined client sends
hundreds of thousands of commands a second). Each parser handles one bytes
object per call, finds line ends with ``bytes.find`` from a moving position,
slices bodies straight out of it, and keeps only the unconsumed tail; while
waiting for a body it does no work at all until enough bytes have arrived.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from crc32c import crc32c

from logd import errors
from logd.errors import (
    CorruptRecordError,
    LogdError,
    ProtocolError,
    ServerError,
    TooLargeError,
    UnknownCommandError,
)

__all__ = [
    "EOF",
    "PONG",
    "Accept",
    "Ack",
    "ClientProtocol",
    "Close",
    "Command",
    "CommandParser",
    "EndOfStream",
    "ErrorReply",
    "Head",
    "Msg",
    "OkReply",
    "Ping",
    "PongReply",
    "Read",
    "Record",
    "Refuse",
    "Replicate",
    "Reply",
    "Shutdown",
    "Stats",
    "StatsReply",
    "encode_command",
    "encode_msg",
    "error_reply",
    "ok",
    "stats_reply",
]

# Ids are 1 <= id < 2^63 (protocol.md section 1); numbers in commands are
# bounded the same way so nothing downstream meets an unbounded int.
MAX_ID = (1 << 63) - 1


# --- commands (client -> server) ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Msg:
    """``MSG <len> ...`` with its bodies: append them, atomically, with consecutive ids.

    Not validated when built: the parser makes hundreds of thousands a second.
    """

    bodies: list[bytes]


@dataclass(frozen=True, slots=True)
class Read:
    """``READ <start> [<limit>]``: stream records from ``start``; ``limit`` 0 means tail."""

    start: int
    limit: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.start <= MAX_ID or not 0 <= self.limit <= MAX_ID:
            raise ValueError(f"bad READ {self.start} {self.limit}")


@dataclass(frozen=True, slots=True)
class Replicate:
    """``REPLICATE <start> [<prev_crc>]``: tail from ``start`` for a replica.

    ``prev_crc`` is the CRC the replica holds for id ``start - 1`` (None: not sent).
    """

    start: int
    prev_crc: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.start <= MAX_ID:
            raise ValueError(f"bad REPLICATE start {self.start}")
        if self.prev_crc is not None and not 0 <= self.prev_crc <= 0xFFFFFFFF:
            raise ValueError(f"bad REPLICATE prev_crc {self.prev_crc}")


@dataclass(frozen=True, slots=True)
class Head:
    """``HEAD``: ask for the commit point."""


@dataclass(frozen=True, slots=True)
class Ping:
    """``PING``: answered by ``PONG``."""


@dataclass(frozen=True, slots=True)
class Stats:
    """``STATS``: answered by ``OK <n>`` and n ``<name> <value>`` lines."""


@dataclass(frozen=True, slots=True)
class Close:
    """``CLOSE``: ``OK``, then the server closes the connection."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """``SHUTDOWN``: stop the server gracefully (if it allows it)."""


@dataclass(frozen=True, slots=True)
class Ack:
    """``ACK <id>``: a replica reports, on its REPLICATE connection, what it holds.

    The leader sends no reply to it.
    """

    id: int

    def __post_init__(self) -> None:
        if not 0 <= self.id <= MAX_ID:
            raise ValueError(f"bad ACK id {self.id}")


@dataclass(frozen=True, slots=True)
class Refuse:
    """``REFUSE``: make a leader read-only."""


@dataclass(frozen=True, slots=True)
class Accept:
    """``ACCEPT``: promote a follower to leader."""


Command = Msg | Read | Replicate | Head | Ping | Stats | Close | Shutdown | Ack | Refuse | Accept

# Building a Msg through its slot setter skips the frozen dataclass __init__
# (object.__setattr__ per field), which costs as much as parsing the command.
_new = object.__new__
_set_msg_bodies = Msg.__dict__["bodies"].__set__

# Commands without arguments carry no state, so one instance of each serves all.
_NO_ARGS: dict[bytes, Command] = {
    b"HEAD": Head(),
    b"PING": Ping(),
    b"STATS": Stats(),
    b"CLOSE": Close(),
    b"SHUTDOWN": Shutdown(),
    b"REFUSE": Refuse(),
    b"ACCEPT": Accept(),
}


def _show(token: bytes) -> str:
    """A peer-supplied token, quoted, cut short and printable, for an error message."""
    return ascii(token[:40].decode("latin-1"))


def _number(token: bytes, what: str) -> int:
    """A decimal argument (digits only, below 2^63), or ProtocolError."""
    if not token.isdigit():
        raise ProtocolError(f"{what} must be a decimal number, not {_show(token)}")
    # int() refuses strings over 4300 digits; anything over 19 is out of range anyway.
    if len(token) > 19 and len(token.lstrip(b"0")) > 19:
        raise ProtocolError(f"{what} is out of range")
    value = int(token)
    if value > MAX_ID:
        raise ProtocolError(f"{what} is out of range")
    return value


def _parse_line(verb: bytes, sep: bytes, rest: bytes) -> Command | ProtocolError:
    """Any command line but MSG (which the parser's loop handles itself)."""
    name = verb.upper()
    args = rest.split(b" ") if sep else []
    try:
        if name == b"READ":
            if not 1 <= len(args) <= 2:
                raise ProtocolError("READ takes <start> [<limit>]")
            start = _number(args[0], "READ start")
            if start < 1:
                raise ProtocolError("READ start must be >= 1")
            return Read(start, _number(args[1], "READ limit") if len(args) == 2 else 0)
        if name == b"REPLICATE":
            if not 1 <= len(args) <= 2:
                raise ProtocolError("REPLICATE takes <start> [<prev_crc>]")
            start = _number(args[0], "REPLICATE start")
            if start < 1:
                raise ProtocolError("REPLICATE start must be >= 1")
            if len(args) == 1:
                return Replicate(start, None)
            crc = args[1]
            if crc == b"0":
                return Replicate(start, 0)
            # Exactly 8 hex digits; int(x, 16) alone would also take "0x", "+" or "_".
            if len(crc) != 8 or crc.strip(b"0123456789abcdefABCDEF"):
                raise ProtocolError(f"REPLICATE prev_crc must be 8 hex digits, not {_show(crc)}")
            return Replicate(start, int(crc, 16))
        if name == b"ACK":
            if len(args) != 1:
                raise ProtocolError("ACK takes <id>")
            return Ack(_number(args[0], "ACK id"))
        command = _NO_ARGS.get(name)
        if command is None:
            return UnknownCommandError(f"unknown command {_show(verb)}")
        if args:
            raise ProtocolError(f"{name.decode()} takes no arguments")
        return command
    except ProtocolError as exc:
        return exc


class CommandParser:
    """Turns the bytes a client sends into commands (server side).

    Feed it every received chunk; it returns the complete commands in order,
    with a non-fatal `ProtocolError` in the place of each bad command. A fatal
    one (the stream can no longer be framed) comes last, and the parser is
    dead from then on: reply with it, then close the connection.
    """

    __slots__ = (
        "_max_line",
        "_max_message",
        "_max_batch",
        "_max_batch_bytes",
        "_buf",
        "_need",
        "_lens",
        "_bodies",
        "_held",
        "_skip_lens",
        "_skip_i",
        "_skip_left",
        "_skip_state",
        "_dead",
    )

    def __init__(
        self,
        *,
        max_line_bytes: int = 65536,
        max_message_bytes: int = 1 << 20,
        max_batch: int = 10000,
        max_batch_bytes: int = 64 << 20,
    ) -> None:
        self._max_line = max_line_bytes
        self._max_message = max_message_bytes
        self._max_batch = max_batch
        # A MSG is held whole until its last body arrives, so its total size
        # is capped too (max_batch * max_message_bytes would be 10 GB).
        self._max_batch_bytes = max_batch_bytes
        # Unconsumed input: a partial line, or the rest of a MSG in progress
        # starting at its next body.
        self._buf = bytearray()
        # While a MSG is in progress: len(_buf) needed before it can advance.
        self._need = 0
        # The MSG in progress (line parsed, bodies arriving): all its lengths,
        # the bodies complete so far and their size in bytes.
        self._lens: list[int] | None = None
        self._bodies: list[bytes] = []
        self._held = 0
        # A rejected (TOO_LARGE) MSG whose bodies are discarded as they pass:
        # its lengths, which body, bytes of it still to drop, and where we
        # are (0 in the body, 1 before its terminator, 2 after a CR).
        self._skip_lens: list[int] | None = None
        self._skip_i = 0
        self._skip_left = 0
        self._skip_state = 0
        self._dead = False

    @property
    def buffered(self) -> int:
        """Bytes of input held until more arrives (for backpressure)."""
        return len(self._buf) + self._held

    def feed(self, data: bytes) -> list[Command | ProtocolError]:
        """Parse a chunk of received bytes; return every command it completes, in order."""
        out: list[Command | ProtocolError] = []
        if self._dead or not data:
            return out
        if self._skip_lens is not None:
            # Bodies of a rejected MSG go straight from the input to nowhere:
            # never buffered, whatever size was declared.
            p = self._skip(data, 0, out)
            if p < 0:
                return out
            data = data[p:]
        buf = self._buf
        scan = 0  # data[:scan] is known to hold no LF
        if buf:
            if self._lens is None:
                # A partial line: look for its end in the new bytes only.
                if b"\n" not in data:
                    buf += data
                    if len(buf) >= self._max_line:
                        self._fail(out, self._line_too_long())
                    return out
                scan = len(buf)
                data = b"".join((buf, data))
            else:
                buf += data
                if len(buf) < self._need:
                    return out
                data = bytes(buf)
            buf.clear()
        p = 0
        if self._lens is not None:
            p = self._collect(data, 0, self._lens, self._bodies, out)
            if p < 0:
                return out
            scan = p

        find = data.find
        size = len(data)
        max_line = self._max_line
        max_message = self._max_message
        append = out.append
        nl = find(b"\n", scan)
        while nl >= 0:
            if nl - p >= max_line:
                self._fail(out, self._line_too_long())
                return out
            line = data[p : nl - 1] if nl > p and data[nl - 1] == 13 else data[p:nl]
            p = nl + 1
            verb, sep, rest = line.partition(b" ")
            if verb == b"MSG" or verb == b"msg" or verb.upper() == b"MSG":
                if len(rest) < 19 and rest.isdigit():
                    # The common case, inline: one message, body and CRLF all here.
                    n = int(rest)
                    end = p + n
                    if n > max_message:
                        p = self._reject([n], data, p, out)
                    elif end + 1 < size and data[end] == 13 and data[end + 1] == 10:
                        # Bypass the frozen dataclass __init__ (about twice as slow).
                        msg = _new(Msg)
                        _set_msg_bodies(msg, [data[p:end]])
                        append(msg)
                        p = end + 2
                    else:
                        p = self._collect(data, p, [n], [], out)
                else:
                    lens = self._lengths(rest)
                    if isinstance(lens, list):
                        if (
                            len(lens) > self._max_batch
                            or max(lens) > max_message
                            or sum(lens) > self._max_batch_bytes
                        ):
                            p = self._reject(lens, data, p, out)
                        else:
                            p = self._collect(data, p, lens, [], out)
                    else:
                        append(lens)
                        if lens.fatal:
                            self._fail(out, None)
                            return out
                if p < 0:
                    return out
            elif line:
                append(_parse_line(verb, sep, rest))
            nl = find(b"\n", p)
        if p < size:
            if size - p >= max_line:
                self._fail(out, self._line_too_long())
                return out
            buf += memoryview(data)[p:]
        return out

    def _line_too_long(self) -> TooLargeError:
        return TooLargeError(f"command line over {self._max_line} bytes", fatal=True)

    def _fail(self, out: list[Command | ProtocolError], exc: ProtocolError | None) -> None:
        """Record a fatal error (if not already in ``out``); the parser is dead from now on."""
        if exc is not None:
            out.append(exc)
        self._dead = True
        self._buf = bytearray()
        self._lens = self._skip_lens = None
        self._bodies = []
        self._held = 0

    def _lengths(self, rest: bytes) -> list[int] | ProtocolError:
        """The lengths of a MSG line (all but the single short one handled inline)."""
        if not rest:
            return ProtocolError("MSG needs at least one length")
        tokens = rest.split(b" ")
        # Digits only: int() alone would also take signs, "_" and whitespace.
        if b"" in tokens or not rest.translate(None, b" ").isdigit():
            return ProtocolError(f"bad MSG length in {_show(rest)}", fatal=True)
        if max(map(len, tokens)) > 18:
            # Not a length any server takes, nor a count of bytes one could skip.
            return TooLargeError("MSG length out of range", fatal=True)
        return list(map(int, tokens))

    def _collect(
        self,
        data: bytes,
        p: int,
        lens: list[int],
        bodies: list[bytes],
        out: list[Command | ProtocolError],
    ) -> int:
        """Take the bodies of a MSG from ``data[p:]``.

        Returns the position after the MSG, or -1 if the input ran out (the
        state is saved and the rest buffered) or the framing broke (fatal).
        """
        size = len(data)
        start = p
        add = bodies.append
        # len(bodies) says which body is next, so a resumed MSG picks up there.
        for n in lens[len(bodies) :] if bodies else lens:
            end = p + n
            if end + 1 < size:
                c = data[end]
                if c == 13 and data[end + 1] == 10:
                    add(data[p:end])
                    p = end + 2
                    continue
                if c == 10:
                    add(data[p:end])
                    p = end + 1
                    continue
            elif end < size and data[end] == 10:
                # A bare LF ending the chunk: an nc user waiting for the reply.
                add(data[p:end])
                p = end + 1
                continue
            elif end >= size or data[end] == 13:
                # Body or terminator incomplete: wait, doing nothing, until
                # they can be (the CR case needs one byte more).
                self._lens = lens
                self._bodies = bodies
                self._held += p - start
                self._need = end + 1 - p if end >= size else end + 2 - p
                self._buf += memoryview(data)[p:]
                return -1
            self._fail(
                out, ProtocolError(f"MSG body {len(bodies) + 1} not followed by CRLF", fatal=True)
            )
            return -1
        self._lens = None
        self._held = 0
        out.append(Msg(bodies))
        return p

    def _reject(
        self, lens: list[int], data: bytes, p: int, out: list[Command | ProtocolError]
    ) -> int:
        """Report a MSG over the limits, then discard its bodies (see `_skip`)."""
        if len(lens) > self._max_batch:
            what = f"batch of {len(lens)} messages is over max_batch {self._max_batch}"
        elif max(lens) <= self._max_message:
            what = f"batch of {sum(lens)} bytes is over max_batch_bytes {self._max_batch_bytes}"
        else:
            what = f"message of {max(lens)} bytes is over max_message_bytes {self._max_message}"
        out.append(TooLargeError(what))
        self._skip_lens = lens
        self._skip_i = 0
        self._skip_left = lens[0]
        self._skip_state = 0
        return self._skip(data, p, out)

    def _skip(self, data: bytes, p: int, out: list[Command | ProtocolError]) -> int:
        """Drop bodies of a rejected MSG from ``data[p:]``.

        Returns the position after the last body, or -1 if the input ran out
        (the state is saved) or a terminator was wrong (fatal).
        """
        lens = self._skip_lens
        assert lens is not None
        size = len(data)
        i = self._skip_i
        left = self._skip_left
        state = self._skip_state
        while True:
            if state == 0:
                if size - p < left:
                    self._skip_left = left - (size - p)
                    self._skip_i = i
                    self._skip_state = 0
                    return -1
                p += left
                state = 1
            if p >= size:
                self._skip_i = i
                self._skip_state = state
                return -1
            c = data[p]
            if state == 1 and c == 13:
                p += 1
                state = 2
                continue
            if c != 10:
                self._fail(out, ProtocolError(f"MSG body {i + 1} not followed by CRLF", fatal=True))
                return -1
            p += 1
            i += 1
            if i == len(lens):
                self._skip_lens = None
                return p
            left = lens[i]
            state = 0


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


def error_reply(exc: ServerError) -> bytes:
    """``ERR <CODE> <message>`` for any server-side error."""
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


# --- client side ---------------------------------------------------------------


def encode_msg(bodies: Sequence[bytes]) -> bytes:
    """``MSG <len> ...`` followed by each body and CRLF: one bytes object to write."""
    if not bodies:
        raise ValueError("MSG needs at least one body")
    parts = [b"MSG %s\r\n" % b" ".join([b"%d" % len(body) for body in bodies])]
    for body in bodies:
        parts.append(body)
        parts.append(b"\r\n")
    return b"".join(parts)


def encode_command(cmd: Command) -> bytes:
    """The bytes of any command."""
    if isinstance(cmd, Msg):
        return encode_msg(cmd.bodies)
    if isinstance(cmd, Read):
        if cmd.limit:
            return b"READ %d %d\r\n" % (cmd.start, cmd.limit)
        return b"READ %d\r\n" % cmd.start
    if isinstance(cmd, Replicate):
        if cmd.prev_crc is None:
            return b"REPLICATE %d\r\n" % cmd.start
        return b"REPLICATE %d %08x\r\n" % (cmd.start, cmd.prev_crc)
    if isinstance(cmd, Ack):
        return b"ACK %d\r\n" % cmd.id
    return _NO_ARGS_BYTES[type(cmd)]


_NO_ARGS_BYTES: dict[type, bytes] = {type(cmd): name + b"\r\n" for name, cmd in _NO_ARGS.items()}


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


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """``+EOF``: the READ is over."""


Reply = OkReply | PongReply | ErrorReply | StatsReply | Record | EndOfStream

_PONG_REPLY = PongReply()
_EOF_REPLY = EndOfStream()
_OK_REPLY = OkReply(None)
# Slot setters, to build records without the frozen dataclass __init__.
_set_record_id = Record.__dict__["id"].__set__
_set_record_body = Record.__dict__["body"].__set__

# What each outstanding command will be answered with.
_LINE = 0  # OK [value] or ERR
_PONG = 1  # PONG or ERR
_STATS = 2  # OK <n> + n lines, or ERR
_STREAM = 3  # OK + records until +EOF (or ERR)


class ClientProtocol:
    """The client's half of a connection: encodes commands, parses replies.

    `send` returns the bytes to write and notes the reply shape the command
    will get; `receive_data` takes received bytes (``b""`` at end of stream)
    and returns the complete replies in order. READ and REPLICATE yield
    ``OkReply(None)``, then `Record` objects, then `EndOfStream` (or an
    `ErrorReply` in place of the OK). ACK gets no reply. An ``ERR`` arriving
    with nothing outstanding (BUSY on connect, TIMEOUT) is returned too.

    Raises `errors.ProtocolError` for replies that cannot be parsed,
    `errors.CorruptRecordError` for a record failing its checks, and
    `errors.ConnectionError` for an end of stream with replies outstanding.
    After any of these the object keeps raising it: drop the connection.
    """

    __slots__ = (
        "_max_line",
        "_max_record",
        "_expect",
        "_buf",
        "_need",
        "_streaming",
        "_next_id",
        "_stats",
        "_stats_left",
        "_error",
        "_closed",
    )

    def __init__(self, *, max_line_bytes: int = 65536, max_record_bytes: int = 1 << 30) -> None:
        self._max_line = max_line_bytes
        # A header claiming more than this is taken as corrupt rather than waited for.
        self._max_record = max_record_bytes
        # (reply shape, READ/REPLICATE start) per outstanding command, oldest first.
        self._expect: deque[tuple[int, int]] = deque()
        self._buf = bytearray()
        # While a record body is incomplete: len(_buf) needed to finish it.
        self._need = 0
        # The READ/REPLICATE at the head of _expect got its OK; records follow.
        self._streaming = False
        self._next_id = 0
        self._stats: dict[str, str] | None = None
        self._stats_left = 0
        self._error: LogdError | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """Commands sent whose replies are not complete yet."""
        return len(self._expect)

    def send(self, cmd: Command) -> bytes:
        """Encode ``cmd`` and expect its reply."""
        if self._error is not None:
            raise self._error
        if self._closed:
            raise errors.ConnectionError("connection closed by the server")
        data = encode_command(cmd)
        if isinstance(cmd, Read | Replicate):
            self._expect.append((_STREAM, cmd.start))
        elif isinstance(cmd, Ping):
            self._expect.append((_PONG, 0))
        elif isinstance(cmd, Stats):
            self._expect.append((_STATS, 0))
        elif not isinstance(cmd, Ack):
            self._expect.append((_LINE, 0))
        return data

    def receive_data(self, data: bytes) -> list[Reply]:
        """Parse received bytes (``b""``: the server closed); return the complete replies."""
        if self._error is not None:
            raise self._error
        if not data:
            self._closed = True
            if self._expect or self._buf:
                self._error = errors.ConnectionError(
                    f"connection closed by the server with {len(self._expect)} replies outstanding"
                )
                raise self._error
            return []
        try:
            return self._receive(data)
        except (ProtocolError, CorruptRecordError) as exc:
            self._error = exc
            self._buf = bytearray()
            raise

    def _receive(self, data: bytes) -> list[Reply]:
        out: list[Reply] = []
        buf = self._buf
        scan = 0  # data[:scan] is known to hold no LF
        if buf:
            if self._need:
                buf += data
                if len(buf) < self._need:
                    return out
                data = bytes(buf)
                self._need = 0
            else:
                if b"\n" not in data:
                    buf += data
                    if len(buf) >= self._max_line:
                        raise ProtocolError(f"reply line over {self._max_line} bytes")
                    return out
                scan = len(buf)
                data = b"".join((buf, data))
            buf.clear()
        find = data.find
        size = len(data)
        p = 0
        nl = find(b"\n", scan)
        while nl >= 0:
            if self._streaming and data[p] == 43:  # "+": the bulk of a stream
                p = self._records(data, p, out)
                if self._need:
                    break
            else:
                if nl == p or data[nl - 1] != 13:
                    raise ProtocolError(f"reply line not ended by CRLF: {_show(data[p:nl])}")
                self._line(data[p : nl - 1], out)
                p = nl + 1
            nl = find(b"\n", p)
        if p < size:
            if not self._need and size - p >= self._max_line:
                raise ProtocolError(f"reply line over {self._max_line} bytes")
            buf += memoryview(data)[p:]
        return out

    def _corrupt(self, why: str) -> CorruptRecordError:
        return CorruptRecordError(f"record {self._next_id}: {why}", where="wire", id=self._next_id)

    def _records(self, data: bytes, p: int, out: list[Reply]) -> int:
        """Parse consecutive records (and a final ``+EOF``) from ``data[p]``; return the end.

        Stops at a line that is not a record, at a partial header, or at an
        incomplete body (then ``_need`` says how many bytes it takes).
        """
        find = data.find
        size = len(data)
        add = out.append
        nxt = self._next_id
        # The len field starts after "+", the id's digits and a space; k
        # follows the id's digit count, which grows by one at each power of 10.
        k = len(b"%d" % nxt) + 2
        bump = 10 ** (k - 2)
        while p < size and data[p] == 43:
            nl = find(b"\n", p)
            if nl < 0:
                break
            start = nl + 1
            try:
                # The len field ends 10 bytes before the LF (space, 8 hex
                # digits, CR). A wrong guess from a bad header is caught by the
                # comparison with the whole expected header below.
                n = int(data[p + k : nl - 10])
            except ValueError:
                n = -1
            end = start + n
            if n < 0 or end + 2 > size:
                # Rare: +EOF, a bad header, or a body still arriving.
                self._next_id = nxt
                if data[p:start] == b"+EOF\r\n":
                    out.append(_EOF_REPLY)
                    self._expect.popleft()
                    self._streaming = False
                    return start
                why = self._header_error(data[p:start])
                if why is not None:
                    raise self._corrupt(why)
                n = int(data[p:start].split(b" ")[1])
                end = start + n
                if n > self._max_record:
                    raise self._corrupt(f"length {n} is over max_record_bytes")
                if end + 2 > size:
                    self._need = end + 2 - p
                    return p
            body = data[start:end]
            # One comparison checks the header's syntax, id, length and CRC.
            if (
                data[p:start] != b"+%d %d %08x\r\n" % (nxt, n, crc32c(body))
                or data[end] != 13
                or data[end + 1] != 10
            ):
                self._next_id = nxt
                why = self._header_error(data[p:start])
                if why is None:
                    why = "CRC mismatch" if data[end : end + 2] == b"\r\n" else "no CRLF after body"
                raise self._corrupt(why)
            # Bypass the frozen dataclass __init__ (about twice as slow):
            # records are the bulk of what a client parses.
            record = _new(Record)
            _set_record_id(record, nxt)
            _set_record_body(record, body)
            add(record)
            nxt += 1
            if nxt == bump:
                k += 1
                bump *= 10
            p = end + 2
        self._next_id = nxt
        return p

    def _header_error(self, header: bytes) -> str | None:
        """Why a record header (with its CRLF) is not the next one expected, or None."""
        if header[-2:] != b"\r\n":
            return "header not ended by CRLF"
        parts = header[1:-2].split(b" ")
        if len(parts) != 3:
            return f"bad header {_show(header)}"
        id_b, len_b, crc_b = parts
        if id_b != b"%d" % self._next_id:
            return f"unexpected id {_show(id_b)}"
        if not len_b.isdigit() or len(len_b) > 19 or b"%d" % int(len_b) != len_b:
            return f"bad length {_show(len_b)}"
        if len(crc_b) != 8 or crc_b.strip(b"0123456789abcdef"):
            return f"bad CRC field {_show(crc_b)}"
        return None

    def _line(self, line: bytes, out: list[Reply]) -> None:
        """One reply line that is not a record."""
        expect = self._expect
        if self._stats is not None:
            name, sep, word = line.partition(b" ")
            if not sep or not name:
                raise ProtocolError(f"bad STATS line {_show(line)}")
            self._stats[name.decode("utf-8", "replace")] = word.decode("utf-8", "replace")
            self._stats_left -= 1
            if not self._stats_left:
                out.append(StatsReply(self._stats))
                self._stats = None
                expect.popleft()
            return
        if line[:4] == b"ERR " or line == b"ERR":
            _, _, rest = line.partition(b" ")
            code, _, message = rest.partition(b" ")
            out.append(
                ErrorReply(code.decode("ascii", "replace"), message.decode("utf-8", "replace"))
            )
            # With nothing outstanding it is unsolicited (BUSY, TIMEOUT): answers nothing.
            if expect:
                expect.popleft()
                self._streaming = False
            return
        if not expect:
            raise ProtocolError(f"unexpected reply {_show(line)}")
        kind, start = expect[0]
        if self._streaming:
            raise self._corrupt(f"not a record: {_show(line)}")
        if kind == _PONG:
            if line != b"PONG":
                raise ProtocolError(f"expected PONG, got {_show(line)}")
            out.append(_PONG_REPLY)
            expect.popleft()
            return
        if line == b"OK":
            value = None
        elif line[:3] == b"OK ":
            value = line[3:].decode("utf-8", "replace")
        else:
            raise ProtocolError(f"unexpected reply {_show(line)}")
        if kind == _STREAM:
            if value is not None:
                raise ProtocolError(f"unexpected reply {_show(line)}")
            out.append(_OK_REPLY)
            self._streaming = True
            self._next_id = start
        elif kind == _STATS:
            if value is None or not line[3:].isdigit() or len(line) > 12:
                raise ProtocolError(f"bad STATS count in {_show(line)}")
            self._stats_left = int(line[3:])
            self._stats = {}
            if not self._stats_left:
                out.append(StatsReply(self._stats))
                self._stats = None
                expect.popleft()
        else:
            out.append(OkReply(value))
            expect.popleft()
