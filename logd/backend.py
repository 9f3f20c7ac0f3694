"""What one connection's commands do to the server: the session's `Backend` and the queue's `Submitter`.

`ConnectionBackend` is a part of `Connection` (connection.py), kept apart so
the asyncio adapter stays about bytes, streams and budgets. Each method is
one command's effect, mostly handed on to `LogServer`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import protocol
from .errors import DeniedError, LogdError, ServerError, UnavailableError
from .protocol.session import AppendReply
from .streams import Stream

if TYPE_CHECKING:
    from .server import LogServer


class ConnectionBackend:
    """The commands' effects, for a connection with ``server``, ``peer`` and ``stream``."""

    server: LogServer
    peer: str
    stream: Stream | None
    _stream_fresh: bool

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

    def accept(self, next_id: int | None) -> None:
        self.server.accept_writes(self.peer, next_id)

    def shutdown(self) -> ServerError | None:
        if not self.server.config.allow_shutdown:
            return DeniedError("server was not started with --allow-shutdown")
        self.server.request_stop("shutdown_command")
        return None

    def cursor_command(
        self, cmd: protocol.Commit | protocol.Cursor | protocol.Cursors, reply: AppendReply
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

    def lane_failed(self, nbytes: int, reply: bytes) -> None:
        """A batch of the connection's lane failed: answer it with ``reply`` (the connection does)."""
        raise NotImplementedError
