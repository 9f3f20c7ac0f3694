"""Who may write, and what readers may see: leader, read-only, follower; epochs, promotion,
step-down, the replicas' high watermark (protocol.md 3.3 and 3.4).

A part of `LogServer` (server.py), kept apart so the server module stays about
wiring: each method is one role change or one check a replication command makes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from . import protocol
from .errors import (
    BusyError,
    CorruptRecordError,
    DeniedError,
    DivergedError,
    FencedError,
    ReadOnlyError,
    UnavailableError,
)
from .replication.leader import replicate_handshake

if TYPE_CHECKING:
    from .connection import Connection
    from .replication import Follower, ReplicaSet
    from .replication.durability import MinReplicas
    from .storage import Log
    from .storage.epochs import Epochs
    from .streams import Stream

log = structlog.get_logger("logd.server")


class Roles:
    """The server's role and its replication checks (mixed into `LogServer`)."""

    log: Log
    epochs: Epochs
    replication: ReplicaSet
    min_replicas: MinReplicas
    connections: set[Connection]
    follower: Follower | None
    read_only: bool
    fenced_by: int | None  # the newer epoch a replica told us of, after we stepped down
    leader_address: str | None
    replica_streams: set[Stream]

    def wake_streams(self) -> None:
        raise NotImplementedError  # the server's (commit fan-out)

    def visible_head(self) -> int:
        """The highest id readers may see: the commit point, capped by the high
        watermark (with --min-replicas, or on a follower, the leader's)."""
        head = self.log.head
        if self.follower is not None:
            return min(head, self.follower.leader_visible)
        if self.replication.min_replicas:
            return min(head, self.replication.hw)
        return head

    def replica_ack(self, stream: Stream, id: int) -> None:
        """A replica holds everything up to ``id``."""
        if self.replication.ack(stream, id):
            self.replication.release()
            self.wake_streams()
            # Replicas cap their readers at our high watermark: tell the idle ones.
            for s in list(self.replica_streams):
                if s.parked:
                    s.send_position()

    def send_cursor_markers(self) -> None:
        """A cursor moved: replica streams waiting for records get its ``+CURSOR`` marker now."""
        for s in list(self.replica_streams):  # a copy: a write may drop a stream (budgets)
            if s.parked:
                s.send_cursors()

    def refuse_writes(self, peer: str = "-") -> None:
        """REFUSE: stop accepting MSG (failover: the old leader steps down); reads go on.

        Recorded in the data dir first, so a restart stays read-only until ACCEPT.
        """
        try:
            self.epochs.see(self.epochs.seen, refused=True)
        except OSError as exc:
            raise UnavailableError(f"cannot record REFUSE: {exc}") from None
        if not self.read_only:
            log.warning("writes_refused", head=self.log.head, peer=peer)
        self.read_only = True

    def accept_writes(self, peer: str = "-", next_id: int | None = None, min_replicas: int | None = None) -> None:
        """ACCEPT [next_id] [min_replicas=n]: stop following (if we were) and accept MSG from the next id.

        A server that was not writable starts a new epoch (the highest seen +
        1) at its next id, durably, before it takes any MSG. With ``next_id``
        it refuses (`DeniedError`) unless that is its next id, so an operator
        promotes exactly the replica they checked. It runs with the
        ``--min-replicas`` it kept (`MinReplicas`: its leader's, unless
        configured here), or ``min_replicas`` if given.
        """
        nxt = self.log.written + 1
        if next_id is not None and next_id != nxt:
            raise DeniedError(f"ACCEPT {next_id}: this server's next id is {nxt} (nothing changed)")
        if self.follower is None and not self.read_only:
            if min_replicas is not None and min_replicas != self.replication.min_replicas:
                raise DeniedError(f"this server is already a leader, with min_replicas {self.replication.min_replicas}"
                                  f" (nothing changed): demote it first, then ACCEPT min_replicas={min_replicas}")
            return  # already a leader: same epoch
        epoch = self.epochs.next_epoch
        if epoch is None:  # refused, not written: EPOCHS would hold a number no reader takes
            raise DeniedError(f"ACCEPT: epoch {self.epochs.seen} is the largest there is; no new epoch can "
                              "start (nothing changed)")
        n = self.min_replicas.promoted(min_replicas)  # an override is saved before anything changes
        try:
            self.epochs.start(epoch, nxt, refused=False)
        except OSError as exc:
            raise UnavailableError(f"cannot record the new epoch: {exc}") from None
        follower, self.follower = self.follower, None
        # What readers could see here stays visible (a follower's: the old leader's high watermark).
        visible = self.visible_head() if follower is None else min(self.log.head, follower.leader_visible)
        if follower is not None:
            follower.cancel()
        self._run_with_min_replicas(n, visible)
        log.warning("promoted", former_leader=follower.leader if follower else None, head=self.log.head,
                    epoch=epoch, first_id=nxt, peer=peer, min_replicas=n, min_replicas_from=self.min_replicas.source)
        self.read_only = False
        self.fenced_by = None
        self.leader_address = None
        self.wake_streams()  # readers may see more now (the follower's cap is gone)

    def _run_with_min_replicas(self, n: int, visible: int) -> None:
        """A promotion's --min-replicas takes effect: held replies, lanes, replicas' handshakes."""
        changed = n != self.replication.min_replicas
        self.replication.configure(n, self.log.head, visible)
        if not changed:
            return
        for conn in list(self.connections):
            conn.replicas_changed()  # MSG replies wait for replicas from now on, or no longer
        # Replicas still connected were told the old value in their handshake: they come back for the new one.
        for stream in list(self.replica_streams):
            stream.end(protocol.EOF)
            stream.sink.flush()  # type: ignore[attr-defined]

    def replace_replica(self, name: str) -> None:
        """A REPLICATE stream starts under ``name`` (the address its replica listens on): a stream
        already running under that name is that replica's old connection, dead or dying. It stops
        counting now, so one follower never counts twice toward --min-replicas, nor shows twice."""
        for old in [s for s in self.replica_streams if s.name == name]:
            log.warning("replica_replaced", replica=name, old_peer=old.peer)
            old.sink.drop(BusyError(f"replaced by a newer REPLICATE stream from replica {name}"))  # type: ignore[attr-defined]

    def step_down(self, epoch: int, replica: str) -> None:
        """A replica has seen a newer epoch than ours: a newer leader exists, so stop taking writes
        (as a Raft leader on a higher term). Durable, like REFUSE; held MSG replies fail."""
        if epoch <= self.epochs.current:
            return
        try:
            self.epochs.see(epoch, refused=True if self.follower is None else None)
        except OSError as exc:
            log.error("step_down_not_recorded", error=str(exc))
        if self.follower is None:
            if not self.read_only or self.fenced_by is None:
                log.warning("stepped_down", epoch=self.epochs.current, newer_epoch=epoch, replica=replica,
                            head=self.log.head)
            self.read_only = True
            self.fenced_by = epoch
            self.replication.abandon("before this leader stepped down (a newer epoch exists)")

    def replica_handshake(self, cmd: protocol.Replicate, peer: str) -> tuple[bytes, bool]:
        """A REPLICATE with epochs: the OK line, and whether records follow it (else close after it).

        Raises `FencedError` (after stepping down) when the replica has seen
        a newer epoch than ours.
        """
        assert cmd.seen is not None
        if max(cmd.seen, cmd.epoch or 0) > self.epochs.current:
            self.step_down(max(cmd.seen, cmd.epoch or 0), peer)
            raise FencedError(
                f"this server's epoch {self.epochs.current} is older than epoch {cmd.seen} "
                f"the replica has seen; it no longer accepts writes"
            )
        # The setting, not only this server's own: a follower passes its leader's on to its replicas.
        return replicate_handshake(self.epochs, cmd, self.log.head + 1, self.min_replicas.value)

    def check_replica_start(self, start: int, prev_crc: int | None) -> None:
        """Refuse a follower whose history differs from ours (DIVERGED)."""
        prev = start - 1
        if prev > self.log.head:
            raise DivergedError(f"follower is ahead: it has id {prev}, this server's head is {self.log.head}")
        if prev_crc is None or prev < self.log.first or prev == 0:
            return
        try:
            ours = self.log.crc_of(prev)
        except CorruptRecordError as exc:
            # Our copy of the follower's last record is damaged: we cannot tell
            # whether the histories agree. The follower backs off and retries.
            log.error("replica_start_corrupt", id=prev, error=str(exc), hint="run logd check on this server")
            raise UnavailableError(
                f"cannot check prev_crc: this server's record {prev} is corrupt ({exc}); run logd check here"
            ) from None
        if ours != prev_crc:
            raise DivergedError(f"id {prev} differs: leader crc {ours:08x}, follower crc {prev_crc:08x}")

    def readonly_error(self) -> ReadOnlyError:
        where = self.leader_address or "-"
        return ReadOnlyError(f"{where} this server does not accept writes")
