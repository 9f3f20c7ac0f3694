"""Connections whose peer half-closed: find the ones whose peer has gone entirely (protocol.md 3.1).

A client's EOF keeps its connection open while a READ or REPLICATE stream
runs, so that a reader that half-closed (``nc`` at the end of its input)
still gets its tail. A client process that exits sends the same FIN, and its
connection then stays open until something is written to it: on a quiet
log, never. The two cannot be told apart without sending: TCP keepalive does
not help, since the kernel of a peer that closed answers keepalive probes
with an ACK until its FIN_WAIT2 timer ends (``tcp_fin_timeout``, 60 s on
Linux; measured: a reset after 61.5 s). Data is answered with a reset at once.

So a stream of a half-closed connection that has sent nothing for
``PROBE_AFTER_S`` gets a probe (`Stream.probe`: the next byte of the record it
is in, else an empty line, else for a replica its ``+HEAD`` again), and each
sweep looks for the error the reset leaves on the socket: a connection whose
peer is gone is released within ``PROBE_AFTER_S`` and two sweeps, whatever
its stream waits for (new records, room in the output budget).
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from .connection import Connection
    from .streams import Stream

log = structlog.get_logger("logd.server")

PROBE_AFTER_S = 5.0  # seconds a half-closed connection's stream may send nothing before a probe


def socket_failed(transport: asyncio.BaseTransport) -> bool:
    """True if the transport's socket holds an error (a reset, a timeout): its peer is gone.

    The event loop stops polling a socket for reading after EOF, so a reset
    that arrives while nothing is being written is noticed only here.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0  # type: ignore[no-any-return]
    except OSError:
        return True


class HalfClosed:
    """The connections whose peer sent EOF and that stay open, with where each stream last was."""

    def __init__(self, probe_after: float = PROBE_AFTER_S) -> None:
        self.probe_after = probe_after
        # connection -> (its stream, that stream's next id and read position, since when unchanged)
        self._marks: dict[Connection, tuple[Stream | None, int, int, float]] = {}

    def __len__(self) -> int:
        return len(self._marks)

    def add(self, conn: Connection, now: float) -> None:
        """``conn``'s peer half-closed."""
        self._marks[conn] = (None, 0, 0, now)

    def discard(self, conn: Connection) -> None:
        """``conn`` is gone (connection_lost)."""
        self._marks.pop(conn, None)

    def sweep(self, now: float) -> None:
        """Release connections whose peer has gone; probe streams that have sent nothing for a while."""
        marks = self._marks
        for conn, (stream0, next0, at0, since) in list(marks.items()):
            tr = conn.transport
            if tr is None or conn.lost:
                del marks[conn]
                continue
            if socket_failed(tr):
                log.info("peer_gone", peer=conn.peer, after="half-close")
                del marks[conn]
                tr.abort()  # connection_lost follows: it no longer counts anywhere
                continue
            stream = conn.stream
            if stream is None:
                continue  # replies only: the session closes the connection once they are out
            if (stream, stream.next, stream.piece_at) != (stream0, next0, at0):
                marks[conn] = (stream, stream.next, stream.piece_at, now)
            elif now - since >= self.probe_after and conn.probe_peer():
                marks[conn] = (stream, stream.next, stream.piece_at, now)
