"""The server's memory budgets (protocol.md 3.6): what each connection holds, and when to stop reading it.

Redis's ``client-output-buffer-limit`` and Kafka's ``queued.max.request.bytes``
are the models. Per connection: commands received and not yet answered
(``--conn-input-bytes``) and unsent output (``--conn-output-bytes``, the
transport's high-water mark). Server-wide: partial MSGs, commands waiting
their turn and bodies the append queue has not yet written
(``--server-input-bytes``), and all unsent output (``--server-output-bytes``).
Over a budget the server stops reading; nothing is dropped.

A MSG whose line has arrived *reserves* its declared body size before its
bodies are read; one that does not fit waits, unread, until earlier ones have
gone (first come, first served). A reserved MSG is always read to its end, so
partial MSGs can never hold the budget between them and wait for each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config
    from .connection import Connection
    from .queue import AppendQueue
    from .streams import Stream


class Budgets:
    """Server-wide byte counts, and the read/pause decision for each connection."""

    def __init__(self, config: Config, queue: AppendQueue, on_room: Callable[[], None]) -> None:
        self.conn_input = config.conn_input_bytes
        self.server_input = config.server_input_bytes
        self.server_output = config.server_output_bytes
        self._queue = queue
        self._on_room = on_room
        self.input_used = 0  # partial MSGs (reserved) and commands waiting their turn
        self.output_used = 0  # unsent output, as last read from each transport
        self.over = False  # over a server-wide budget (kept current by `charge`)
        self.paused: set[Connection] = set()  # not read: over some budget
        self.waiting_grant: dict[Connection, None] = {}  # MSGs in progress that did not fit, in order
        self.throttled: set[Stream] = set()  # streams waiting for the output budget

    def input_over(self) -> bool:
        return self.input_used + self._queue.pending_bytes > self.server_input

    def output_over(self) -> bool:
        return self.output_used > self.server_output

    def charge(self, input_delta: int, output_delta: int) -> None:
        """Bytes counted in the server-wide budgets changed (by a connection, or the queue's backlog)."""
        was_over = self.over
        self.input_used += input_delta
        self.output_used += output_delta
        self.over = self._queue.hub.over = self.input_over() or self.output_over() or self._queue.backlogged
        if (was_over and not self.over) or (input_delta < 0 and self.waiting_grant):
            self._on_room()

    def update(self, conn: Connection) -> bool:
        """Count what ``conn`` holds now; return whether to stop reading it."""
        session = conn.session
        waiting = session.waiting_bytes
        partial = session.partial_bytes
        declared = session.declared_bytes
        if not declared:
            conn.granted = 0
            self.waiting_grant.pop(conn, None)
        elif not conn.granted:
            others = self.input_used - conn.held + self._queue.pending_bytes
            first_in_line = not self.waiting_grant or next(iter(self.waiting_grant)) is conn
            if first_in_line and (others + declared <= self.server_input or others <= 0):
                conn.granted = declared  # this MSG may be read whole: its size is reserved
                self.waiting_grant.pop(conn, None)
            else:
                self.waiting_grant[conn] = None
        held = waiting + (max(conn.granted, partial) if conn.granted else partial)
        inflight = session.inflight_bytes + conn.fast_bytes  # the session's MSGs and its lane's
        if held != conn.held:
            delta, conn.held = held - conn.held, held
            self.charge(delta, 0)
        return (
            session.closing
            or session.backlog  # commands wait for earlier replies or for output to be read
            or (conn.write_paused and conn.stream is None)
            or waiting + inflight > self.conn_input
            or (declared > 0 and not conn.granted)
            or (waiting > 0 and self.input_over())
            or (inflight > 0 and self._queue.backlogged)
            or (conn.unsent > 0 and conn.stream is None and self.output_over())
        )

    def output_changed(self, conn: Connection, unsent: int) -> None:
        if unsent != conn.unsent:
            delta, conn.unsent = unsent - conn.unsent, unsent
            self.charge(0, delta)

    def forget(self, conn: Connection) -> None:
        """connection_lost: nothing of it counts any more."""
        self.paused.discard(conn)
        self.waiting_grant.pop(conn, None)
        held, unsent = conn.held, conn.unsent
        conn.held = conn.unsent = 0
        self.charge(-held, -unsent)

    def recount_output(self, connections: set[Connection]) -> None:
        """Re-read every counted write buffer: they drain below the low-water mark without telling us."""
        total = 0
        for conn in connections:
            if conn.unsent and conn.transport is not None:
                conn.unsent = conn.transport.get_write_buffer_size()
                total += conn.unsent
        self.charge(0, total - self.output_used)
