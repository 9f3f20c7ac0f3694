"""The REPLICATE stream, sans-IO: the leader's markers and the follower's parser.

A REPLICATE stream is records (protocol.md section 1) with two kinds of
marker line between them (``+SEG``, ``+HEAD``; protocol.md 3.4). The
follower feeds received chunks to `ReplicaStreamParser`, which checks every
record (framing, next id, CRC) and hands back whole runs of records as one
slice with their offsets, so they can be appended byte for byte.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

from crc32c import crc32c

from logd.errors import CorruptRecordError, ProtocolError
from logd.hot import ext
from logd.protocol.commands import MAX_ID
from logd.storage.cursors import valid_name
from logd.storage.record import MAX_HEADER_BYTES

MAX_RECORD_BYTES = 1 << 30  # a header claiming more is taken as corrupt rather than waited for


def segment_marker(first_id: int) -> bytes:
    """``+SEG <id>``: the records that follow belong to the segment named ``id``."""
    return b"+SEG %d\r\n" % first_id


def cursor_marker(name: str, id: int) -> bytes:
    """``+CURSOR <name> <id>``: the leader committed cursor ``name`` at ``id``."""
    return b"+CURSOR %s %d\r\n" % (name.encode("ascii"), id)


def drop_marker(name: str) -> bytes:
    """``+DROP <name>``: the leader dropped cursor ``name``."""
    return b"+DROP %s\r\n" % name.encode("ascii")


def position_marker(head: int, visible: int) -> bytes:
    """``+HEAD <head> <hw>``: the leader's commit point and what its readers may see."""
    return b"+HEAD %d %d\r\n" % (head, visible)


def epoch_marker(epoch: int, first_id: int) -> bytes:
    """``+EPOCH <epoch> <first_id>``: the records from ``first_id`` on were written in ``epoch``."""
    return b"+EPOCH %d %d\r\n" % (epoch, first_id)


def handshake_reply(leader_epoch: int, epoch: int, end: int, min_replicas: int) -> bytes:
    """The leader's ``OK`` to a REPLICATE with epochs: its epoch, and where the replica's epoch ends here."""
    return b"OK %d %d %d %d\r\n" % (leader_epoch, epoch, end, min_replicas)


# --- the follower's stream parser (sans-IO) -------------------------------------------


@dataclass(slots=True)
class Chunk:
    """Consecutive verified records, as received: ``data`` holds ``count`` records from ``first_id``."""

    data: memoryview
    offsets: array
    first_id: int
    count: int


@dataclass(frozen=True, slots=True)
class SegmentStart:
    """``+SEG <id>``."""

    id: int


@dataclass(frozen=True, slots=True)
class LeaderPosition:
    """``+HEAD <head> <hw>``."""

    head: int
    visible: int


@dataclass(frozen=True, slots=True)
class CursorCommit:
    """``+CURSOR <name> <id>``."""

    name: str
    id: int


@dataclass(frozen=True, slots=True)
class CursorDrop:
    """``+DROP <name>``."""

    name: str


@dataclass(frozen=True, slots=True)
class StreamOk:
    """The leader's ``OK`` to a REPLICATE; with epochs, ``OK <leader_epoch> <epoch> <end> <min_replicas>``.

    ``epoch`` is the leader's largest epoch not above the replica's, ``end``
    the first id past it in the leader's history. -1 when the leader sent a
    bare ``OK`` (the older form).
    """

    leader_epoch: int = -1
    epoch: int = -1
    end: int = -1
    min_replicas: int = 0


@dataclass(frozen=True, slots=True)
class EpochStart:
    """``+EPOCH <epoch> <first_id>``."""

    epoch: int
    first_id: int


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """``+EOF``: the leader is stopping."""


@dataclass(frozen=True, slots=True)
class StreamError:
    """``ERR <code> <message>`` from the leader."""

    code: str
    message: str


Event = (
    Chunk | SegmentStart | EpochStart | LeaderPosition | CursorCommit | CursorDrop | StreamOk | StreamEnd
    | StreamError
)


class ReplicaStreamParser:
    """Turns the bytes of a REPLICATE reply into events; verifies every record.

    `feed` takes whatever was received and returns the complete events. All
    consecutive records of one feed come out as a single `Chunk` (a slice of
    the input, ready to append), so the per-record work is one header
    comparison and one CRC. Raises `CorruptRecordError` for a record that
    fails a check (bad framing, an id out of sequence, a CRC mismatch) and
    `ProtocolError` for anything else unexpected.
    """

    def __init__(self, next_id: int) -> None:
        self.next_id = next_id
        self._started = False
        self._rest = b""  # unparsed bytes from the previous feed
        self._parts: list[bytes] = []  # while a long record is arriving
        self._have = 0
        self._need = 0  # bytes of _rest + _parts needed before parsing is worth it

    def feed(self, data: bytes) -> list[Event]:
        if self._need:
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []
            data = b"".join(self._parts)
            self._parts, self._have, self._need = [], 0, 0
        elif self._rest:
            data = self._rest + data
        self._rest = b""
        out: list[Event] = []
        size = len(data)
        p = 0
        while p < size:
            if self._started and data[p] == 43 and p + 1 < size and 48 <= data[p + 1] <= 57:
                q, offsets = self._records(data, p)
                if q > p:
                    # A view, not a copy: it goes to the segment file as it is.
                    out.append(Chunk(memoryview(data)[p:q], offsets, self.next_id - len(offsets), len(offsets)))
                    p = q
                    continue
                break  # an incomplete record: wait for more
            nl = data.find(b"\n", p)
            if nl < 0:
                if size - p > 1024:
                    raise ProtocolError(f"line of over 1024 bytes in the replication stream at id {self.next_id}")
                break
            line = data[p : nl - 1] if nl > p and data[nl - 1] == 13 else data[p:nl]
            p = nl + 1
            event = self._line(line)
            out.append(event)
            if isinstance(event, StreamError | StreamEnd):
                return out  # nothing after these is meaningful
        if p < size:
            rest = data[p:]
            if self._need:
                self._parts, self._have = [rest], len(rest)
            else:
                self._rest = rest
        return out

    def _line(self, line: bytes) -> Event:
        if not self._started:
            if line == b"OK":
                self._started = True
                return StreamOk()
            if line[:3] == b"OK ":
                parts = line[3:].split(b" ")
                if len(parts) == 4:
                    self._started = True
                    return StreamOk(*(self._int(x, line) for x in parts))
        elif line[:5] == b"+SEG ":
            return SegmentStart(self._int(line[5:], line))
        elif line[:6] == b"+HEAD ":
            parts = line[6:].split(b" ")
            if len(parts) == 2:
                return LeaderPosition(self._int(parts[0], line), self._int(parts[1], line))
        elif line[:7] == b"+EPOCH ":
            parts = line[7:].split(b" ")
            if len(parts) == 2:
                return EpochStart(self._int(parts[0], line), self._int(parts[1], line))
        elif line[:8] == b"+CURSOR ":
            parts = line[8:].split(b" ")
            if len(parts) == 2 and valid_name(parts[0].decode("latin-1")):
                return CursorCommit(parts[0].decode("ascii"), self._int(parts[1], line))
        elif line[:6] == b"+DROP ":
            name = line[6:].decode("latin-1")
            if valid_name(name):
                return CursorDrop(name)
        elif line == b"+EOF":
            return StreamEnd()
        if line[:4] == b"ERR ":
            code, _, message = line[4:].partition(b" ")
            return StreamError(code.decode("ascii", "replace"), message.decode("utf-8", "replace"))
        raise ProtocolError(f"unexpected line in the replication stream: {line[:80]!r}")

    @staticmethod
    def _int(token: bytes, line: bytes) -> int:
        """A number from the leader: ids, epochs, counts are all 0 .. 2^63-1, as in commands
        (a longer one would be written to EPOCHS or CURSORS and refused when read back)."""
        if not token.isdigit() or len(token) > 19 or int(token) > MAX_ID:
            raise ProtocolError(f"bad number in {line[:80]!r}: decimal digits, at most {MAX_ID}")
        return int(token)

    def _records(self, data: bytes, p: int) -> tuple[int, array]:
        """Verify consecutive records from ``data[p]``; return where they end and their offsets.

        Stops at a line that is not a record or at an incomplete record (then
        ``_need`` says how many bytes from there it takes).
        """
        base = p
        offsets = array("Q")
        if ext is not None:
            # C passes the good records; the loop below then finds out why
            # it stopped (the end of the data, a marker, or an error to raise).
            p, count, found = ext.verify_records(data, p, self.next_id)
            offsets.frombytes(found)
            self.next_id += count
        return self._records_py(data, base, p, offsets)

    def _records_py(self, data: bytes, base: int, p: int, offsets: array) -> tuple[int, array]:
        """`_records` in pure Python, from ``p``, adding to ``offsets`` (counted from ``base``)."""
        find = data.find
        size = len(data)
        add = offsets.append
        nxt = self.next_id
        # The len field starts after "+", the id's digits and a space.
        k = len(b"%d" % nxt) + 2
        bump = 10 ** (k - 2)
        while p < size and data[p] == 43:
            nl = find(b"\n", p, p + MAX_HEADER_BYTES)
            if nl < 0:
                if size - p >= MAX_HEADER_BYTES and p + 1 < size and 48 <= data[p + 1] <= 57:
                    raise self._corrupt(nxt, "record header has no line end")
                break
            start = nl + 1
            try:
                # The len field ends 10 bytes before the LF (space, 8 hex digits, CR).
                n = int(data[p + k : nl - 10])
            except ValueError:
                n = -1
            end = start + n
            if n < 0 or end + 2 > size:
                if not 48 <= data[p + 1] <= 57:
                    break  # a marker line: the caller reads it
                if n < 0 or data[p : nl - 10] != b"+%d %d" % (nxt, n) or data[nl - 1] != 13:
                    raise self._corrupt(nxt, f"bad record header {data[p:start][:80]!r}")
                if n > MAX_RECORD_BYTES:
                    raise self._corrupt(nxt, f"length {n} is over {MAX_RECORD_BYTES}")
                self._need = end + 2 - p
                break
            # One comparison checks the header's syntax, id, length and CRC.
            expected = b"+%d %d %08x\r\n" % (nxt, n, crc32c(data[start:end]))
            if data[p:start] != expected or data[end : end + 2] != b"\r\n":
                if not 48 <= data[p + 1] <= 57:
                    break
                why = "CRC mismatch or bad header" if data[end : end + 2] == b"\r\n" else "no CRLF after body"
                raise self._corrupt(nxt, f"{why}: {data[p:start][:80]!r}")
            add(p - base)
            nxt += 1
            if nxt == bump:
                k += 1
                bump *= 10
            p = end + 2
        self.next_id = nxt
        return p, offsets

    @staticmethod
    def _corrupt(id: int, why: str) -> CorruptRecordError:
        return CorruptRecordError(f"record {id} from the leader: {why}", where="wire", id=id)
