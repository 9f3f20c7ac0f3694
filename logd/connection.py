"""One client connection: the asyncio adapter around a sans-IO `ServerSession`.

Whole MSGs, while nothing else goes on, take the connection's C lane
(lane.py: its base class) straight to the append queue. Other bytes received
(``slow_received``) go to the session; the replies it has ready leave in one
``transport.write``. The session decides what acts when (the order
contract); this class carries out what it asks through the server (the
session's `Backend`), runs the connection's READ/REPLICATE `Stream`, and keeps
the connection inside its memory budgets (protocol.md 3.6) by pausing and
resuming reading.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from . import protocol
from .access import ConnectionAuth
from .backend import ConnectionBackend
from .errors import AuthTimeoutError, DeniedError, ServerError
from .protocol.session import ServerSession
from .streams import Stream

if TYPE_CHECKING:
    from .auth import AuthTable
    from .lane import LanePy as Lane  # the C Lane's twin: the same attributes
    from .server import LogServer
else:
    from .lane import Lane


class Connection(Lane, ConnectionBackend, asyncio.Protocol):
    """One client connection: lane, session, stream, budgets (what its commands do: `ConnectionBackend`)."""

    def __init__(self, server: LogServer) -> None:
        self.server = server
        self.auth = ConnectionAuth(server.gate)  # role, token name, failed AUTHs (access.py)
        parser = server.new_parser()
        self.session = ServerSession(self, parser, server.config.conn_output_bytes, self.auth)
        self.lane_setup(server.queue.hub, *parser.limits)  # shut until connection_made opens it
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.stream: Stream | None = None
        self._stream_fresh = False  # started; its OK not yet written, so not yet pumped
        self.write_paused = False
        self.read_paused = False
        self.stalled_since = 0.0  # when writing paused, or its peer last read while paused (0: not paused)
        self.stall_mark = 0  # the unsent bytes at stalled_since
        self.last_active = time.monotonic()  # for the idle timeout: set by the sweeper while `active`
        self.held = 0  # input bytes counted in the server's budget
        self.granted = 0  # the declared size of the MSG in progress, once the server budget took it
        self.unsent = 0  # output bytes counted in the server's budget
        self.lost = False
        self._auth_deadline: asyncio.TimerHandle | None = None  # --auth-timeout, while not authenticated
        self.half_closed = False  # the peer sent EOF, and no CLOSE before it
        self.budgets = server.budgets
        self.replicas_changed()

    def replicas_changed(self) -> None:
        """Set at start, and when a promotion changes --min-replicas: with none, no reply ever
        waits for replicas, and the queue's `batch_done` is the short way."""
        if self.server.replication.min_replicas:
            vars(self).pop("batch_done", None)
        else:
            self.batch_done = self._acknowledged  # type: ignore[method-assign, assignment]

    # --- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transport class is not an asyncio.Transport subclass, but quacks like one.
        tr: asyncio.Transport = transport  # type: ignore[assignment]
        self.transport = tr
        peer = tr.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.auth.peer = self.peer
        high = self.server.config.conn_output_bytes
        tr.set_write_buffer_limits(high=high, low=high // 4)
        refusal = self.server.admit(self)
        if refusal is not None:
            tr.write(protocol.error_reply(refusal))
            tr.close()
            self.session.closing = self.session.closed = True
            return
        self.lane_write, self.lane_buffer_size = tr.write, tr.get_write_buffer_size
        if not self.auth.authenticated:
            loop = asyncio.get_running_loop()
            self._auth_deadline = loop.call_later(self.server.config.auth_timeout, self._auth_expired)
        self._reopen()

    def _auth_expired(self) -> None:
        """--auth-timeout passed: a connection still not authenticated gets ERR TIMEOUT and is closed.
        Its peer owes us nothing more, so if it does not read, the connection is reset at once."""
        self._auth_deadline = None
        if self.lost or self.auth.authenticated or self.session.closed:
            return
        seconds = self.server.config.auth_timeout
        self.server.gate.log_timeout(self.peer, seconds)
        self.close(protocol.error_reply(AuthTimeoutError(f"no successful AUTH within {seconds:g} s")))
        tr = self.transport
        if tr is not None and not self.lost and tr.get_write_buffer_size():
            tr.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._auth_deadline is not None:
            self._auth_deadline.cancel()
            self._auth_deadline = None
        self.lane_open, self.lane_write, self.lane_buffer_size = False, None, None
        if self.stream is not None:
            self.stream.detach()
            self.stream = None
        self.server.connection_gone(self)

    def eof_received(self) -> bool | None:
        if self.stream is not None and self.stream.replica:
            # A follower sends its ACKs on this connection while it follows: its EOF means it is
            # gone, and it must stop counting (replicas, --min-replicas) now, not at the next write.
            self.close()
            return False
        # A mere EOF (no CLOSE before it): a running tail goes on (protocol.md 3.1), and the
        # server watches for a peer that has gone entirely (halfclose.py).
        self.half_closed = not self.session.closing
        self.session.receive_eof()
        self.flush()
        if self.half_closed and not self.lost:
            self.server.half_closed.add(self, time.monotonic())
        return True  # keep our side open: a tail goes on, replies still go out

    # data_received is the lane's (lane.py): what it does not take comes here.

    def slow_received(self, data: bytes) -> None:
        self.lane_open = False
        session = self.session
        if not session.receive(data) and not self.read_paused:
            budgets = self.budgets
            if session.inflight_bytes + self.fast_bytes <= budgets.conn_input and not budgets.over:
                self._reopen()
                return  # MSGs wait for their commit, nothing else to do
        stream = self.stream
        if session.closing and stream is not None and stream.parked:
            stream.end(protocol.EOF)  # CLOSE: a stream waiting for new records ends now
        self.flush()

    def pause_writing(self) -> None:
        self.write_paused = True  # _budget shuts the lane
        self.stalled_since = time.monotonic()
        self.stall_mark = self.transport.get_write_buffer_size() if self.transport is not None else 0
        self.server.stalled.add(self)
        self._budget()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.stalled_since = 0.0
        self.server.stalled.discard(self)
        if self.stream is not None and not self.stream.parked and not self._stream_fresh:
            self.stream.pump()
        self.flush()

    # --- the stream's Sink ---------------------------------------------------------

    def write(self, data: bytes) -> None:
        tr = self.transport
        if tr is not None:
            tr.write(data)
            self.budgets.output_changed(self, tr.get_write_buffer_size())

    def closing(self) -> bool:
        """Streams stop waiting for new records: CLOSE, a fatal error (not the peer's EOF alone)."""
        return self.session.closing and not self.half_closed

    def abandon(self) -> None:
        """The stream cannot go on mid-record (a failed read): close without another line."""
        self.stream = None
        self.close()

    def stream_ended(self) -> None:
        self.stream = None
        self._stream_fresh = False
        self.session.stream_over()

    # --- output and budgets ----------------------------------------------------------

    def flush(self) -> None:
        """Write every reply the session has ready; start a new stream; close when it says so."""
        session = self.session
        tr = self.transport
        if tr is None or self.lost:
            return
        wrote = False
        while True:
            data = session.data_to_send(not self.write_paused)
            if data:
                tr.write(data)  # may call pause_writing: then nothing more acts until resume_writing
                wrote = True
            if session.closed:
                self.close()
                return
            stream = self.stream
            if stream is not None and self._stream_fresh:
                self._stream_fresh = False
                wrote = True
                stream.begin()
                stream.pump()
                if self.stream is stream:
                    break
                continue  # the stream ended at once: what waited behind it acts now
            if not data or self.write_paused or not session.backlog:
                break
            if data:  # what waits acts next: it sees the output this wrote (STATS, CURSORS)
                self.budgets.output_changed(self, tr.get_write_buffer_size())
        if wrote or self.unsent:
            unsent = tr.get_write_buffer_size()
            if unsent != self.unsent:
                self.budgets.output_changed(self, unsent)
        # The common case (a MSG waiting for its commit, nothing held back) needs no more.
        if self._holds_back(session) or session.backlog:
            self._budget()
        else:
            self._reopen()

    def _budget(self) -> None:
        """Count what this connection holds; read from it only while it is within the budgets."""
        if self.transport is None or self.lost:
            return
        budgets = self.budgets
        pause = budgets.update(self) or self.server.stopping
        if pause != self.read_paused:
            self.read_paused = pause
            if pause:
                self.transport.pause_reading()
                budgets.paused.add(self)
            else:
                self.transport.resume_reading()
                budgets.paused.discard(self)
        self._reopen()

    def close(self, last: bytes = b"") -> None:
        """Send ``last`` (if any) and close once the buffered output is written; we count until then."""
        self.session.closing = self.session.closed = True
        self.lane_open, self.lane_write = False, None  # what it has in flight goes unanswered, as the session's
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.detach()
            if not stream.complete_piece():
                last = b""  # the record cannot be completed: a line after it would not be framed
        tr = self.transport
        if tr is not None and not tr.is_closing():
            if last:
                tr.write(last)
            tr.close()
        self._budget()

    def rebind(self, table: AuthTable) -> bool:
        """SIGHUP reread the auth file: this connection's token takes its new role before the
        next chunk it receives (protocol.md 3.7); False if that closed it (the token was revoked,
        or its running REPLICATE stream is one the new role may not run).

        The lane is shut or opened here, now: it takes MSGs past the session, so the role check
        of `ConnectionAuth` never sees them while it stays open.
        """
        auth = self.auth
        if not auth.rebind(table):
            self.drop(DeniedError("token revoked"))
            return False
        stream = self.stream
        if stream is not None and stream.replica and protocol.Replicate not in auth.allowed:
            # Its ACKs would now be refused in the middle of the stream, where an ERR cannot go.
            self.drop(DeniedError(f"role {auth.role} may not send REPLICATE"))
            return False
        if not self.lost and not self.session.closing:
            self._reopen()
        return True

    def probe_peer(self) -> bool:
        """Send a half-closed peer's stream a probe (`Stream.probe`); False if none can go now.

        Not while output waits in the buffer (that output probes) or before the stream's OK.
        """
        stream = self.stream
        if stream is None or self.lost or self.write_paused or self._stream_fresh:
            return False
        stream.probe()
        self.flush()  # the probe may have ended a READ at its limit: what waited behind it acts
        return True

    def drop(self, error: ServerError) -> None:
        """Give up on a connection that does not read (a stalled tail): a last ERR, then close."""
        self.close(protocol.error_reply(error))

    def close_for_stop(self) -> None:
        """Graceful stop: end the stream, answer what has acted, then close."""
        if self.lost:
            return
        self.session.end_for_stop()
        if self.stream is not None:
            self.stream.end(protocol.EOF)
        self.flush()
