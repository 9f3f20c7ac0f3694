"""What one connection's commands do to the server: the session's `Backend` and the queue's `Submitter`.

Also when the connection's lane (lane.py) may take MSGs past the session: `_reopen`.

`ConnectionBackend` is a part of `Connection` (connection.py), kept apart so
the asyncio adapter stays about bytes, streams and budgets. Each method is
one command's effect, mostly handed on to `LogServer`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import protocol
from .errors import DeniedError, LogdError, ServerError, UnavailableError
from .protocol.commands import Msg
from .protocol.session import AppendReply, ServerSession
from .streams import Stream

if TYPE_CHECKING:
    from .access import ConnectionAuth
    from .budgets import Budgets
    from .server import LogServer


class ConnectionBackend:
    """The commands' effects, for a connection with ``server``, ``peer`` and ``stream``."""

    server: LogServer
    peer: str
    stream: Stream | None
    _stream_fresh: bool
    # For the acknowledgements, and the lane's switch (the connection's, and its lane's: lane.py).
    transport: asyncio.Transport | None
    session: ServerSession
    auth: ConnectionAuth
    budgets: Budgets
    lost: bool
    write_paused: bool
    read_paused: bool
    held: int
    lane_open: bool
    unsent: int
    fast_count: int
    fast_bytes: int
    lane_write: Callable[[bytes], object] | None

    def flush(self) -> None:
        """Write what the session has ready (the connection does)."""
        raise NotImplementedError

    # --- the session's Backend ---------------------------------------------------

    def refusal(self) -> ServerError | None:
        return self.server.msg_refusal()

    def submit(self, bodies: list[bytes], nbytes: int, reply: AppendReply) -> None:
        self.server.queue.submit(self, bodies, nbytes, reply)

    def head(self) -> int:
        return self.server.visible_head()

    def stats(self) -> dict[str, object]:
        return self.server.stats()

    def output_room(self, pending: int) -> bool:
        if not pending and not self.unsent:
            # Its peer reads what it is sent: one more bounded reply goes out even over the budget,
            # so a peer that pipelines STATS and never reads cannot starve everyone's STATS.
            return True
        budgets = self.budgets
        return budgets.output_used + pending <= budgets.server_output

    def start_stream(self, cmd: protocol.Read | protocol.Replicate) -> bytes | None:
        answer = self.server.check_stream_start(cmd, self.peer)
        self.stream = Stream(self.server, self, cmd)  # type: ignore[arg-type]  # self is a Connection: the Sink
        self._stream_fresh = True
        self.server.stream_started(self.stream)
        return answer

    def ack(self, id: int) -> None:
        assert self.stream is not None and self.stream.replica
        self.stream.ack(id)

    def refuse(self) -> None:
        self.server.refuse_writes(self.peer)

    def accept(self, next_id: int | None, min_replicas: int | None) -> None:
        self.server.accept_writes(self.peer, next_id, min_replicas)

    def shutdown(self) -> ServerError | None:
        if not self.server.config.allow_shutdown:
            return DeniedError("server was not started with --allow-shutdown")
        self.server.request_stop("shutdown_command")
        return None

    def cursor_command(
        self, cmd: protocol.Commit | protocol.Cursor | protocol.Cursors | protocol.Drop, reply: AppendReply
    ) -> bytes | None:
        return self.server.cursors.execute(cmd, reply, self)

    # --- the append queue's Submitter ---------------------------------------------

    def batch_done(self, token: object, last_id: int) -> bool:
        replicas = self.server.replication
        if replicas.min_replicas and last_id > replicas.hw:
            replicas.hold(self, token, last_id)  # type: ignore[arg-type]  # OK once replicas hold it
        else:
            token.acknowledge(last_id)  # type: ignore[attr-defined]
        return True

    def batch_failed(self, token: object, nbytes: int, error: LogdError) -> None:
        err = error if isinstance(error, ServerError) else UnavailableError(str(error))
        if token is None:  # the lane's: its MSGs come before every reply the session holds
            self.lane_failed(nbytes, protocol.error_reply(err))
        else:
            token.resolve(protocol.error_reply(err))  # type: ignore[attr-defined]

    def _acknowledged(self, reply: AppendReply, last_id: int) -> bool:
        """The queue's `batch_done` when no reply waits for replicas. The common reply (the one
        MSG in flight on this connection) goes out at once; True: `flush` is needed after all."""
        tr = self.transport
        if tr is None or self.lost or self.write_paused or self.stream is not None:
            reply.acknowledge(last_id)
            return True
        session = self.session
        data = session.acknowledged(reply, last_id)
        if data is None:
            return True  # other replies come first, or with it: flush sends them in order
        tr.write(data)
        unsent = tr.get_write_buffer_size()
        if unsent != self.unsent:
            self.budgets.output_changed(self, unsent)  # type: ignore[arg-type]  # self is a Connection
        if self._holds_back(session):
            return True
        self._reopen()
        return False

    def _holds_back(self, session: ServerSession) -> bool:
        """Reading paused, input held, closing, or over a budget: `_budget` must have a look."""
        budgets = self.budgets
        return bool(
            self.read_paused
            or self.held
            or session.waiting_bytes
            or session.partial_bytes
            or session.closing
            or budgets.over
            or session.inflight_bytes + self.fast_bytes > budgets.conn_input
        )

    def _reopen(self) -> None:
        """Open the lane if nothing is going on that it would pass; shut it otherwise."""
        self.lane_open = (
            not self.read_paused
            and not self.write_paused
            and self.stream is None
            and not self.held
            and Msg in self.auth.allowed
            and self.session.quiet
        )

    def lane_failed(self, nbytes: int, reply: bytes) -> None:
        """A batch of the lane failed: its ERR goes out now, in its turn (the queue flushes after)."""
        self.fast_count -= 1
        self.fast_bytes -= nbytes
        if self.lane_write is not None:
            self.lane_write(reply)
