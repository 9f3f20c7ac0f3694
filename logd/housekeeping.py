"""What the server does by itself: the sweeps (stalled tails, idle connections, half-closed
peers, the output recount), the high watermark's file, retention, and SIGHUP's reloads.

A part of `LogServer` (server.py), kept apart so the server module stays about wiring.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import structlog

from . import protocol
from .auth import AuthFileError, load_table
from .config import Config
from .errors import BusyError, IdleTimeoutError
from .logging import configure_logging
from .storage import watermark

if TYPE_CHECKING:
    from .access import AuthGate
    from .budgets import Budgets
    from .connection import Connection
    from .cursor_commands import ServerCursors
    from .halfclose import HalfClosed
    from .replication import Follower, ReplicaSet
    from .storage import Log

log = structlog.get_logger("logd.server")

WATERMARK_SAVE_S = 1.0  # how often a changed high watermark is saved (--min-replicas)


class Housekeeping:
    """Periodic tasks and reloads (mixed into `LogServer`)."""

    config: Config
    log: Log
    budgets: Budgets
    connections: set[Connection]
    stalled: set[Connection]
    half_closed: HalfClosed
    replication: ReplicaSet
    follower: Follower | None
    gate: AuthGate
    cursors: ServerCursors
    retention_passes: int
    sweeps: int

    def _room(self) -> None:
        raise NotImplementedError  # the server's (budgets)

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

    def reload_auth(self) -> None:
        """SIGHUP: reread the auth file. New AUTHs use it at once; connections whose token was
        removed are closed, others take their token's new role and grant before their next
        command, their MSG lane included (`Connection.rebind`; protocol.md 3.7)."""
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
        closed = [c for c in list(self.connections) if not c.rebind(table)]
        log.warning("auth_reloaded", tokens=len(table), connections_closed=len(closed))

    async def _sweeper(self) -> None:
        """Drop stalled streams and idle connections, release half-closed ones whose peer has gone
        (halfclose.py); recount output while streams wait for the budget."""
        stall = self.config.tail_stall_timeout
        idle = self.config.idle_timeout or 0.0
        period = max(0.05, min(1.0, stall / 4, idle / 4 if idle else 1.0))
        while True:
            await asyncio.sleep(0.05 if self.budgets.throttled else period)
            self.sweeps += 1
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
                    # Its peer gets a stall timeout of its own to read the ERR BUSY behind what was
                    # queued: measured from the stall, the abort below came at the next sweep.
                    conn.stalled_since = now
                elif conn.session.closed and now - conn.stalled_since > stall:
                    conn.transport.abort()  # closed, and its peer has read nothing since: free the buffer
            self.half_closed.sweep(now)
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
            if hw != saved and self.replication.min_replicas:  # which a promotion may turn on
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
