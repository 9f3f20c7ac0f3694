"""READ and REPLICATE streams: segment byte ranges sent as they are stored, and where idle ones wait.

A `Stream` sends committed records with ``os.pread`` of whole segment byte
ranges (no per-record Python work), paced by its connection's write buffer.
When it reaches what its reader may see, it parks in `ParkedStreams`, indexed
by the id it waits for, so a commit wakes only the streams it lets advance:
thousands of tails parked on far-future ids cost a commit nothing.
"""

from __future__ import annotations

import heapq
import os
from typing import TYPE_CHECKING, Protocol

import structlog

from . import protocol
from .errors import CorruptRecordError, NotFoundError, ProtocolError, ServerError, UnavailableError
from .protocol.replica import epoch_marker, position_marker, segment_marker
from .storage.reads import Span

if TYPE_CHECKING:
    from .server import LogServer

log = structlog.get_logger("logd.streams")

STREAM_CHUNK = 1 << 20  # most bytes per pread + write (at most half the connection's output budget)
EMPTY_LINE = b"\r\n"  # between records of a READ stream: readers skip it (`Stream.probe`)


class Sink(Protocol):
    """Where a stream's bytes go: its connection."""

    write_paused: bool
    peer: str

    def write(self, data: bytes) -> None: ...

    def closing(self) -> bool: ...

    def stream_ended(self) -> None: ...

    def abandon(self) -> None: ...


class Stream:
    """One READ (``limit`` records, 0 = forever) or REPLICATE stream."""

    __slots__ = (
        "server", "sink", "replica", "next", "left", "segment", "position", "sent", "acked", "parked", "epoch",
        "cursors", "piece", "piece_at", "name",
    )

    def __init__(self, server: LogServer, sink: Sink, cmd: protocol.Read | protocol.Replicate) -> None:
        self.server = server
        self.sink = sink
        self.replica = type(cmd) is protocol.Replicate
        self.next = cmd.start  # the next id to send
        self.left = cmd.limit if type(cmd) is protocol.Read else 0
        self.segment = 0  # REPLICATE: the segment last announced with +SEG
        self.position = (-1, -1)  # REPLICATE: the +HEAD last sent
        # Highest id this stream has sent (or the replica proved it holds, at REPLICATE):
        # an ACK above it cannot be honest.
        self.sent = cmd.start - 1
        self.acked = -1  # the replica's highest ACK; -1 until its first one
        self.parked = 0  # the id it waits for in ParkedStreams, 0 when not parked
        self.piece: Span | None = None  # the span being sent, from byte piece_at on
        self.piece_at = 0
        # REPLICATE with epochs (protocol.md 3.4): the epoch last announced with +EPOCH; None: older form.
        self.epoch: int | None = -1 if type(cmd) is protocol.Replicate and cmd.epoch is not None else None
        self.cursors = server.cursors.feed() if self.replica else None  # REPLICATE: +CURSOR markers sent
        # A replica's name in STATS and metrics: the address it listens on, if it said (protocol.md 3.4).
        self.name = cmd.address if type(cmd) is protocol.Replicate and cmd.address else sink.peer

    @property
    def peer(self) -> str:
        return self.sink.peer

    @property
    def limit(self) -> int:
        """The highest id this stream may send: replicas get what is committed, readers what is visible."""
        srv = self.server
        return srv.log.head if self.replica else srv.visible_head()

    def begin(self) -> None:
        """Right after the stream's OK: a replica learns the leader's position first."""
        if self.replica:
            self.send_position()

    def send_cursors(self) -> None:
        """REPLICATE: ``+CURSOR`` markers for cursors that moved, up to the last id sent (cursor_commands.py)."""
        if self.cursors is not None:
            markers = self.cursors.markers(self.sent)
            if markers:
                self.sink.write(markers)

    def pump(self) -> None:
        """Send committed records until the socket is full, the reader is caught up, or the stream ends.

        An unexpected exception ends the stream with ``ERR UNAVAILABLE`` and
        puts the server in fail-stop (`LogServer.fail_stop`): never a stream
        that silently stops, nor a fault that reaches the commit path.
        """
        try:
            self._pump()
        except Exception as exc:
            log.error("stream_failed", peer=self.sink.peer, id=self.next, exc_info=exc)
            self.server.fail_stop("a stream failed", exc)
            self.end(protocol.error_reply(UnavailableError(f"a stream failed: {exc!r}")))

    def _pump(self) -> None:
        srv = self.server
        sink = self.sink
        chunk = srv.stream_chunk
        while not sink.write_paused:
            if srv.budgets.output_over():
                srv.budgets.throttled.add(self)  # the server's output budget is spent: wait for room
                return
            span = self.piece
            if span is None:
                span = self._next_span()
                if span is None:
                    return  # parked, or the stream ended
                self.piece, self.piece_at = span, span.start
            # A span goes out in pieces of at most `chunk` bytes, so a stream holds no more
            # than its budget and one piece however big a record is.
            end = min(span.end, self.piece_at + chunk)
            try:
                data = os.pread(span.handle.fd, end - self.piece_at, self.piece_at)
                if len(data) != end - self.piece_at:
                    raise UnavailableError("segment shorter than its index")
            except (OSError, ServerError) as exc:
                log.error("stream_read_failed", peer=sink.peer, id=self.next, error=str(exc))
                mid_record = self.piece_at > span.start
                self.piece = None
                if mid_record:  # an ERR line here would land inside a record: close instead
                    self.detach()
                    sink.abandon()
                else:
                    self.end(protocol.error_reply(UnavailableError(f"read failed at id {self.next}: {exc}")))
                return
            sink.write(data)
            self.piece_at = end
            if end < span.end:
                continue
            if not self._span_sent(span):
                return

    def _span_sent(self, span: Span) -> bool:
        """The last byte of ``span`` is written: move past it. False if that ended the stream (its limit)."""
        self.piece = None
        self.sent = span.last_id
        self.next = span.last_id + 1
        if self.replica:
            self.send_cursors()
        if self.left:
            self.left -= span.last_id - span.first_id + 1
            if self.left == 0:
                self.end(protocol.EOF)
                return False
        return True

    def _next_span(self) -> Span | None:
        """The next byte range to send (after any markers it needs), or None if the stream waits or ended."""
        srv = self.server
        sink = self.sink
        lg = srv.log
        limit = self.limit
        if self.next > limit:
            if sink.closing():  # CLOSE: end at what is committed instead of waiting
                self.end(protocol.EOF)
            else:
                srv.park(self)
            return None
        count = limit - self.next + 1
        if self.left and self.left < count:
            count = self.left
        epoch = -1
        if self.epoch is not None:  # a span never crosses into another epoch
            epoch, epoch_end = srv.epochs.epoch_of(self.next)
            if epoch_end is not None:
                count = min(count, epoch_end - self.next)
        try:
            span = lg.span(self.next, count, srv.stream_chunk)
        except NotFoundError as exc:  # retention deleted what this reader was about to read
            self.end(protocol.error_reply(exc))
            return None
        except (OSError, CorruptRecordError) as exc:
            log.error("stream_read_failed", peer=sink.peer, id=self.next, error=str(exc))
            self.end(protocol.error_reply(UnavailableError(f"read failed at id {self.next}: {exc}")))
            return None
        except ServerError as exc:  # e.g. the segment cannot be opened: out of descriptors
            log.error("stream_read_failed", peer=sink.peer, id=self.next, error=str(exc))
            self.end(protocol.error_reply(exc))
            return None
        if span is None:
            srv.park(self)
            return None
        if self.replica:
            self.send_position()
            if self.epoch is not None and epoch != self.epoch:
                self.epoch = epoch
                sink.write(epoch_marker(epoch, self.next))
            seg = lg.segment_of(span.first_id)
            if seg != self.segment:
                self.segment = seg
                sink.write(segment_marker(seg))
        return span

    def send_position(self) -> None:
        """Tell a replica the commit point and high watermark if they moved (``+HEAD``)."""
        srv = self.server
        pos = (srv.log.head, srv.visible_head())
        if pos != self.position:
            self.position = pos
            self.sink.write(position_marker(*pos))
        self.send_cursors()

    def probe(self) -> None:
        """Send the reader something it can take now, whatever the stream waits for (protocol.md 3.1).

        For a peer that half-closed: bytes are the only thing that tells one
        still reading from one gone entirely (whose kernel answers them with a
        reset). Inside a record: its next byte. Between records: an empty line
        (CR LF), which readers skip; a replica gets its ``+HEAD`` again instead.
        """
        span = self.piece
        if span is not None:
            try:
                data = os.pread(span.handle.fd, 1, self.piece_at)
            except OSError:
                return  # the next pump meets the failure and reports it
            if not data:
                return
            self.sink.write(data)
            self.piece_at += 1
            if self.piece_at == span.end:
                self._span_sent(span)
        elif self.replica:
            self.position = (-1, -1)
            self.send_position()
        else:
            self.sink.write(EMPTY_LINE)

    def ack(self, id: int) -> None:
        """The replica holds everything up to ``id``; an id it was never sent is a lie."""
        if id > self.sent:
            raise ProtocolError(f"ACK {id} is above the highest id sent on this stream ({self.sent})")
        if id > self.acked:
            self.acked = id
            self.server.replica_ack(self, id)

    def end(self, last: bytes) -> None:
        """Finish with ``last`` (``+EOF`` or an ``ERR`` line) and hand the connection back to its session.

        A span half sent is completed first, so ``last`` never lands inside a record.
        """
        self.detach()
        if not self.complete_piece():
            self.sink.abandon()  # cannot be framed any more: only closing is left
            return
        self.sink.write(last)
        self.sink.stream_ended()

    def complete_piece(self) -> bool:
        """Send the rest of a span half sent (at most one piece's worth of records); False if that failed."""
        span, self.piece = self.piece, None
        if span is not None:
            try:
                self.sink.write(os.pread(span.handle.fd, span.end - self.piece_at, self.piece_at))
            except OSError:
                return False
        return True

    def detach(self) -> None:
        """Forget this stream everywhere the server tracks it (it ended, or its connection is gone)."""
        srv = self.server
        srv.unpark(self)
        srv.stream_gone(self)


class ParkedStreams:
    """Streams waiting for ids not yet visible to them, by the id they wait for.

    Readers and replicas wait on different limits (the high watermark, the
    commit point), so the server keeps one index of each. A commit pops the
    ids it reaches from a heap: O(streams woken + log ids waited for).
    """

    def __init__(self) -> None:
        self._by_id: dict[int, set[Stream]] = {}
        self._ids: list[int] = []  # a heap of the keys of _by_id (and some stale ones)
        self.count = 0

    def park(self, stream: Stream) -> None:
        if stream.parked:
            return
        id = stream.next
        group = self._by_id.get(id)
        if group is None:
            group = self._by_id[id] = set()
            heapq.heappush(self._ids, id)
        group.add(stream)
        stream.parked = id
        self.count += 1

    def unpark(self, stream: Stream) -> None:
        id = stream.parked
        if not id:
            return
        stream.parked = 0
        group = self._by_id.get(id)
        if group is not None and stream in group:
            group.discard(stream)
            self.count -= 1
            if not group:
                del self._by_id[id]
                if len(self._ids) > 2 * len(self._by_id) + 64:  # drop the stale heap entries
                    self._ids = list(self._by_id)
                    heapq.heapify(self._ids)

    def ready(self, limit: int) -> list[Stream]:
        """Unpark and return every stream waiting for an id <= ``limit``."""
        ids = self._ids
        out: list[Stream] = []
        while ids and ids[0] <= limit:
            group = self._by_id.pop(heapq.heappop(ids), None)
            if group:
                for stream in group:
                    stream.parked = 0
                out.extend(group)
        self.count -= len(out)
        return out

    def __len__(self) -> int:
        return self.count
