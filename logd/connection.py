"""One client connection: bytes -> commands -> ordered reply slots; streams.

Each connection turns received bytes into commands (`protocol.CommandParser`,
one call per chunk) and gives every command a *slot* in its reply queue.
Slots are answered strictly in order: a MSG slot waits for the append queue
to commit its batch, a HEAD slot is computed only once every earlier slot is
answered, and a READ slot turns the connection into a stream until it ends.
All replies that are ready after a chunk (or after a commit round) leave in
one ``transport.write``.

Streams (READ, REPLICATE) send segment byte ranges read with ``os.pread``:
no per-record Python work. They are paced by ``pause_writing`` /
``resume_writing`` and, when they reach the commit point, park in a set that
the queue wakes on each commit; an idle tail costs nothing.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import structlog

from . import protocol
from .errors import (
    BusyError,
    DeniedError,
    DivergedError,
    LogdError,
    NotFoundError,
    ProtocolError,
    ServerError,
    UnavailableError,
)
from .protocol.replica import position_marker, segment_marker

log = structlog.get_logger("logd.server")

if TYPE_CHECKING:
    from .server import LogServer


log = structlog.get_logger("logd.connection")

# Slot states in a connection's reply queue.
# WAIT holds the byte count of the submitted batch until its ack replaces it.
READY, WAIT, LAZY, STREAM, DEFER, CLOSE, SHUTDOWN, FATAL, HANGUP = range(9)

STREAM_CHUNK = 1 << 20  # bytes per pread + transport.write on a stream
WRITE_HIGH_WATER = 4 * STREAM_CHUNK
WRITE_LOW_WATER = STREAM_CHUNK
MAX_SLOTS = 100_000  # commands held per connection before we stop reading it
OK_EMPTY = b"OK\r\n"


class Connection(asyncio.Protocol):
    """One client connection: parser, ordered reply slots, an optional stream."""

    def __init__(self, server: LogServer) -> None:
        self.server = server
        cfg = server.config
        self.parser = protocol.CommandParser(
            max_line_bytes=cfg.max_line_bytes,
            max_message_bytes=cfg.max_message_bytes,
            max_batch=cfg.max_batch,
            max_batch_bytes=cfg.max_batch_bytes,
        )
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.slots: deque[list[Any]] = deque()
        self.inflight_bytes = 0
        self.write_paused = False
        self.read_paused = False
        self.closed = False
        self.last_active = time.monotonic()
        # Stream state (READ / REPLICATE): next id to send, records left (0 = forever).
        self.streaming = False
        self.stream_next = 0
        self.stream_left = 0
        self.stream_kind = ""
        self.replica_acked = 0
        self.stream_slots = 0  # STREAM slots queued but not started
        self.max_inflight = cfg.max_inflight_bytes
        self.replication = server.replication
        # REPLICATE streams: the segment last announced (+SEG) and position (+HEAD) last sent.
        self.stream_seg = 0
        self.stream_pos = (-1, -1)

    # --- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transport class is not an asyncio.Transport subclass, but quacks like one.
        tr: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport = tr
        peer = tr.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        tr.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        srv = self.server
        if len(srv.connections) >= srv.config.max_connections or srv.stopping:
            reason = "server is stopping" if srv.stopping else "too many connections"
            tr.write(protocol.error_reply(BusyError(reason)))
            tr.close()
            self.closed = True
            return
        srv.connections.add(self)
        srv.alive.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self.server.alive.discard(self)
        self.server.waiting.discard(self)
        self.replication.forget(self)
        self.slots.clear()

    def eof_received(self) -> bool | None:
        # The client finished sending: answer what it asked, then close (a tail
        # goes on, since the client may still be reading).
        self.slots.append([HANGUP, None])
        self.flush()
        return True

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.streaming and self.stream_next and self not in self.server.waiting:
            if self._pump():
                self.flush()
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_active = time.monotonic()
        items = self.parser.feed(data)
        slots = self.slots
        hold = self.streaming or self.stream_slots > 0
        for item in items:
            kind = type(item)
            if kind is protocol.Msg:
                # Behind a stream, a MSG waits its turn (DEFER); otherwise it goes
                # to the queue now, so batches from one chunk share a round.
                slots.append([DEFER, item] if hold else self._admit(item))  # type: ignore[arg-type]
            elif kind is protocol.Ping:
                slots.append([READY, protocol.PONG])
            elif kind is protocol.Head:
                slots.append([LAZY, self._head_reply])
            elif kind is protocol.Read or kind is protocol.Replicate:
                slots.append([STREAM, item])
                self.stream_slots += 1
                hold = True
            elif kind is protocol.Close:
                slots.append([CLOSE, None])
                if self.streaming:
                    self._end_stream()
            elif kind is protocol.Stats:
                slots.append([LAZY, self._stats_reply])
            elif kind is protocol.Ack:
                # A replica's progress report: it needs no reply.
                if self.streaming and self.stream_kind == "replicate":
                    self.replica_acked = max(self.replica_acked, item.id)  # type: ignore[union-attr]
                    self.server.replica_ack(self, self.replica_acked)
            elif kind is protocol.Shutdown:
                slots.append([SHUTDOWN, None])
            elif kind is protocol.Refuse:
                self.server.refuse_writes()
                slots.append([READY, OK_EMPTY])
            elif kind is protocol.Accept:
                self.server.accept_writes()
                slots.append([READY, OK_EMPTY])
            elif isinstance(item, ProtocolError):
                slots.append([FATAL if item.fatal else READY, protocol.error_reply(item)])
            else:  # pragma: no cover - the parser only yields the above
                slots.append([READY, protocol.error_reply(ProtocolError("unsupported command"))])
        if slots and slots[0][0] == WAIT and not self.streaming:
            # The common case after MSGs: nothing to answer yet, so skip
            # flush's checks and only see whether this client must be paused.
            self._pause_if_behind()
        else:
            self.flush()

    # --- the append queue's callbacks (Submitter) ---------------------------------

    def batch_done(self, token: object, last_id: int) -> None:
        slot: list[Any] = token  # type: ignore[assignment]
        self.inflight_bytes -= slot[1]
        replicas = self.replication
        if replicas.min_replicas and last_id > replicas.hw:
            # Committed here; the reply waits until min_replicas replicas hold it.
            slot[1] = 0
            replicas.hold(self, slot, last_id)
            return
        slot[0] = READY
        slot[1] = b"OK %d\r\n" % last_id

    def answer_held(self, slot: list[Any], reply: bytes) -> None:
        """The reply to a MSG held for replicas (`ReplicaSet.hold`) is ready."""
        slot[0] = READY
        slot[1] = reply

    def batch_failed(self, token: object, error: LogdError) -> None:
        slot: list[Any] = token  # type: ignore[assignment]
        self.inflight_bytes -= slot[1]
        slot[0] = READY
        err = error if isinstance(error, ServerError) else UnavailableError(str(error))
        slot[1] = protocol.error_reply(err)

    # --- replies ------------------------------------------------------------------

    def flush(self) -> None:
        """Send every reply that is ready, in order, in one write."""
        if self.closed or self.transport is None:
            return
        slots = self.slots
        if self.streaming or (slots and slots[0][0] == WAIT):
            # Nothing can be sent yet (the common case right after a MSG is
            # submitted): only check whether this client must be paused.
            self._pause_if_behind()
            return
        out: list[bytes] = []
        while slots:
            state = slots[0][0]
            if state == WAIT:
                break
            payload = slots.popleft()[1]
            if state == READY:
                out.append(payload)
            elif state == LAZY:
                out.append(payload())
            elif state == DEFER:
                slot = self._admit(payload)
                if slot[0] == WAIT:
                    slots.appendleft(slot)
                    break
                out.append(slot[1])
            elif state == STREAM:
                self.stream_slots -= 1
                if self._start_stream(payload, out):
                    if out:
                        self.transport.write(b"".join(out))
                        out = []
                    if not self._pump():
                        self._update_reading()
                        return
                elif self.closed:
                    return
            elif state == CLOSE:
                out.append(OK_EMPTY)
                self._close_after(out)
                return
            elif state == HANGUP:
                self._close_after(out)
                return
            elif state == FATAL:
                out.append(payload)
                self._close_after(out)
                return
            elif state == SHUTDOWN:
                if self.server.config.allow_shutdown:
                    out.append(OK_EMPTY)
                    self.server.request_stop("shutdown_command")
                else:
                    out.append(protocol.error_reply(DeniedError("server was not started with --allow-shutdown")))
        if out:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])
        self._update_reading()

    def _admit(self, msg: protocol.Msg) -> list[Any]:
        """Submit a MSG to the append queue: its WAIT slot, or a READY slot with the refusal."""
        server = self.server
        if server.read_only:
            return [READY, protocol.error_reply(server.readonly_error())]
        if self.replication.min_replicas:  # the check walks the replicas: not for every MSG
            refusal = self.replication.refusal()
            if refusal is not None:
                return [READY, protocol.error_reply(refusal)]
        bodies = msg.bodies
        nbytes = sum(map(len, bodies))
        slot: list[Any] = [WAIT, nbytes]
        self.inflight_bytes += nbytes
        server.queue.submit(bodies, nbytes, self, slot)
        return slot

    def _close_after(self, out: list[bytes]) -> None:
        assert self.transport is not None
        if out:
            self.transport.write(b"".join(out))
        self.slots.clear()
        self.closed = True
        self.server.connections.discard(self)
        self.transport.close()

    def _head_reply(self) -> bytes:
        return b"OK %d\r\n" % self.server.visible_head()

    def _stats_reply(self) -> bytes:
        return protocol.stats_reply(self.server.stats())

    def _pause_if_behind(self) -> None:
        """`_update_reading`, but only when a pause or resume may be due (cheap to call per chunk)."""
        if self.read_paused or self.inflight_bytes > self.max_inflight or len(self.slots) > MAX_SLOTS:
            self._update_reading()

    def _update_reading(self) -> None:
        """Stop reading from a client that outruns us; resume when it has caught up."""
        if self.transport is None or self.closed:
            return
        pause = (
            self.inflight_bytes > self.max_inflight
            or (self.write_paused and not self.streaming)
            or len(self.slots) > MAX_SLOTS
            or self.server.stopping
        )
        if pause and not self.read_paused:
            self.transport.pause_reading()
            self.read_paused = True
        elif not pause and self.read_paused:
            self.transport.resume_reading()
            self.read_paused = False

    # --- streams ------------------------------------------------------------------

    def _start_stream(self, cmd: protocol.Read | protocol.Replicate, out: list[bytes]) -> bool:
        """Validate a READ/REPLICATE; on success queue its OK and enter stream mode."""
        srv = self.server
        try:
            srv.log.check_retained(cmd.start)
            if isinstance(cmd, protocol.Replicate):
                srv.check_replica_start(cmd.start, cmd.prev_crc)
        except DivergedError as exc:
            out.append(protocol.error_reply(exc))
            self._close_after(out)
            out.clear()
            return False
        except ServerError as exc:
            out.append(protocol.error_reply(exc))
            return False
        out.append(OK_EMPTY)
        self.streaming = True
        self.stream_next = cmd.start
        self.stream_left = cmd.limit if isinstance(cmd, protocol.Read) else 0
        self.stream_kind = "replicate" if isinstance(cmd, protocol.Replicate) else "read"
        if self.stream_kind == "replicate":
            self.stream_seg = 0
            self.stream_pos = (srv.log.head, srv.visible_head())
            out.append(position_marker(*self.stream_pos))
            self.replica_acked = cmd.start - 1
            srv.replica_ack(self, cmd.start - 1)
        return True

    def _pump(self) -> bool:
        """Send committed records until the socket is full or we reach the head.

        Returns True when the stream ended (limit reached or an error).
        """
        srv = self.server
        assert self.transport is not None
        replica = self.stream_kind == "replicate"
        while not self.write_paused:
            # Readers see up to the high watermark; replicas get everything committed.
            limit = srv.log.head if replica else srv.visible_head()
            if self.stream_next > limit:
                srv.waiting.add(self)
                return False
            count = limit - self.stream_next + 1
            if self.stream_left and self.stream_left < count:
                count = self.stream_left
            try:
                span = srv.log.span(self.stream_next, count, STREAM_CHUNK)
            except NotFoundError as exc:
                # Retention deleted what this reader was about to read.
                self.transport.write(protocol.error_reply(exc))
                self._stream_over()
                return True
            if span is None:
                srv.waiting.add(self)
                return False
            try:
                data = os.pread(span.handle.fd, span.end - span.start, span.start)
            except OSError as exc:
                self.transport.write(protocol.error_reply(UnavailableError(f"read failed: {exc}")))
                self._stream_over()
                return True
            if len(data) != span.end - span.start:
                self.transport.write(protocol.error_reply(UnavailableError("segment shorter than its index")))
                self._stream_over()
                return True
            if replica:
                self.send_position()
                seg = srv.log.segment_of(span.first_id)
                if seg != self.stream_seg:
                    self.stream_seg = seg
                    self.transport.write(segment_marker(seg))
            self.transport.write(data)
            n = span.last_id - span.first_id + 1
            self.stream_next = span.last_id + 1
            if self.stream_left:
                self.stream_left -= n
                if self.stream_left == 0:
                    self.transport.write(protocol.EOF)
                    self._stream_over()
                    return True
        return False

    def send_position(self) -> None:
        """Tell a replica the commit point and high watermark if they moved (``+HEAD``)."""
        srv = self.server
        pos = (srv.log.head, srv.visible_head())
        if pos != self.stream_pos and self.transport is not None and not self.closed:
            self.stream_pos = pos
            self.transport.write(position_marker(*pos))

    def wake(self) -> None:
        """The commit point moved past our next id: send more."""
        if self.streaming and not self.closed and self._pump():
            self.flush()

    def _end_stream(self) -> None:
        """CLOSE or shutdown: end the stream now (every write held whole records)."""
        if not self.streaming or self.transport is None:
            return
        self.transport.write(protocol.EOF)
        self._stream_over()

    def _stream_over(self) -> None:
        self.streaming = False
        self.server.waiting.discard(self)
        self.replication.forget(self)

    def close_for_stop(self) -> None:
        """Graceful stop: end the stream, answer what is queued, then close."""
        if self.closed:
            return
        self._end_stream()
        # Batches not yet submitted were never acknowledged, and reads not yet
        # started would keep the connection open: drop both.
        self.slots = deque(s for s in self.slots if s[0] != DEFER and s[0] != STREAM)
        self.stream_slots = 0
        self.slots.append([HANGUP, None])
        self.flush()
