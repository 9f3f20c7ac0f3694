"""The client side: `ClientProtocol` encodes commands and parses the replies they get."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from crc32c import crc32c

from logd import defaults, errors
from logd.errors import (
    CorruptRecordError,
    LogdError,
    ProtocolError,
)
from logd.hot import ext

from .commands import Ack, Command, Cursors, Ping, Read, Replicate, Stats, _new, encode_command
from .parser import _show
from .replies import (
    _EOF_REPLY,
    _OK_REPLY,
    _PONG_REPLY,
    ErrorReply,
    OkReply,
    Record,
    RecordRow,
    Reply,
    StatsReply,
    _set_record_body,
    _set_record_id,
)

_LINE = 0  # OK [value] or ERR
_PONG = 1  # PONG or ERR
_STATS = 2  # OK <n> + n lines, or ERR
_STREAM = 3  # OK + records until +EOF (or ERR)
_ROWS = 4  # the same, records handed over as RecordRow tuples (ReadRows)
_MAX_HEADER = 51  # "+", 19 + 19 digits, 2 spaces, 8 hex, CRLF: no header is longer (MAX_HEADER in _hot.c)


@dataclass(frozen=True, slots=True)
class ReadRows(Read):
    """``READ``, sent as `Read` is; its records come back as `RecordRow` tuples instead of `Record`s.

    For callers that hand records straight to a database driver (the sink):
    the rows are built in C (``_hot.record_rows``) with the same checks.
    """


def record_rows_py(data: bytes, pos: int, next_id: int, rows: list[RecordRow]) -> int:
    """Pure-Python twin of ``_hot.record_rows``: append the well-formed records from ``pos`` as rows.

    Stops (returning where) at the first record that is incomplete or fails a
    check (header, id, CRLF, CRC), or at anything that is not a record; the
    caller's slow path then says why, exactly as for `Record`s.
    """
    find = data.find
    size = len(data)
    add = rows.append
    while size - pos >= 2 and data[pos] == 43 and 48 <= data[pos + 1] <= 57:  # "+" and a digit
        nl = find(b"\n", pos, pos + _MAX_HEADER)
        if nl < 0:
            break
        start = nl + 1
        parts = data[pos + 1 : nl - 1].split(b" ")
        if len(parts) != 3 or not parts[1].isdigit() or len(parts[1]) > 19:
            break
        n = int(parts[1])
        end = start + n
        if end + 2 > size:
            break
        body = data[start:end]
        if data[pos:start] != b"+%d %d %08x\r\n" % (next_id, n, crc32c(body)) or data[end : end + 2] != b"\r\n":
            break
        add((next_id, body))
        next_id += 1
        pos = end + 2
    return pos


class ClientProtocol:
    """The client's half of a connection: encodes commands, parses replies.

    `send` returns the bytes to write and notes the reply shape the command
    will get; `receive_data` takes received bytes (``b""`` at end of stream)
    and returns the complete replies in order. READ and REPLICATE yield
    ``OkReply(None)``, then `Record` objects (`RecordRow` tuples for a
    `ReadRows`), then `EndOfStream` (or an `ErrorReply` in place of the
    OK). ACK gets no reply. An ``ERR`` arriving with nothing outstanding
    (BUSY on connect, TIMEOUT) is returned too.

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
        "_rows",
        "_next_id",
        "_stats",
        "_stats_left",
        "_error",
        "_closed",
    )

    def __init__(
        self,
        *,
        max_line_bytes: int = defaults.MAX_LINE_BYTES,
        max_record_bytes: int = defaults.MAX_RECORD_BYTES,
    ) -> None:
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
        self._rows = False  # the stream hands over RecordRow tuples (ReadRows)
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
        if isinstance(cmd, ReadRows):
            self._expect.append((_ROWS, cmd.start))
        elif isinstance(cmd, Read | Replicate):
            self._expect.append((_STREAM, cmd.start))
        elif isinstance(cmd, Ping):
            self._expect.append((_PONG, 0))
        elif isinstance(cmd, Stats | Cursors):
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
                        if self._streaming:
                            raise self._corrupt(f"no record header in {self._max_line} bytes")
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
                    if self._streaming:  # stored bytes that are not a record: a damaged segment
                        raise self._corrupt(f"not a record: {_show(data[p:nl])}")
                    raise ProtocolError(f"reply line not ended by CRLF: {_show(data[p:nl])}")
                self._line(data[p : nl - 1], out)
                p = nl + 1
            nl = find(b"\n", p)
        if p < size:
            if not self._need and size - p >= self._max_line:
                if self._streaming:
                    raise self._corrupt(f"no record header in {self._max_line} bytes")
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
        add = out.append
        rows = self._rows
        if rows:
            # The good records become rows in one call (C, or its twin); the
            # loop below then sees why it stopped, as for Records.
            before = len(out)
            if ext is not None:
                p = ext.record_rows(data, p, self._next_id, out)
            else:
                p = record_rows_py(data, p, self._next_id, out)  # type: ignore[arg-type]
            self._next_id += len(out) - before
        elif ext is not None:
            # C checks the good records and cuts their bodies out; the loop
            # below then sees why it stopped (+EOF, an error, more to come).
            bodies: list[bytes] = []
            p, count, _offsets = ext.verify_records(data, p, self._next_id, bodies)
            nxt = self._next_id
            for body in bodies:
                record = _new(Record)
                _set_record_id(record, nxt)
                _set_record_body(record, body)
                add(record)
                nxt += 1
            self._next_id = nxt
        find = data.find
        size = len(data)
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
            if rows:
                add((nxt, body))
            else:
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
        if kind == _STREAM or kind == _ROWS:
            if value is not None:
                raise ProtocolError(f"unexpected reply {_show(line)}")
            out.append(_OK_REPLY)
            self._streaming = True
            self._rows = kind == _ROWS
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
