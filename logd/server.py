"""asyncio wiring: connections -> protocol -> queue -> replies; streams; limits; stop.

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
import signal
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog

from . import __version__, protocol
from .config import Config
from .errors import (
    BusyError,
    DeniedError,
    DivergedError,
    IdleTimeoutError,
    LogdError,
    NotFoundError,
    ProtocolError,
    ReadOnlyError,
    ServerError,
    UnavailableError,
)
from .queue import AppendQueue
from .replication import Follower, ReplicaSet, position_marker, segment_marker
from .storage import Log

log = structlog.get_logger("logd.server")

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
        self.server.replicas.pop(self, None)
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
        queue = self.server.queue
        hold = self.streaming or self.stream_slots > 0
        replicas = self.server.replication
        for item in items:
            kind = type(item)
            if kind is protocol.Msg:
                if hold or self.server.read_only:
                    slots.append([DEFER, item])
                    continue
                if replicas.min_replicas:
                    refusal = replicas.refusal()
                    if refusal is not None:
                        slots.append([READY, protocol.error_reply(refusal)])
                        continue
                bodies: list[bytes] = item.bodies  # type: ignore[union-attr]
                nbytes = sum(map(len, bodies))
                slot = [WAIT, nbytes]
                slots.append(slot)
                self.inflight_bytes += nbytes
                queue.submit(bodies, nbytes, self, slot)
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
        self.flush()

    # --- the append queue's callbacks (Submitter) ---------------------------------

    def batch_done(self, token: object, last_id: int) -> None:
        slot: list[Any] = token  # type: ignore[assignment]
        self.inflight_bytes -= slot[1]
        replicas = self.server.replication
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
            if self.read_paused or self.inflight_bytes > self.max_inflight or len(slots) > MAX_SLOTS:
                self._update_reading()
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
                self._submit_deferred(payload, out)
                if slots and slots[0][0] == WAIT:
                    break
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

    def _submit_deferred(self, msg: protocol.Msg, out: list[bytes]) -> None:
        if self.server.read_only:
            out.append(protocol.error_reply(self.server.readonly_error()))
            return
        refusal = self.server.replication.refusal()
        if refusal is not None:
            out.append(protocol.error_reply(refusal))
            return
        nbytes = sum(len(b) for b in msg.bodies)
        slot: list[Any] = [WAIT, nbytes]
        self.slots.appendleft(slot)
        self.inflight_bytes += nbytes
        self.server.queue.submit(msg.bodies, nbytes, self, slot)

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
            if cmd.start < srv.log.first:
                raise NotFoundError(f"id {cmd.start} is before the oldest retained id {srv.log.first}")
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
        self.server.replicas.pop(self, None)

    def close_for_stop(self) -> None:
        """Graceful stop: end the stream, answer what is queued, then close."""
        if self.closed:
            return
        self._end_stream()
        # Batches not yet submitted were never acknowledged: drop them.
        self.slots = deque(s for s in self.slots if s[0] != DEFER)
        self.stream_slots = 0
        self.slots.append([HANGUP, None])
        self.flush()


class LogServer:
    """The server state: config, log, queue, connections, parked streams."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.log = Log(
            config.data_dir,
            fsync=config.fsync,
            segment_bytes=config.segment_bytes,
            retention_bytes=config.retention_bytes,
            retention_ms=config.retention_ms,
        )
        self.queue = AppendQueue(self.log)
        self.replication = ReplicaSet(config.min_replicas, config.replica_timeout, self.log.head)
        self.follower: Follower | None = None
        self.exit_code = 0
        self.connections: set[Connection] = set()  # counted against max_connections
        self.alive: set[Connection] = set()  # until connection_lost (flushing closes)
        self.waiting: set[Connection] = set()
        self.replicas: dict[Connection, int] = self.replication.acked
        self.read_only = False
        self.leader_address: str | None = None
        self.stopping = False
        self.started = time.monotonic()
        self._stop = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.queue.add_listener(self._on_commit)

    # --- running ------------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        """Listen; return the bound host and port."""
        loop = asyncio.get_running_loop()
        self.queue.start()
        self._server = await loop.create_server(
            lambda: Connection(self), self.config.host, self.config.port, backlog=1024, reuse_address=True
        )
        sock = self._server.sockets[0]
        host, port = sock.getsockname()[:2]
        if self.config.idle_timeout:
            self._tasks.append(loop.create_task(self._idle_sweeper()))
        if self.config.retention_bytes is not None or self.config.retention_ms is not None:
            self._tasks.append(loop.create_task(self._retention_loop()))
        if self.config.replica_of:
            self.read_only = True
            self.leader_address = self.config.replica_of
            self.follower = Follower(self, self.config.replica_of)
            self.follower.start()
        log.info(
            "listening",
            host=host,
            port=port,
            data_dir=self.log.directory,
            head=self.log.head,
            fsync=str(self.log.policy),
            recovered_bytes_cut=self.log.recovered_bytes_cut,
        )
        return host, port

    def request_stop(self, reason: str) -> None:
        """Ask for a graceful stop (signal handler, SHUTDOWN)."""
        if not self._stop.is_set():
            log.info("stopping", reason=reason)
            self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting, commit what is in flight, close streams with +EOF, close the log."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        if self.follower is not None:
            await self.follower.stop()
        self.replication.close()
        for task in self._tasks:
            task.cancel()
        for conn in list(self.connections):
            conn._update_reading()
        await self.queue.drain()
        self.replication.abandon("before the server stopped")
        for conn in list(self.connections):
            conn.close_for_stop()
        await self.queue.drain()
        deadline = time.monotonic() + self.config.shutdown_timeout
        # Closed transports flush their buffers before connection_lost; wait for that.
        while self.alive and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.alive):
            if conn.transport is not None:
                conn.transport.abort()
        await self.queue.stop()
        self.log.close()
        log.info("stopped", head=self.log.head)

    # --- commit fan-out -------------------------------------------------------------

    def _on_commit(self, head: int) -> None:
        if self.replication.on_commit(head):
            self._release_held()
        self.wake_streams()

    def wake_streams(self) -> None:
        """Wake parked streams that have something to send: replicas up to the
        commit point, readers up to the high watermark."""
        if not self.waiting:
            return
        head = self.log.head
        visible = self.visible_head()
        ready = [c for c in self.waiting if c.stream_next <= (head if c.stream_kind == "replicate" else visible)]
        for conn in ready:
            self.waiting.discard(conn)
            conn.wake()

    # --- replication hooks ------------------------------------------------------------

    def visible_head(self) -> int:
        """The highest id readers may see: the commit point, capped by the high
        watermark (with --min-replicas, or on a follower, the leader's)."""
        head = self.log.head
        if self.follower is not None:
            return min(head, self.follower.leader_visible)
        if self.replication.min_replicas:
            return min(head, self.replication.hw)
        return head

    def replica_ack(self, conn: Connection, id: int) -> None:
        """A replica holds everything up to ``id``."""
        if self.replication.ack(conn, id):
            self._release_held()
            self.wake_streams()
            # Replicas cap their readers at our high watermark: tell the idle ones.
            for c in list(self.waiting):
                if c.stream_kind == "replicate":
                    c.send_position()

    def _release_held(self) -> None:
        self.replication.release()

    def refuse_writes(self) -> None:
        """REFUSE: stop accepting MSG (failover: the old leader steps down); reads go on."""
        if not self.read_only:
            log.warning("writes_refused", head=self.log.head)
        self.read_only = True

    def accept_writes(self) -> None:
        """ACCEPT: stop following (if we were) and accept MSG from the next id."""
        follower, self.follower = self.follower, None
        if follower is not None:
            # What the old leader's readers could see stays visible here.
            self.replication.hw = max(self.replication.hw, follower.leader_visible)
            follower.cancel()
            log.warning("promoted", former_leader=follower.leader, head=self.log.head)
        self.read_only = False
        self.leader_address = None

    def fail(self, exit_code: int, reason: str) -> None:
        """Stop the server with a non-zero exit status (e.g. a follower that diverged)."""
        self.exit_code = exit_code
        self.request_stop(reason)

    def check_replica_start(self, start: int, prev_crc: int | None) -> None:
        """Refuse a follower whose history differs from ours (DIVERGED)."""
        prev = start - 1
        if prev > self.log.head:
            raise DivergedError(f"follower is ahead: it has id {prev}, this server's head is {self.log.head}")
        if prev_crc is None or prev < self.log.first or prev == 0:
            return
        ours = self.log.crc_of(prev)
        if ours != prev_crc:
            raise DivergedError(f"id {prev} differs: leader crc {ours:08x}, follower crc {prev_crc:08x}")

    def readonly_error(self) -> ReadOnlyError:
        where = self.leader_address or "-"
        return ReadOnlyError(f"{where} this server does not accept writes")

    # --- figures ------------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        p50, p99 = self.queue.fsync_percentiles()
        figures: dict[str, object] = {
            "version": __version__,
            "role": "follower" if self.follower is not None else "readonly" if self.read_only else "leader",
        }
        figures.update(self.log.stats())
        figures.update(
            {
                "connections": len(self.connections),
                "tails": sum(1 for c in self.connections if c.streaming),
                "waiting_tails": len(self.waiting),
                "replicas": len(self.replicas),
                "appended_messages": self.queue.appended_messages,
                "appended_bytes": self.queue.appended_bytes,
                "pending_bytes": self.queue.pending_bytes,
                "fsyncs": self.queue.fsyncs,
                "fsync_p50_us": p50,
                "fsync_p99_us": p99,
                "uptime_s": int(time.monotonic() - self.started),
            }
        )
        figures["head"] = self.visible_head()
        figures["log_head"] = self.log.head
        if self.follower is not None:
            figures.update(self.follower.stats())
        figures.update(self.replication.stats())
        return figures

    # --- housekeeping ---------------------------------------------------------------------

    async def _idle_sweeper(self) -> None:
        timeout = self.config.idle_timeout or 0
        period = max(0.05, min(1.0, timeout / 4))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.streaming or now - conn.last_active <= timeout:
                    continue
                if conn.slots:  # still answering; not idle
                    continue
                conn._close_after([protocol.error_reply(IdleTimeoutError(f"no command for {timeout:g} s"))])

    async def _retention_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            deleted = self.log.apply_retention()
            if deleted:
                log.info("retention_deleted", segments=deleted, first=self.log.first)


async def serve(config: Config, ready: Callable[[str, int], None] | None = None) -> int:
    """Run a server until it is asked to stop (signal or SHUTDOWN); return the exit status."""
    server = LogServer(config)
    host, port = await server.start()
    loop = asyncio.get_running_loop()
    signals = {"count": 0}

    def on_signal(sig: signal.Signals) -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            log.warning("forced_exit", signal=sig.name)
            os._exit(1)
        server.request_stop(sig.name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    if ready is not None:
        ready(host, port)
    await server.wait_stopped()
    return server.exit_code


def run(config: Config, ready: Callable[[str, int], None] | None = None) -> int:
    """Blocking entry point for the CLI: uvloop, then `serve`; returns the exit status."""
    import uvloop

    return uvloop.run(serve(config, ready))
