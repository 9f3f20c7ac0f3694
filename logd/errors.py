"""The exception tree shared by server, client and storage.

Every error the server can report on the wire carries its protocol code, so
the server turns any `ServerError` into ``ERR <CODE> <message>`` in one place
and the client turns an ``ERR`` line back into the same class
(`error_from_reply`). Transport failures (connection, timeout) are kept apart
from the server's own error replies, as in redis-py.
"""

from __future__ import annotations


class LogdError(Exception):
    """Root of every logd exception."""


# --- transport-side failures (never sent on the wire) -----------------------


class ConnectionError(LogdError):  # noqa: A001 - deliberate, like redis-py
    """The connection to a server failed or was lost."""


class TimeoutError(LogdError):  # noqa: A001
    """A call did not complete within its timeout."""


class CorruptRecordError(LogdError):
    """A record failed its CRC or framing check.

    ``where`` names the segment file (or "wire"), ``offset`` the byte offset of
    the record in it, ``id`` the id it should have had.
    """

    def __init__(self, message: str, *, where: str = "", offset: int = -1, id: int = -1) -> None:
        super().__init__(message)
        self.where = where
        self.offset = offset
        self.id = id


class StorageError(LogdError):
    """Base for failures of the on-disk log that are not bad client input."""


class DamagedLogError(StorageError):
    """The data directory holds damage that recovery must not cut away (protocol.md section 2).

    A bad record followed by valid ones is corruption, not a torn tail, and a
    log that ends before the head it was closed at lost acknowledged records:
    either way logd refuses to start rather than drop them or hand their ids
    out again. ``path`` names the segment, ``offset`` and ``id`` the first bad
    record, ``following`` how many valid records come after it.
    """

    def __init__(self, message: str, *, path: str = "", offset: int = -1, id: int = -1, following: int = 0) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset
        self.id = id
        self.following = following


class LockedError(StorageError):
    """The data directory is held by another logd process."""

    def __init__(self, message: str, *, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


# --- errors the server reports as ERR <CODE> <message> ----------------------


class ServerError(LogdError):
    """An error reply from the server (or one the server is about to send)."""

    code = "ERR"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code} {self.message}"


class ProtocolError(ServerError):
    """The byte stream broke the wire protocol (a peer's fault)."""

    code = "BAD_FORMAT"

    def __init__(self, message: str = "", *, fatal: bool = False) -> None:
        super().__init__(message)
        # fatal: the stream can no longer be framed; reply, then close.
        self.fatal = fatal


class UnknownCommandError(ProtocolError):
    """The verb is not one the server knows."""

    code = "UNKNOWN_COMMAND"


class TooLargeError(ProtocolError):
    """A message, command line or batch exceeded a configured limit."""

    code = "TOO_LARGE"


class NotFoundError(ServerError):
    """The requested id is older than the oldest retained id."""

    code = "NOT_FOUND"


class DeniedError(ServerError):
    """The command is not allowed on this server (e.g. SHUTDOWN without --allow-shutdown)."""

    code = "DENIED"


class UnavailableError(ServerError, StorageError):
    """Storage failed (disk full, I/O error) or too few replicas are in sync."""

    code = "UNAVAILABLE"


class BusyError(ServerError):
    """Too many connections."""

    code = "BUSY"


class ReadOnlyError(ServerError):
    """This server does not accept writes; ``leader`` is where to send them."""

    code = "READONLY"

    @property
    def leader(self) -> str:
        return self.message.split(" ", 1)[0] if self.message else ""


class DivergedError(ServerError):
    """A follower's history differs from the leader's."""

    code = "DIVERGED"


class FencedError(ServerError):
    """A REPLICATE from a replica that has seen a newer leader epoch: this leader is stale."""

    code = "FENCED"


class HandshakeAnswer(LogdError):
    """A REPLICATE answered with where the replica must cut its log: ``reply`` is sent, no stream follows."""

    def __init__(self, reply: bytes) -> None:
        super().__init__(reply.decode("ascii", "replace").strip())
        self.reply = reply


class StaleCursorError(ServerError):
    """COMMIT of an id below the cursor's: a cursor only moves forward."""

    code = "STALE"


class IdleTimeoutError(ServerError):
    """The connection was idle for longer than the server allows."""

    code = "TIMEOUT"


class AuthTimeoutError(IdleTimeoutError):
    """With authentication on, the connection did not authenticate within --auth-timeout."""


# One table from wire code to class; the client uses it to raise the same type.
ERROR_CLASSES: dict[str, type[ServerError]] = {
    cls.code: cls
    for cls in (
        ProtocolError,
        UnknownCommandError,
        TooLargeError,
        NotFoundError,
        DeniedError,
        UnavailableError,
        BusyError,
        ReadOnlyError,
        DivergedError,
        FencedError,
        IdleTimeoutError,
        StaleCursorError,
    )
}


def error_from_reply(code: str, message: str) -> ServerError:
    """Build the exception matching an ``ERR <code> <message>`` reply."""
    cls = ERROR_CLASSES.get(code)
    if cls is None:
        err = ServerError(message)
        err.code = code
        return err
    return cls(message)
