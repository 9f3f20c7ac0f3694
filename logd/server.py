"""asyncio wiring: the listener, connections -> queue -> replies, commit fan-out, stop.

`LogServer` holds the state (config, log, append queue, connections, parked
streams, replicas). Its parts: `roles.py` (leader, read-only, follower; epochs),
`housekeeping.py` (sweeps, retention, reloads); `runner.py` runs it. The
per-connection protocol is in `connection.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

import structlog

from . import __version__, protocol, systemd, tls
from .access import AuthGate, LogLimiter
from .auth import load_table, loose_permissions
from .budgets import Budgets
from .config import Config
from .connection import Connection
from .cursor_commands import ServerCursors
from .errors import (
    BusyError,
    DeniedError,
    HandshakeAnswer,
    LogdError,
    ServerError,
    UnavailableError,
)
from .fdlimit import fit_connections
from .halfclose import HalfClosed
from .housekeeping import Housekeeping
from .listener import Listener, bind_all, resolve
from .queue import AppendQueue
from .replication import Follower, ReplicaSet
from .replication.durability import MinReplicas
from .roles import Roles
from .storage import Log, watermark
from .storage.epochs import Epochs
from .streams import STREAM_CHUNK, ParkedStreams, Stream

if TYPE_CHECKING:
    from .metrics import MetricsEndpoint

log = structlog.get_logger("logd.server")

EXIT_FAIL_STOPPED = 5  # the server stopped after a fail-stop (see LogServer.fail_stop)


class LogServer(Roles, Housekeeping):
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
            self.log,
            on_failure=self.fail_stop,
            backlog_bytes=config.server_input_bytes // 2,
            on_backlog=self._backlog,
            conn_input=config.conn_input_bytes,
        )
        # Leader epochs and a REFUSE in force (protocol.md 2 and 3.4); the file
        # is read after the log is opened, so the data dir's lock guards it.
        self.epochs = Epochs.load(self.log.directory)
        self.retention_passes = 0  # for STATS: tests wait for a pass instead of sleeping
        self.sweeps = 0  # for STATS, as retention_passes
        self.fenced_by: int | None = None  # the newer epoch a replica told us of, after we stepped down
        self.cursors = ServerCursors(self)
        # A restarted leader shows what it last saved as visible, no more
        # than it holds (a torn tail may have gone), until replicas confirm more.
        saved_hw = min(watermark.load(config.data_dir), self.log.head)
        # --min-replicas as configured, or as a former leader or a promotion left it (CLUSTER).
        self.min_replicas = MinReplicas(self.log.directory, config.min_replicas)
        self.replication = ReplicaSet(self.min_replicas.value, config.replica_timeout, self.log.head, saved_hw)
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
        self.half_closed = HalfClosed()  # their peer sent EOF: probed until it is seen to have gone
        self.budgets = Budgets(config, self.queue, self._room)
        self.stream_chunk = max(64 << 10, min(STREAM_CHUNK, config.conn_output_bytes // 2))
        self._in_room = False
        self._read_only = False
        self._failure: str | None = None  # fail-stop: why this server no longer appends
        self._open_lanes()
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
                                  on_handshake_failure=self._tls_failed,
                                  handshake_timeout=self.config.tls_handshake_timeout,
                                  max_handshakes=self.config.max_tls_handshakes, has_room=self._room_for)
        self._listener.start()
        host, port = self._listener.address
        if self.config.metrics_port is not None:
            from .metrics import MetricsEndpoint  # prometheus_client is loaded only when asked for

            self.metrics = MetricsEndpoint(self, self.config.metrics_host, self.config.metrics_port,
                                           self.config.metrics_max_connections, self.config.metrics_timeout)
        self._tasks.append(loop.create_task(self._sweeper()))
        if self.config.retention_bytes is not None or self.config.retention_ms is not None:
            self._tasks.append(loop.create_task(self._retention_loop()))
        self._tasks.append(loop.create_task(self._watermark_saver()))  # saves only under --min-replicas
        if self.config.replica_address:
            self.read_only = True
            self.leader_address = self.config.replica_address
            self.follower = Follower(self, self.config.replica_address, listening=(host, port))
            self.follower.start()
        elif self.epochs.refused:
            # REFUSE (or a step-down) outlives a restart: only ACCEPT undoes it.
            self.read_only = True
            log.warning("starting_read_only", epoch=self.epochs.current, epoch_seen=self.epochs.seen)
        if self.epochs.unverified:  # it may have lost its `refused` line: fail closed
            log.error("epochs_unverified", path=self.epochs.path,
                      reason=self.epochs.unverified,
                      hint="read-only until ACCEPT (logd promote): check first that no other server leads")
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
        if self.replication.min_replicas:
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

    def _room_for(self, handshaking: int) -> bool:
        """Whether a TLS connection may start its handshake: it counts against --max-connections
        from accept on, with the ``handshaking`` ones before it (listener.py)."""
        return not self.stopping and len(self.connections) + handshaking < self.config.max_connections

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
        self.half_closed.discard(conn)
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

    @property
    def read_only(self) -> bool:
        return self._read_only

    @read_only.setter
    def read_only(self, value: bool) -> None:
        self._read_only = value
        self._open_lanes()

    @property
    def failure(self) -> str | None:
        """Why this server no longer appends (fail-stop), or None."""
        return self._failure

    @failure.setter
    def failure(self, value: str | None) -> None:
        self._failure = value
        self._open_lanes()

    def _open_lanes(self) -> None:
        """The connections' lanes (lane.py) take MSGs only while `msg_refusal` is None and no
        reply waits for replicas: otherwise every MSG goes the session's way."""
        self.queue.hub.accepting = not self._read_only and self._failure is None and not self.replication.min_replicas

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
        if type(cmd) is protocol.Replicate and self.follower is not None and peer == self.follower.link_address:
            # Our own follower's link: streaming to ourselves would report "streaming" and copy nothing.
            raise DeniedError("this server would follow itself: --replica-of names its own address")
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
            self.replace_replica(stream.name)
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

    # --- failures ----------------------------------------------------------------------

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

    def _tls_failed(self, peer: str, why: str) -> None:
        """A TLS handshake failed (bad certificate, plain TCP client, ...): one line, rate-limited."""
        allowed, held = self.tls_failure_log.allow()
        if held:
            log.warning("tls_failures_not_logged", count=held, window_s=self.tls_failure_log.window)
        if allowed:
            log.warning("tls_handshake_failed", peer=peer, error=why)

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
                "tls_handshakes": self._listener.handshaking if self._listener is not None else 0,
                "refused_handshakes": self._listener.handshakes_refused if self._listener is not None else 0,
                "tails": len(self.streams),
                "waiting_tails": self.readers.count + self.replicas.count,
                "half_closed": len(self.half_closed),
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
                "sweeps": self.sweeps,
            }
        )
        if self.failure is not None:
            figures["failure"] = self.failure
        figures["head"] = self.visible_head()
        figures["log_head"] = self.log.head
        if self.follower is not None:
            figures.update(self.follower.stats())
        figures.update(self.min_replicas.stats())
        figures.update(self.replication.stats())
        figures.update(self.cursors.stats(figures["head"]))  # type: ignore[arg-type]
        return figures
