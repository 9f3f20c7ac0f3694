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

Replies stay bounded however many cursors there are (protocol.md 3.1): a
bare CURSORS lists at most `protocol.CURSORS_MAX` (more is ``TOO_LARGE``;
``CURSORS <limit> [<after>]`` pages through them), and STATS and the
metrics name only the `LISTED_CURSORS` most lagging ones, with totals.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

import structlog

from . import protocol
from .errors import LogdError, NotFoundError, ServerError, StaleCursorError, TooLargeError, UnavailableError
from .protocol.commands import MAX_ID
from .protocol.replica import cursor_marker, drop_marker
from .storage.cursors import CursorStore

if TYPE_CHECKING:
    from .server import LogServer

log = structlog.get_logger("logd.cursors")

LISTED_CURSORS = 100  # STATS and the metrics name at most this many cursors: the most lagging


def most_lagging(cursors: Mapping[str, int], n: int) -> list[tuple[str, int]]:
    """The ``n`` cursors with the lowest ids (ties by name), sorted by name: O(len) with a small heap."""
    if len(cursors) > n:
        bound = heapq.nsmallest(n, cursors.values())[-1]  # ints: the cheap pass over all of them
        lowest = heapq.nsmallest(n, ((id, name) for name, id in cursors.items() if id <= bound))
        return sorted((name, id) for id, name in lowest)
    return sorted(cursors.items())


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
        self._lagging: list[tuple[str, int]] = []
        self._lagging_version = -1  # the store's version `_lagging` was taken at
        server.log.attach(self.store)
        if self.store.bad_lines_skipped:
            log.warning("cursor_lines_skipped", lines=self.store.bad_lines_skipped, path=self.store.path)
        if self.store.rewrite_error is not None:
            log.warning("cursor_file_not_rewritten", path=self.store.path, error=str(self.store.rewrite_error))
        # A log that ends before a cursor (cut by `logd check --repair`, or records a crash
        # took under fsync=never) will hand those ids out again: the consumer must read them.
        try:
            self.cut_back(server.log.head)
        except OSError as exc:
            log.error("cursors_not_cut_back", path=self.store.path, head=server.log.head, error=str(exc))

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
            return protocol.stats_reply(dict(self.page(cmd.limit, cmd.after)))
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

    def cut_back(self, last_id: int) -> None:
        """Cursors past ``last_id`` (the log's new end) go back to it, so their consumers read the
        records that get those ids next (protocol.md 3.1). Raises OSError if the file cannot be rewritten."""
        past = self.store.cut_back(last_id)
        if past:
            log.warning("cursors_cut_back", to=last_id, cursors=len(past),
                        some=dict(sorted(past.items())[:10]))

    def replicated_drop(self, name: str) -> None:
        """A follower got ``+DROP <name>`` from its leader (synced with its next commit; none: nothing to do)."""
        self.store.drop(name)

    def feed(self) -> CursorFeed:
        return CursorFeed(self.store)

    def keep_from(self) -> int | None:
        """The oldest id a cursor still needs (lowest cursor + 1), for retention; None without cursors."""
        lowest = self.store.lowest()
        return None if lowest is None else lowest + 1

    def page(self, limit: int, after: str | None) -> list[tuple[str, int]]:
        """CURSORS: every cursor (``limit`` 0, at most `CURSORS_MAX` of them, else TOO_LARGE), or
        at most ``limit`` whose names sort after ``after``; sorted by name."""
        cursors = self.store.view()
        if not limit:
            if len(cursors) > protocol.CURSORS_MAX:
                raise TooLargeError(f"{len(cursors)} cursors, more than {protocol.CURSORS_MAX}: list them a page "
                                    f"at a time with CURSORS <limit> [<after>]")
            return sorted(cursors.items())
        names = heapq.nsmallest(limit, cursors if after is None else (n for n in cursors if n > after))
        return [(name, cursors[name]) for name in names]

    def lagging(self) -> list[tuple[str, int]]:
        """The `LISTED_CURSORS` most lagging cursors, sorted by name; taken again only once a cursor moved."""
        store = self.store
        if store.version != self._lagging_version:
            self._lagging = most_lagging(store.view(), LISTED_CURSORS)
            self._lagging_version = store.version
        return self._lagging

    def stats(self, head: int) -> dict[str, object]:
        """STATS lines: ``cursors`` (how many), ``cursors_listed`` and ``cursors_max_lag``, then
        ``cursor_<name>_id`` and ``cursor_<name>_lag`` for each of the most lagging (all, up to
        `LISTED_CURSORS`)."""
        lagging = self.lagging()
        lowest = min((id for _name, id in lagging), default=head)
        figures: dict[str, object] = {
            "cursors": len(self.store),
            "cursors_listed": len(lagging),
            "cursors_max_lag": max(0, head - lowest),
        }
        for name, id in lagging:
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
    its new value: the follower's old value was not this cursor's. Costs what
    changed since the last call (the store's `changed_since`, `dropped_since`)
    plus the held cursors that came due, never the number of cursors: a
    COMMIT with a replica attached stays O(1). Cheap when nothing moved: one
    comparison.
    """

    __slots__ = ("_store", "_sent", "_version", "_held", "_holding", "_drops")

    def __init__(self, store: CursorStore) -> None:
        self._store = store
        self._sent: dict[str, int] = {}
        self._version = -1
        # Cursors not sent because the stream had not carried their id yet: a heap of
        # (id, name), and per name the lowest id it is held at (`_holding`), so a name gets a
        # new entry only when it must come due sooner (a cut-back cursor). An entry that
        # comes due is checked against the cursor's value then, which may have moved on.
        self._held: list[tuple[int, str]] = []
        self._holding: dict[str, int] = {}
        self._drops = 0  # the number of the last drop sent

    def markers(self, upto: int) -> bytes:
        store = self._store
        held = self._held
        if store.version == self._version and not (held and held[0][0] <= upto):
            return b""
        out: list[bytes] = []
        if store.drops != self._drops:
            for name in store.dropped_since(self._drops):
                out.append(drop_marker(name))
                self._sent.pop(name, None)
            self._drops = store.drops
        due = store.changed_since(self._version)
        self._version = store.version
        while held and held[0][0] <= upto:
            at, name = heapq.heappop(held)
            if self._holding.get(name) == at:
                del self._holding[name]
            due.append(name)
        for name in due:
            if name not in store:
                continue  # dropped since: its +DROP went above
            id = store.get(name)
            if self._sent.get(name) == id:
                continue
            if id > upto:
                if id < self._holding.get(name, MAX_ID + 1):
                    heapq.heappush(held, (id, name))
                    self._holding[name] = id
                continue
            out.append(cursor_marker(name, id))
            self._sent[name] = id
        return b"".join(out)
