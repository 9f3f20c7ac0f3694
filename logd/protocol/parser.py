"""The server side: `CommandParser` turns received bytes into commands (protocol.md 3.1)."""

from __future__ import annotations

from logd import defaults
from logd.errors import (
    ProtocolError,
    TooLargeError,
    UnknownCommandError,
)
from logd.hot import ext
from logd.storage.cursors import valid_name

from .commands import (
    _NO_ARGS,
    CURSORS_MAX,
    MAX_ID,
    Accept,
    Ack,
    Auth,
    Command,
    Commit,
    Cursor,
    Cursors,
    Drop,
    Msg,
    Read,
    RefusedMsg,
    Replicate,
    _new,
    _set_msg_bodies,
    valid_address,
)

# The longest line a connection may send before it has authenticated (when authentication is
# on): PING, CLOSE and AUTH with a token of some 50 characters fit many times over, and a
# peer that holds no token cannot make the server hold --max-line-bytes for it (protocol.md 3.7).
SHORT_LINE_BYTES = 1024
REFUSED_MSG = RefusedMsg()
Parsed = Command | RefusedMsg | ProtocolError


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


def _cursor_name(token: bytes) -> str:
    """A cursor name (1 to 64 of A-Z a-z 0-9 . _ -), or ProtocolError."""
    name = token.decode("latin-1")
    if not valid_name(name):
        raise ProtocolError(f"bad cursor name {_show(token)}: 1 to 64 of A-Z a-z 0-9 . _ -")
    return name


def _address(token: bytes) -> str:
    """A replica's ``HOST:PORT`` (protocol.md 3.4), or ProtocolError."""
    text = token.decode("latin-1")
    if not valid_address(text):
        raise ProtocolError(f"REPLICATE address must be HOST:PORT (a name, an IPv4 address or [IPv6], "
                            f"port 1-65535), not {_show(token)}")
    return text


def _accept(args: list[bytes]) -> Accept:
    """``ACCEPT [<next_id>] [min_replicas=<n>]`` (without arguments it is one shared instance)."""
    usage = "ACCEPT takes [<next_id>] [min_replicas=<n>]"
    min_replicas = None
    if args[-1].startswith(b"min_replicas="):
        min_replicas = _number(args.pop()[len(b"min_replicas="):], "ACCEPT min_replicas")
    if len(args) > 1:
        raise ProtocolError(usage)
    next_id = None
    if args:
        if b"=" in args[0]:  # a setting ACCEPT does not take
            raise ProtocolError(usage)
        next_id = _number(args[0], "ACCEPT next id")
        if next_id < 1:
            raise ProtocolError("ACCEPT next id must be >= 1")
    return Accept(next_id, min_replicas)


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
            if len(args) not in (1, 2, 4, 5):
                raise ProtocolError("REPLICATE takes <start> [<prev_crc> [<epoch> <seen> [<address>]]]")
            start = _number(args[0], "REPLICATE start")
            if start < 1:
                raise ProtocolError("REPLICATE start must be >= 1")
            if len(args) == 1:
                return Replicate(start, None)
            crc = args[1]
            epochs: tuple[int | None, int | None] = (None, None)
            if len(args) >= 4:
                epochs = (_number(args[2], "REPLICATE epoch"), _number(args[3], "REPLICATE seen"))
            address = _address(args[4]) if len(args) == 5 else None
            if crc == b"0":
                return Replicate(start, 0, *epochs, address)
            # Exactly 8 hex digits; int(x, 16) alone would also take "0x", "+" or "_".
            if len(crc) != 8 or crc.strip(b"0123456789abcdefABCDEF"):
                raise ProtocolError(f"REPLICATE prev_crc must be 8 hex digits, not {_show(crc)}")
            return Replicate(start, int(crc, 16), *epochs, address)
        if name == b"ACCEPT" and args:
            return _accept(args)
        if name == b"AUTH":
            # The token is never echoed back: error messages here get logged and shown.
            if len(args) != 1 or not args[0]:
                raise ProtocolError("AUTH takes one <token>")
            return Auth(args[0])
        if name == b"ACK":
            if len(args) != 1:
                raise ProtocolError("ACK takes <id>")
            return Ack(_number(args[0], "ACK id"))
        if name == b"COMMIT":
            if len(args) != 2:
                raise ProtocolError("COMMIT takes <name> <id>")
            return Commit(_cursor_name(args[0]), _number(args[1], "COMMIT id"))
        if name == b"CURSOR":
            if len(args) != 1:
                raise ProtocolError("CURSOR takes <name>")
            return Cursor(_cursor_name(args[0]))
        if name == b"CURSORS" and args:
            if len(args) > 2:
                raise ProtocolError("CURSORS takes [<limit> [<after>]]")
            limit = _number(args[0], "CURSORS limit")
            if not 1 <= limit <= CURSORS_MAX:
                raise ProtocolError(f"CURSORS limit must be 1 to {CURSORS_MAX}")
            return Cursors(limit, _cursor_name(args[1]) if len(args) == 2 else None)
        if name == b"DROP":
            if len(args) != 1:
                raise ProtocolError("DROP takes <name>")
            return Drop(_cursor_name(args[0]))
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

    `restrict` narrows what a connection that may not send MSG (before AUTH)
    is parsed with: each MSG line yields `RefusedMsg` and its bodies are
    skipped as they pass, never held; lines may be short. Then parsing stops
    after each AUTH line, holding the rest unparsed, until `resume` is called
    once that AUTH has acted (and `restrict` was told its outcome): a MSG
    pipelined behind an AUTH is parsed as the AUTH's result allows.
    """

    __slots__ = (
        "_max_line",
        "_line_max",
        "_refuse_msgs",
        "_at_auth",
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
        max_line_bytes: int = defaults.MAX_LINE_BYTES,
        max_message_bytes: int = defaults.MAX_MESSAGE_BYTES,
        max_batch: int = defaults.MAX_BATCH,
        max_batch_bytes: int = defaults.MAX_BATCH_BYTES,
    ) -> None:
        self._max_line = max_line_bytes
        self._line_max = max_line_bytes  # the limit in force (`restrict`)
        self._refuse_msgs = False  # MSG lines are refused and their bodies skipped (`restrict`)
        self._at_auth = False  # stopped after an AUTH line: the rest waits for `resume`
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

    @property
    def declared(self) -> int:
        """Body bytes declared by the MSG in progress (0 when none): what it will hold once complete."""
        lens = self._lens
        return sum(lens) if lens is not None else 0

    @property
    def clean(self) -> bool:
        """Nothing held from before (no partial line, MSG or skipped body), and still parsing."""
        return not (self._buf or self._lens is not None or self._skip_lens is not None or self._dead
                    or self._at_auth)

    @property
    def at_auth(self) -> bool:
        """Stopped after an AUTH line (restricted): what follows waits for `resume`."""
        return self._at_auth

    def restrict(self, msgs: bool, short_lines: bool) -> None:
        """What this connection may send now: MSG (else each MSG line is refused and its bodies
        skipped, and parsing stops after every AUTH line), and lines up to --max-line-bytes
        (else up to `SHORT_LINE_BYTES`). Applies to what is parsed from now on."""
        self._refuse_msgs = not msgs
        self._line_max = self._max_line if not short_lines else min(self._max_line, SHORT_LINE_BYTES)

    def resume(self) -> list[Parsed]:
        """Parse what was held after an AUTH line, under the restrictions in force now."""
        if not self._at_auth:
            return []
        self._at_auth = False
        data = bytes(self._buf)
        self._buf = bytearray()
        return self.feed(data)

    def whole_msgs(self, data: bytes) -> list[list[bytes]] | None:
        """The bodies of each MSG, when ``data`` is nothing but complete MSG commands that `feed`
        would take and nothing is held from before; otherwise None, and nothing is taken.

        The fast lane of the server session (one MSG per packet from each of many
        clients): no `Msg` objects, no list of commands. It takes only what the C
        module's ``msg_commands`` takes (``whole_msgs_py`` is its twin).
        """
        if not self.clean:
            return None
        if ext is not None:
            return ext.whole_msgs(data, self._max_line, self._max_message, self._max_batch, self._max_batch_bytes)
        return whole_msgs_py(data, *self.limits)

    @property
    def limits(self) -> tuple[int, int, int, int]:
        """max_line, max_message, max_batch, max_batch_bytes: what `whole_msgs_py` takes (and the C lane)."""
        return self._max_line, self._max_message, self._max_batch, self._max_batch_bytes

    def feed(self, data: bytes) -> list[Parsed]:
        """Parse a chunk of received bytes; return every command it completes, in order."""
        out: list[Parsed] = []
        if self._dead or not data:
            return out
        if self._at_auth:
            self._buf += data  # unparsed until the AUTH has acted (`resume`)
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
                    if len(buf) >= self._line_max:
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
        max_line = self._line_max
        max_message = self._max_message
        append = out.append
        refuse_msgs = self._refuse_msgs
        run_of_msgs = ext.msg_commands if ext is not None and type(data) is bytes and not refuse_msgs else None
        nl = find(b"\n", scan)
        while nl >= 0:
            if run_of_msgs is not None and data.startswith(b"MSG ", p):
                # C takes a run of complete, well-formed MSGs; whatever it
                # leaves (another command, a partial MSG, an error) is ours.
                q, batches = run_of_msgs(data, p, max_line, max_message, self._max_batch, self._max_batch_bytes)
                if batches:
                    for bodies in batches:
                        msg = _new(Msg)
                        _set_msg_bodies(msg, bodies)
                        append(msg)
                    p = q
                    nl = find(b"\n", p)
                    continue
            if nl - p >= max_line:
                self._fail(out, self._line_too_long())
                return out
            line = data[p : nl - 1] if nl > p and data[nl - 1] == 13 else data[p:nl]
            p = nl + 1
            verb, sep, rest = line.partition(b" ")
            if refuse_msgs and verb.upper() == b"MSG":
                lens = self._lengths(rest)
                if isinstance(lens, ProtocolError):
                    append(lens)
                    if lens.fatal:
                        self._fail(out, None)
                        return out
                else:
                    p = self._reject(lens, data, p, out, REFUSED_MSG)
                    if p < 0:
                        return out
            elif verb == b"MSG" or verb == b"msg" or verb.upper() == b"MSG":
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
                    # C takes a well-formed line within the limits; anything
                    # else (an error to report, a MSG to reject) is Python's.
                    checked = None if ext is None else ext.msg_lengths(rest, max_message, self._max_batch,
                                                                        self._max_batch_bytes)
                    if checked is not None:
                        p = self._collect(data, p, checked, [], out)
                    elif isinstance(lens := self._lengths(rest), list):
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
                item = _parse_line(verb, sep, rest)
                append(item)
                if refuse_msgs and type(item) is Auth:
                    # What follows is parsed once this AUTH has acted (`resume`).
                    self._at_auth = True
                    if p < size:
                        buf += memoryview(data)[p:]
                    return out
            nl = find(b"\n", p)
        if p < size:
            if size - p >= max_line:
                self._fail(out, self._line_too_long())
                return out
            buf += memoryview(data)[p:]
        return out

    def _line_too_long(self) -> TooLargeError:
        if self._line_max < self._max_line:
            return TooLargeError(f"command line over {self._line_max} bytes before AUTH", fatal=True)
        return TooLargeError(f"command line over {self._max_line} bytes", fatal=True)

    def _fail(self, out: list[Parsed], exc: ProtocolError | None) -> None:
        """Record a fatal error (if not already in ``out``); the parser is dead from now on."""
        if exc is not None:
            out.append(exc)
        self._dead = True
        self._buf = bytearray()
        self._lens = self._skip_lens = None
        self._bodies = []
        self._held = 0
        self._at_auth = False

    @staticmethod
    def _lengths(rest: bytes) -> list[int] | ProtocolError:
        """The lengths of a MSG line, or why it is bad (the reference for ``_hot.msg_lengths``)."""
        if not rest:
            return ProtocolError("MSG needs at least one length")
        tokens = rest.split(b" ")
        # Digits only: int() alone would also take signs, "_" and whitespace.
        if b"" in tokens or not rest.translate(None, b" ").isdigit():
            return ProtocolError(f"bad MSG length in {_show(rest)}", fatal=True)
        if max(map(len, tokens)) > 18:
            # Not a length any server takes, nor a count of bytes one could
            # skip: the stream can no longer be framed, like a malformed
            # length (protocol.md 3.3). TOO_LARGE always leaves it usable.
            return ProtocolError("MSG length of 19 or more digits: the stream cannot be framed", fatal=True)
        return list(map(int, tokens))

    def _collect(
        self,
        data: bytes,
        p: int,
        lens: list[int],
        bodies: list[bytes],
        out: list[Parsed],
    ) -> int:
        """Take the bodies of a MSG from ``data[p:]``.

        Returns the position after the MSG, or -1 if the input ran out (the
        state is saved and the rest buffered) or the framing broke (fatal).
        """
        size = len(data)
        start = p
        if ext is not None and type(data) is bytes:
            # C takes the well-formed bodies; the loop below sees why it stopped.
            p = ext.take_bodies(data, p, lens, bodies)
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
        msg = _new(Msg)  # as in feed: the frozen dataclass __init__ is twice as slow
        _set_msg_bodies(msg, bodies)
        out.append(msg)
        return p

    def _reject(
        self, lens: list[int], data: bytes, p: int, out: list[Parsed], refused: RefusedMsg | None = None
    ) -> int:
        """Report a MSG over the limits (or ``refused``), then discard its bodies (see `_skip`)."""
        if refused is not None:
            out.append(refused)
        elif len(lens) > self._max_batch:
            out.append(TooLargeError(f"batch of {len(lens)} messages is over max_batch {self._max_batch}"))
        elif max(lens) <= self._max_message:
            out.append(TooLargeError(f"batch of {sum(lens)} bytes is over max_batch_bytes {self._max_batch_bytes}"))
        else:
            out.append(TooLargeError(f"message of {max(lens)} bytes is over max_message_bytes {self._max_message}"))
        self._skip_lens = lens
        self._skip_i = 0
        self._skip_left = lens[0]
        self._skip_state = 0
        return self._skip(data, p, out)

    def _skip(self, data: bytes, p: int, out: list[Parsed]) -> int:
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


def whole_msgs_py(
    data: bytes, max_line: int, max_message: int, max_batch: int, max_batch_bytes: int
) -> list[list[bytes]] | None:
    """The bodies of each MSG when ``data`` is nothing but complete MSGs `CommandParser.feed` would
    take from a clean start, else None: the pure-Python twin of ``_hot.whole_msgs``."""
    out = []
    p = 0
    size = len(data)
    while data.startswith(b"MSG ", p):
        nl = data.find(b"\n", p, p + max_line)  # the line, LF included, shorter than max_line
        if nl < 0:
            return None
        lens = _simple_lengths(data[p + 4 : nl - 1 if nl > p and data[nl - 1] == 13 else nl],
                               max_message, max_batch, max_batch_bytes)
        if lens is None:
            return None
        bodies = []
        q = nl + 1
        for n in lens:
            end = q + n
            if end + 1 < size and data[end] == 13 and data[end + 1] == 10:
                bodies.append(data[q:end])
                q = end + 2
            elif end < size and data[end] == 10:
                bodies.append(data[q:end])
                q = end + 1
            else:
                return None  # incomplete, or a body that does not end where declared
        out.append(bodies)
        p = q
    return out if p == size and out else None


def _simple_lengths(rest: bytes, max_message: int, max_batch: int, max_batch_bytes: int) -> list[int] | None:
    """The lengths of a MSG line the fast lane takes (as ``_hot.msg_lengths``), or None."""
    lens: list[int] = []
    total = 0
    for token in rest.split(b" "):
        if not token or len(token) > 18 or not token.isdigit():
            return None
        n = int(token)
        total += n
        if n > max_message or total > max_batch_bytes or len(lens) >= max_batch:
            return None
        lens.append(n)
    return lens
