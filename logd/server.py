"""asyncio wiring: the listener, connections -> queue -> replies, commit fan-out, stop.

`LogServer` holds the state (config, log, append queue, connections, parked
streams, replicas); `serve` runs it until a signal or SHUTDOWN; `run` is the
CLI's blocking entry point. The per-connection protocol is in `connection.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import structlog

from . import __version__, protocol, systemd, tls
from .access import AuthGate, LogLimiter
from .auth import AuthFileError, load_table, loose_permissions
from .budgets import Budgets
from .config import Config
from .connection import Connection
from .cursor_commands import ServerCursors
from .errors import (
    BusyError,
    CorruptRecordError,
    DeniedError,
    DivergedError,
    FencedError,
    HandshakeAnswer,
    IdleTimeoutError,
    LogdError,
    ReadOnlyError,
    ServerError,
    UnavailableError,
)
from .fdlimit import fit_connections
from .listener import Listener, bind_all, resolve
from .logging import configure_logging
from .queue import AppendQueue
from .replication import Follower, ReplicaSet
from .replication.leader import replicate_handshake
from .storage import Log, watermark
from .storage.epochs import Epochs
from .streams import STREAM_CHUNK, ParkedStreams, Stream

if TYPE_CHECKING:
    from .metrics import MetricsEndpoint

log = structlog.get_logger("logd.server")

WATERMARK_SAVE_S = 1.0  # how often a changed high watermark is saved (--min-replicas)
EXIT_FAIL_STOPPED = 5  # the server stopped after a fail-stop (see LogServer.fail_stop)
STOP_GRACE_S = 5.0  # beyond shutdown_timeout, for the final commit and sync, before a signal forces the exit


class LogServer:
    """The server state: config, log, queue, connections, streams, budgets."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.log = Log(
            config.data_dir,
            fsync=config.fsync,
            segment_bytes=config.segment_bytes,
            retention_bytes=config.retention_bytes,
            retention_ms=config.retention_ms,
            preallocate=config.preallocate,
        )
        self.queue = AppendQueue(
            self.log, on_failure=self.fail_stop, backlog_bytes=config.server_input_bytes // 2, on_backlog=self._backlog
        )
        # Leader epochs and a REFUSE in force (protocol.md 2 and 3.4); the file
        # is read after the log is opened, so the data dir's lock guards it.
        self.epochs = Epochs.load(self.log.directory)
        self.retention_passes = 0  # for STATS: tests wait for a pass instead of sleeping
        self.fenced_by: int | None = None  # the newer epoch a replica told us of, after we stepped down
        self.cursors = ServerCursors(self)
        # A restarted leader shows what it last saved as visible, no more
        # than it holds (a torn tail may have gone), until replicas confirm more.
        saved_hw = min(watermark.load(config.data_dir), self.log.head)
        self.replication = ReplicaSet(config.min_replicas, config.replica_timeout, self.log.head, saved_hw)
        self.follower: Follower | None = None
        self.exit_code = 0
        # Counted against max_connections from connection_made to connection_lost,
        # so a closed connection counts until its buffers are gone.
        self.connections: set[Connection] = set()
        self.streams: set[Stream] = set()
        self.readers = ParkedStreams()  # streams waiting for the high watermark to move
        self.replicas = ParkedStreams()  # REPLICATE streams waiting for the commit point
        self.replica_streams: set[Stream] = set()
        self.stalled: set[Connection] = set()  # write-paused: their peer does not read
        self.budgets = Budgets(config, self.queue, self._room)
        self.stream_chunk = max(64 << 10, min(STREAM_CHUNK, config.conn_output_bytes // 2))
        self._in_room = False
        self.read_only = False
        self.failure: str | None = None  # fail-stop: why this server no longer appends
        self.leader_address: str | None = None
        self.stopping = False
        self.started = time.monotonic()
        self._stop = asyncio.Event()
        self._listener: Listener | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics: MetricsEndpoint | None = None  # --metrics-port
        self.queue.add_listener(self._on_commit)
        # Authentication (--auth-file) and TLS (--tls-cert/--tls-key): see access.py, tls.py.
        self.gate = AuthGate(load_table(config.auth_file) if config.auth_file else None)
        if config.auth_file and loose_permissions(config.auth_file):
            log.warning("auth_file_readable_by_others", path=config.auth_file, hint="chmod 600")
        self.tls = None
        if config.tls_cert is not None and config.tls_key is not None:
            self.tls = tls.server_context(config.tls_cert, config.tls_key, config.tls_ca)
        self.tls_failure_log = LogLimiter()

    # --- running ------------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        """Listen; return the bound host and port."""
        loop = asyncio.get_running_loop()
        fitting = fit_connections(self.config.max_connections)  # raises the soft RLIMIT_NOFILE too
        if fitting != self.config.max_connections:
            self.config = dataclasses.replace(self.config, max_connections=fitting)
        self.queue.start()
        # Our own accept loop: out of descriptors it refuses connections visibly (listener.py);
        # with TLS it takes each connection through the handshake and reports failures (tls.py).
        sockets = bind_all(resolve(self.config.host, self.config.port), backlog=1024)
        self._listener = Listener(lambda: Connection(self), sockets, ssl=self.tls,
                                  on_handshake_failure=self._tls_failed)
        self._listener.start()
        host, port = self._listener.address
        if self.config.metrics_port is not None:
            from .metrics import MetricsEndpoint  # prometheus_client is loaded only when asked for

            self.metrics = MetricsEndpoint(self, self.config.metrics_host, self.config.metrics_port)
        self._tasks.append(loop.create_task(self._sweeper()))
        if self.config.retention_bytes is not None or self.config.retention_ms is not None:
            self._tasks.append(loop.create_task(self._retention_loop()))
        if self.config.min_replicas:
            self._tasks.append(loop.create_task(self._watermark_saver()))
        if self.config.replica_address:
            self.read_only = True
            self.leader_address = self.config.replica_address
            self.follower = Follower(self, self.config.replica_address)
            self.follower.start()
        elif self.epochs.refused:
            # REFUSE (or a step-down) outlives a restart: only ACCEPT undoes it.
            self.read_only = True
            log.warning("starting_read_only", epoch=self.epochs.current, epoch_seen=self.epochs.seen)
        log.info(
            "listening",
            host=host,
            port=port,
            data_dir=self.log.directory,
            head=self.log.head,
            fsync=str(self.log.policy),
            recovered_bytes_cut=self.log.recovered_bytes_cut,
            auth=self.gate.enabled,
            tls=self.tls is not None,
        )
        return host, port

    def request_stop(self, reason: str) -> None:
        """Ask for a graceful stop (signal handler, SHUTDOWN)."""
        if not self._stop.is_set():
            log.info("stopping", reason=reason)
            self._stop.set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()
        systemd.notify("STOPPING=1")
        await self.shutdown()

    def reload(self, read_config: Callable[[], Config]) -> None:
        """SIGHUP: read the configuration again and apply what can change while running (log level)."""
        try:
            new = read_config()
        except ValueError as exc:  # a bad edit to the file: keep running as before
            log.error("reload_failed", error=str(exc))
            return
        if new.log_level != self.config.log_level:
            configure_logging(self.config.log_format, new.log_level)
            self.config = replace(self.config, log_level=new.log_level)
        log.warning("config_reloaded", log_level=self.config.log_level)

    async def shutdown(self) -> None:
        """Stop accepting, commit what is in flight, close streams with +EOF, close the log."""
        self.stopping = True
        if self._listener is not None:
            self._listener.close()
        if self.follower is not None:
            await self.follower.stop()
        self.replication.close()
        for task in self._tasks:
            task.cancel()
        deadline = time.monotonic() + self.config.shutdown_timeout
        for conn in list(self.connections):
            conn.flush()  # stops reading (stopping)
        await self._until(self.queue.drain(), deadline, "commit what is in flight")
        self.replication.abandon("before the server stopped")
        for conn in list(self.connections):
            conn.close_for_stop()
        await self._until(self.queue.drain(), deadline, "commit what is in flight")
        # Closed transports flush their buffers before connection_lost; wait for that.
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self.metrics is not None:
            self.metrics.close()
        if not await self._until(self.queue.stop(), deadline + self.config.shutdown_timeout, "final sync"):
            log.error("stopped_without_final_sync", head=self.log.head)
            return  # the disk does not answer: leave the files as they are (recovery handles them)
        if self.config.min_replicas:
            self.save_watermark()
        try:
            self.log.close()
        except (OSError, LogdError) as exc:  # e.g. the final fsync failed: say so, still stop
            log.error("close_failed", error=str(exc))
        self.cursors.close()
        log.info("stopped", head=self.log.head)

    @staticmethod
    async def _until(work: Awaitable[None], deadline: float, what: str) -> bool:
        """Await ``work`` until ``deadline``: a stop must end even if the disk hangs. True if it finished."""
        try:
            await asyncio.wait_for(work, max(0.0, deadline - time.monotonic()))
            return True
        except TimeoutError:
            log.error("shutdown_step_timed_out", step=what)
            return False

    # --- connections --------------------------------------------------------------------

    def new_parser(self) -> protocol.CommandParser:
        cfg = self.config
        return protocol.CommandParser(
            max_line_bytes=cfg.max_line_bytes,
            max_message_bytes=cfg.max_message_bytes,
            max_batch=cfg.max_batch,
            max_batch_bytes=cfg.max_batch_bytes,
        )

    def admit(self, conn: Connection) -> BusyError | None:
        """Count a new connection, or say why it is refused."""
        if self.stopping:
            return BusyError("server is stopping")
        if len(self.connections) >= self.config.max_connections:
            return BusyError("too many connections")
        self.connections.add(conn)
        return None

    def connection_gone(self, conn: Connection) -> None:
        """connection_lost: its buffers are gone; it no longer counts anywhere."""
        self.connections.discard(conn)
        self.stalled.discard(conn)
        self.budgets.forget(conn)

    # --- budgets (protocol.md 3.6) ------------------------------------------------------

    def _backlog(self, on: bool) -> None:
        """The append queue holds more than its share of the input budget (the disk is behind), or no more."""
        self.budgets.charge(0, 0)

    def _room(self) -> None:
        """The budgets have room again: throttled streams go on, then paused connections, oldest first."""
        if self._in_room:
            return
        self._in_room = True
        try:
            budgets = self.budgets
            if not budgets.output_over():
                streams, budgets.throttled = budgets.throttled, set()
                for stream in streams:
                    if stream in self.streams:
                        stream.pump()
                        stream.sink.flush()  # type: ignore[attr-defined]
            for conn in list(dict.fromkeys([*budgets.waiting_grant, *budgets.paused])):  # grants first, once each
                if budgets.over and conn not in budgets.waiting_grant:
                    break
                conn.flush()
        finally:
            self._in_room = False

    # --- the session's backend, server-wide part ---------------------------------------

    def msg_refusal(self) -> ServerError | None:
        """Why a MSG must be refused now, or None (called for every MSG: cheap when writable)."""
        if self.read_only:
            return self.readonly_error()
        if self.failure is not None:
            return UnavailableError(f"server failed and accepts no writes: {self.failure}")
        if self.replication.min_replicas:
            return self.replication.refusal()
        return None

    def check_stream_start(self, cmd: protocol.Read | protocol.Replicate, peer: str = "-") -> bytes | None:
        """Raise the error a READ/REPLICATE is answered with instead of its stream, if any.

        A REPLICATE with epochs gets the epoch exchange first (protocol.md
        3.4): returns its ``OK`` line, or raises `HandshakeAnswer` when the
        replica must cut its log before it can stream.
        """
        answer = None
        if type(cmd) is protocol.Replicate and cmd.epoch is not None:
            answer, streams = self.replica_handshake(cmd, peer)
            if not streams:
                raise HandshakeAnswer(answer)
        self.log.check_retained(cmd.start)
        if type(cmd) is protocol.Replicate:
            self.check_replica_start(cmd.start, cmd.prev_crc)
        return answer

    def stream_started(self, stream: Stream) -> None:
        self.streams.add(stream)
        if stream.replica:
            self.replica_streams.add(stream)

    def stream_gone(self, stream: Stream) -> None:
        self.streams.discard(stream)
        self.budgets.throttled.discard(stream)
        if stream.replica:
            self.replica_streams.discard(stream)
            self.replication.forget(stream)

    def park(self, stream: Stream) -> None:
        (self.replicas if stream.replica else self.readers).park(stream)

    def unpark(self, stream: Stream) -> None:
        (self.replicas if stream.replica else self.readers).unpark(stream)

    # --- commit fan-out -------------------------------------------------------------

    def _on_commit(self, head: int) -> None:
        replication = self.replication
        if replication.on_commit(head) and replication.min_replicas:  # only then are replies held
            replication.release()
        if self.replicas.count or self.readers.count:
            self.wake_streams()

    def wake_streams(self) -> None:
        """Wake the parked streams a commit lets advance: replicas up to the commit point,
        readers up to the high watermark. Streams parked further ahead are not touched."""
        for index in (self.replicas, self.readers):
            if index.count:
                limit = self.log.head if index is self.replicas else self.visible_head()
                for stream in index.ready(limit):
                    if stream not in self.streams:  # detached by an earlier stream's writes this round
                        continue
                    stream.pump()
                    stream.sink.flush()  # type: ignore[attr-defined]

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

    def replica_ack(self, stream: Stream, id: int) -> None:
        """A replica holds everything up to ``id``."""
        if self.replication.ack(stream, id):
            self.replication.release()
            self.wake_streams()
            # Replicas cap their readers at our high watermark: tell the idle ones.
            for s in list(self.replica_streams):
                if s.parked:
                    s.send_position()

    def send_cursor_markers(self) -> None:
        """A cursor moved: replica streams waiting for records get its ``+CURSOR`` marker now."""
        for s in list(self.replica_streams):  # a copy: a write may drop a stream (budgets)
            if s.parked:
                s.send_cursors()

    def refuse_writes(self, peer: str = "-") -> None:
        """REFUSE: stop accepting MSG (failover: the old leader steps down); reads go on.

        Recorded in the data dir first, so a restart stays read-only until ACCEPT.
        """
        try:
            self.epochs.see(self.epochs.seen, refused=True)
        except OSError as exc:
            raise UnavailableError(f"cannot record REFUSE: {exc}") from None
        if not self.read_only:
            log.warning("writes_refused", head=self.log.head, peer=peer)
        self.read_only = True

    def accept_writes(self, peer: str = "-", next_id: int | None = None) -> None:
        """ACCEPT [next_id]: stop following (if we were) and accept MSG from the next id.

        A server that was not writable starts a new epoch (the highest seen +
        1) at its next id, durably, before it takes any MSG. With ``next_id``
        it refuses (`DeniedError`) unless that is its next id, so an operator
        promotes exactly the replica they checked.
        """
        nxt = self.log.written + 1
        if next_id is not None and next_id != nxt:
            raise DeniedError(f"ACCEPT {next_id}: this server's next id is {nxt} (nothing changed)")
        if self.follower is None and not self.read_only:
            return  # already a leader: same epoch
        epoch = max(self.epochs.seen, self.epochs.current) + 1
        try:
            self.epochs.start(epoch, nxt, refused=False)
        except OSError as exc:
            raise UnavailableError(f"cannot record the new epoch: {exc}") from None
        follower, self.follower = self.follower, None
        if follower is not None:
            # What the old leader's readers could see stays visible here.
            self.replication.hw = max(self.replication.hw, follower.leader_visible)
            follower.cancel()
        log.warning("promoted", former_leader=follower.leader if follower else None, head=self.log.head,
                    epoch=epoch, first_id=nxt, peer=peer)
        self.read_only = False
        self.fenced_by = None
        self.leader_address = None
        self.wake_streams()  # readers may see more now (the follower's cap is gone)

    def step_down(self, epoch: int, replica: str) -> None:
        """A replica has seen a newer epoch than ours: a newer leader exists, so stop taking writes
        (as a Raft leader on a higher term). Durable, like REFUSE; held MSG replies fail."""
        if epoch <= self.epochs.current:
            return
        try:
            self.epochs.see(epoch, refused=True if self.follower is None else None)
        except OSError as exc:
            log.error("step_down_not_recorded", error=str(exc))
        if self.follower is None:
            if not self.read_only or self.fenced_by is None:
                log.warning("stepped_down", epoch=self.epochs.current, newer_epoch=epoch, replica=replica,
                            head=self.log.head)
            self.read_only = True
            self.fenced_by = epoch
            self.replication.abandon("before this leader stepped down (a newer epoch exists)")

    def replica_handshake(self, cmd: protocol.Replicate, peer: str) -> tuple[bytes, bool]:
        """A REPLICATE with epochs: the OK line, and whether records follow it (else close after it).

        Raises `FencedError` (after stepping down) when the replica has seen
        a newer epoch than ours.
        """
        assert cmd.seen is not None
        if max(cmd.seen, cmd.epoch or 0) > self.epochs.current:
            self.step_down(max(cmd.seen, cmd.epoch or 0), peer)
            raise FencedError(
                f"this server's epoch {self.epochs.current} is older than epoch {cmd.seen} "
                f"the replica has seen; it no longer accepts writes"
            )
        return replicate_handshake(self.epochs, cmd, self.log.head + 1, self.replication.min_replicas)

    def reload_auth(self) -> None:
        """SIGHUP: reread the auth file. New AUTHs use it at once; connections whose token was
        removed are closed, others take their token's new role (protocol.md 3.7)."""
        path = self.config.auth_file
        if path is None:
            log.warning("auth_reload_ignored", reason="started without --auth-file")
            return
        try:
            table = load_table(path)
        except AuthFileError as exc:
            log.error("auth_reload_failed", error=str(exc), kept_tokens=len(self.gate.table or ()))
            return
        self.gate.table = table
        revoked = [c for c in list(self.connections) if not c.auth.rebind(table)]
        for conn in revoked:
            conn.drop(DeniedError("token revoked"))
        log.warning("auth_reloaded", tokens=len(table), connections_closed=len(revoked))

    def _tls_failed(self, peer: str, why: str) -> None:
        """A TLS handshake failed (bad certificate, plain TCP client, ...): one line, rate-limited."""
        allowed, held = self.tls_failure_log.allow()
        if held:
            log.warning("tls_failures_not_logged", count=held, window_s=self.tls_failure_log.window)
        if allowed:
            log.warning("tls_handshake_failed", peer=peer, error=why)

    def fail(self, exit_code: int, reason: str) -> None:
        """Stop the server with a non-zero exit status (e.g. a follower that diverged)."""
        self.exit_code = exit_code
        self.request_stop(reason)

    def fail_stop(self, what: str, exc: BaseException) -> None:
        """An unexpected fault in the commit path: append nothing more, say why, keep serving reads."""
        if self.failure is None:
            self.failure = f"{what}: {exc!r}"
            self.exit_code = EXIT_FAIL_STOPPED  # a later stop exits non-zero: it did not end well
            log.error("server_failed", reason=self.failure, hint="MSG is refused with ERR UNAVAILABLE; restart logd")

    def check_replica_start(self, start: int, prev_crc: int | None) -> None:
        """Refuse a follower whose history differs from ours (DIVERGED)."""
        prev = start - 1
        if prev > self.log.head:
            raise DivergedError(f"follower is ahead: it has id {prev}, this server's head is {self.log.head}")
        if prev_crc is None or prev < self.log.first or prev == 0:
            return
        try:
            ours = self.log.crc_of(prev)
        except CorruptRecordError as exc:
            # Our copy of the follower's last record is damaged: we cannot tell
            # whether the histories agree. The follower backs off and retries.
            log.error("replica_start_corrupt", id=prev, error=str(exc), hint="run logd check on this server")
            raise UnavailableError(
                f"cannot check prev_crc: this server's record {prev} is corrupt ({exc}); run logd check here"
            ) from None
        if ours != prev_crc:
            raise DivergedError(f"id {prev} differs: leader crc {ours:08x}, follower crc {prev_crc:08x}")

    def readonly_error(self) -> ReadOnlyError:
        where = self.leader_address or "-"
        return ReadOnlyError(f"{where} this server does not accept writes")

    # --- figures ------------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        """STATS figures, all from counters: O(1) in the number of connections and streams."""
        p50, p99 = self.queue.fsync_percentiles()
        role = "follower" if self.follower is not None else "readonly" if self.read_only else "leader"
        figures: dict[str, object] = {
            "version": __version__,
            "role": role,
            "epoch": self.epochs.current,
            "epoch_seen": self.epochs.seen,
        }
        if self.fenced_by is not None:
            figures["fenced_by_epoch"] = self.fenced_by
        figures.update(self.log.stats())
        figures.update(
            {
                "state": "failed" if self.failure is not None else "ok",
                "connections": len(self.connections),
                "max_connections": self.config.max_connections,
                "refused_connections": self._listener.refused if self._listener is not None else 0,
                "tails": len(self.streams),
                "waiting_tails": self.readers.count + self.replicas.count,
                "replicas": len(self.replica_streams),
                "appended_messages": self.queue.appended_messages,
                "appended_bytes": self.queue.appended_bytes,
                "pending_bytes": self.queue.pending_bytes,
                "input_bytes": self.budgets.input_used + self.queue.pending_bytes,
                "output_bytes": self.budgets.output_used,
                "fsyncs": self.queue.fsyncs,
                "fsync_p50_us": p50,
                "fsync_p99_us": p99,
                "uptime_s": int(time.monotonic() - self.started),
                "retention_passes": self.retention_passes,
            }
        )
        if self.failure is not None:
            figures["failure"] = self.failure
        figures["head"] = self.visible_head()
        figures["log_head"] = self.log.head
        if self.follower is not None:
            figures.update(self.follower.stats())
        figures.update(self.replication.stats())
        figures.update(self.cursors.stats(figures["head"]))  # type: ignore[arg-type]
        return figures

    # --- housekeeping ---------------------------------------------------------------------

    async def _sweeper(self) -> None:
        """Drop stalled streams and idle connections; recount output while streams wait for the budget."""
        stall = self.config.tail_stall_timeout
        idle = self.config.idle_timeout or 0.0
        period = max(0.05, min(1.0, stall / 4, idle / 4 if idle else 1.0))
        while True:
            await asyncio.sleep(0.05 if self.budgets.throttled else period)
            now = time.monotonic()
            if self.budgets.throttled or self.budgets.output_over():
                self.budgets.recount_output(self.connections)
                if self.budgets.throttled and not self.budgets.output_over():
                    self._room()  # the edge may have passed while _room ran: do not leave them waiting
            for conn in list(self.stalled):
                if conn.transport is None:
                    continue
                unsent = conn.transport.get_write_buffer_size()
                if unsent < conn.stall_mark:  # its peer reads, however slowly: not stalled
                    conn.stall_mark, conn.stalled_since = unsent, now
                elif conn.stream is not None and now - conn.stalled_since > stall:
                    log.warning("stream_stalled", peer=conn.peer, seconds=round(now - conn.stalled_since, 1))
                    conn.drop(BusyError(f"stream output not read for {stall:g} s"))
                elif conn.session.closed and now - conn.stalled_since > stall:
                    conn.transport.abort()  # closed, and its peer has read nothing since: free the buffer
            if idle:
                for conn in list(self.connections):
                    if conn.active:
                        conn.active, conn.last_active = False, now
                    elif conn.session.idle and not conn.session.closing and now - conn.last_active > idle:
                        conn.close(protocol.error_reply(IdleTimeoutError(f"no command for {idle:g} s")))

    async def _watermark_saver(self) -> None:
        saved = -1
        while True:
            hw = self.replication.hw
            if hw != saved:
                self.save_watermark()
                saved = hw
            await asyncio.sleep(WATERMARK_SAVE_S)

    def save_watermark(self) -> None:
        """Keep the high watermark for a restart (--min-replicas); a failure only costs visibility.

        While following, the file is the follower's acknowledged floor (it saves it itself):
        the leader-side value, frozen since start, must not write over it.
        """
        if self.follower is not None:
            return
        try:
            watermark.save(self.config.data_dir, self.replication.hw)
        except OSError as exc:
            log.warning("watermark_not_saved", error=str(exc))

    async def _retention_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            keep = self.cursors.keep_from() if self.config.retention_keep_cursors else None
            deleted = self.log.apply_retention(keep_from=keep, cap_bytes=self.config.retention_cap_bytes)
            self.retention_passes += 1
            if deleted:
                log.info("retention_deleted", segments=deleted, first=self.log.first)
            if self.log.forced:
                log.warning("retention_dropped_for_cursors", segments=self.log.forced, first=self.log.first,
                            needed_from=keep, cap_bytes=self.config.retention_cap_bytes)


async def serve(
    config: Config,
    ready: Callable[[str, int], None] | None = None,
    reload: Callable[[], Config] | None = None,
    metrics_ready: Callable[[str, int], None] | None = None,
) -> int:
    """Run a server until it is asked to stop (signal or SHUTDOWN); return the exit status.

    ``ready`` and ``metrics_ready`` are told where the server and its metrics
    endpoint listen. ``reload`` (SIGHUP) returns the configuration read
    afresh; its reloadable parts (the log level) are applied.
    """
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
        # Whatever state the server is in (a stuck task, a hung disk), a
        # signal stops the process: a thread that needs no event loop.
        grace = 2 * config.shutdown_timeout + STOP_GRACE_S  # shutdown() allows up to twice the timeout
        watchdog = threading.Timer(grace, _force_exit, args=(sig.name, grace))
        watchdog.daemon = True
        watchdog.start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    def on_hangup() -> None:
        # SIGHUP: the config file's reloadable settings, and the auth file.
        if reload is not None:
            server.reload(reload)
        server.reload_auth()

    try:
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
    except (NotImplementedError, RuntimeError):
        pass
    if ready is not None:
        ready(host, port)
    if metrics_ready is not None and server.metrics is not None:
        metrics_ready(*server.metrics.address)
    systemd.notify(f"READY=1\nSTATUS=listening on {host}:{port}\nMAINPID={os.getpid()}")
    await server.wait_stopped()
    return server.exit_code


def _force_exit(signal_name: str, after_s: float) -> None:
    log.error("forced_exit", signal=signal_name, reason="graceful stop did not finish", after_s=after_s)
    os._exit(EXIT_FAIL_STOPPED)


def run(
    config: Config,
    ready: Callable[[str, int], None] | None = None,
    reload: Callable[[], Config] | None = None,
    metrics_ready: Callable[[str, int], None] | None = None,
) -> int:
    """Blocking entry point for the CLI: uvloop, then `serve`; returns the exit status."""
    import uvloop

    return uvloop.run(serve(config, ready, reload, metrics_ready))
