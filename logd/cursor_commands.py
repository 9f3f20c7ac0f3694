"""Named cursors on the server: COMMIT, CURSOR, CURSORS and DROP, their figures, and their replication.

`ServerCursors.execute` runs one command at its turn (the session calls it
once every earlier reply is known) and returns the reply bytes, or, for a
COMMIT or DROP under ``fsync=always``, None: the cursor line is written at
once and a batch with no messages goes through the append queue, so the
reply is resolved only after the group commit's sync, which also syncs the
cursor file (`Log.attach`), has covered it. Whether the connection's token
may move or drop that cursor was decided before (`access.ConnectionAuth`);
here a COMMIT that would make more than ``--max-cursors`` cursors is refused.

Replicas learn of commits through ``+CURSOR <name> <id>`` markers on their
REPLICATE stream (protocol.md 3.4), sent by a `CursorFeed` per stream once
the records up to that id have been sent, and of drops through ``+DROP
<name>``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import structlog

from . import protocol
from .errors import LogdError, NotFoundError, ServerError, StaleCursorError, TooLargeError, UnavailableError
from .protocol.replica import cursor_marker, drop_marker
from .storage.cursors import CursorStore

if TYPE_CHECKING:
    from .server import LogServer

log = structlog.get_logger("logd.cursors")


class Flushable(Protocol):
    """Who sends the replies once they are ready (a connection)."""

    def flush(self) -> None: ...


class LateReply(Protocol):
    """A reply known later (the session's `AppendReply`)."""

    def resolve(self, reply: bytes) -> None: ...


class _AfterSync:
    """The append queue's submitter for a COMMIT: answers once the round's sync covered the cursor line."""

    __slots__ = ("_reply", "_conn", "_cursors")

    def __init__(self, cursors: ServerCursors, reply: LateReply, conn: Flushable) -> None:
        self._cursors = cursors
        self._reply = reply
        self._conn = conn

    def batch_done(self, token: object, last_id: int) -> bool:
        self._reply.resolve(protocol.ok())
        self._cursors.moved()
        return True

    def batch_failed(self, token: object, nbytes: int, error: LogdError) -> None:
        err = error if isinstance(error, ServerError) else UnavailableError(str(error))
        self._reply.resolve(protocol.error_reply(err))

    def flush(self) -> None:
        self._conn.flush()


class ServerCursors:
    """The server's named cursors: the store, the commands, the figures, the replica feeds."""

    def __init__(self, server: LogServer) -> None:
        self.server = server
        self.store = CursorStore(server.log.directory)
        server.log.attach(self.store)
        if self.store.bad_lines_skipped:
            log.warning("cursor_lines_skipped", lines=self.store.bad_lines_skipped, path=self.store.path)

    def execute(
        self,
        cmd: protocol.Commit | protocol.Cursor | protocol.Cursors | protocol.Drop,
        reply: LateReply,
        conn: Flushable,
    ) -> bytes | None:
        """Run a cursor command; return its reply, or None when ``reply`` is resolved after the sync.

        Raises a `ServerError` for a refused COMMIT or DROP.
        """
        store = self.store
        if isinstance(cmd, protocol.Cursor):
            return protocol.ok(store.get(cmd.name))
        if isinstance(cmd, protocol.Cursors):
            return protocol.stats_reply(dict(store.items()))
        server = self.server
        if server.read_only:
            raise server.readonly_error()
        if server.failure is not None:
            raise UnavailableError(f"server failed and accepts no writes: {server.failure}")
        if isinstance(cmd, protocol.Drop):
            try:
                if not store.drop(cmd.name):
                    raise NotFoundError(f"no cursor named {cmd.name}")
            except OSError as exc:
                raise UnavailableError(f"cannot write the cursor: {exc.strerror or exc}") from None
            return self._written(reply, conn)
        current = store.get(cmd.name)
        if cmd.id < current:
            raise StaleCursorError(f"cursor {cmd.name} is at {current}: a cursor only moves forward, not to {cmd.id}")
        head = server.visible_head()
        if cmd.id > head:
            raise NotFoundError(f"id {cmd.id} is past the head {head}")
        limit = server.config.max_cursors
        if cmd.name not in store and len(store) >= limit:
            # TOO_LARGE, not BUSY: clients retry BUSY, and waiting does not make room.
            raise TooLargeError(f"cursor {cmd.name} would be cursor {len(store) + 1}, over --max-cursors {limit}: "
                                "drop one first (DROP <name>, logd cursors --drop NAME)")
        if cmd.id > current or cmd.name not in store:  # at 0 too: a consumer that has read nothing yet
            try:
                store.set(cmd.name, cmd.id)
            except OSError as exc:
                raise UnavailableError(f"cannot write the cursor: {exc.strerror or exc}") from None
        return self._written(reply, conn)

    def _written(self, reply: LateReply, conn: Flushable) -> bytes | None:
        """A COMMIT or DROP is written: its ``OK`` now, or None when it comes after the sync covering it."""
        server = self.server
        if server.log.policy.mode == "always":
            # Even an unchanged cursor waits: an earlier COMMIT of the same id may not be synced yet.
            server.queue.submit(_AfterSync(self, reply, conn), [], 0, reply)  # a token: None is a lane's
            return None
        self.moved()
        return protocol.ok()

    def moved(self) -> None:
        """A commit is done: idle replica streams get the ``+CURSOR`` markers now."""
        self.server.send_cursor_markers()

    def replicated(self, name: str, id: int) -> None:
        """A follower got ``+CURSOR <name> <id>`` from its leader (synced with its next commit)."""
        if id > self.store.get(name) or name not in self.store:
            self.store.set(name, id)

    def replicated_drop(self, name: str) -> None:
        """A follower got ``+DROP <name>`` from its leader (synced with its next commit; none: nothing to do)."""
        self.store.drop(name)

    def feed(self) -> CursorFeed:
        return CursorFeed(self.store)

    def keep_from(self) -> int | None:
        """The oldest id a cursor still needs (lowest cursor + 1), for retention; None without cursors."""
        lowest = self.store.lowest()
        return None if lowest is None else lowest + 1

    def stats(self, head: int) -> dict[str, object]:
        """STATS lines: ``cursors`` and, per cursor, ``cursor_<name>_id`` and ``cursor_<name>_lag``."""
        figures: dict[str, object] = {"cursors": len(self.store)}
        for name, id in self.store.items().items():
            figures[f"cursor_{name}_id"] = id
            figures[f"cursor_{name}_lag"] = max(0, head - id)
        return figures

    def close(self) -> None:
        self.store.close()


class CursorFeed:
    """What one REPLICATE stream has been told of the cursors.

    `markers(upto)` returns the ``+DROP`` lines for the drops it has not sent
    (at the start of the stream: every drop the store keeps, since the
    follower may have missed them), then the ``+CURSOR`` lines for every
    cursor that moved since it was last sent and whose id is at most ``upto``
    (the last id the stream has sent), so a follower never holds a cursor past
    its records. A cursor dropped and made again is sent as its drop, then
    its new value: the follower's old value was not this cursor's. Cheap when
    nothing moved: one comparison.
    """

    __slots__ = ("_store", "_sent", "_version", "_held", "_drops")

    def __init__(self, store: CursorStore) -> None:
        self._store = store
        self._sent: dict[str, int] = {}
        self._version = -1
        self._held = 0  # lowest id of a cursor not sent because the stream was not there yet (0: none)
        self._drops = 0  # the number of the last drop sent

    def markers(self, upto: int) -> bytes:
        if self._store.version == self._version and not (self._held and upto >= self._held):
            return b""
        out: list[bytes] = []
        if self._store.drops != self._drops:
            for name in self._store.dropped_since(self._drops):
                out.append(drop_marker(name))
                self._sent.pop(name, None)
            self._drops = self._store.drops
        held = 0
        for name, id in self._store.items().items():
            if self._sent.get(name) == id:
                continue
            if id > upto:
                held = id if not held else min(held, id)
                continue
            out.append(cursor_marker(name, id))
            self._sent[name] = id
        self._version = self._store.version
        self._held = held
        return b"".join(out)
