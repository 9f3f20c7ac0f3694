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
    CorruptRecordError,
    DeniedError,
    DivergedError,
    FencedError,
    ReadOnlyError,
    UnavailableError,
)
from .replication.leader import replicate_handshake

if TYPE_CHECKING:
    from .replication import Follower, ReplicaSet
    from .storage import Log
    from .storage.epochs import Epochs
    from .streams import Stream

log = structlog.get_logger("logd.server")


class Roles:
    """The server's role and its replication checks (mixed into `LogServer`)."""

    log: Log
    epochs: Epochs
    replication: ReplicaSet
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

    def accept_writes(self, peer: str = "-", next_id: int | None = None) -> None:
        """ACCEPT [next_id]: stop following (if we were) and accept MSG from the next id.

        A server that was not writable starts a new epoch (the highest seen +
        1) at its next id, durably, before it takes any MSG. With ``next_id``
        it refuses (`DeniedError`) unless that is its next id, so an operator
        promotes exactly the replica they checked.
        """
        nxt = self.log.written + 1
        if next_id is not None and next_id != nxt:
            raise DeniedError(f"ACCEPT {next_id}: this server's next id is {nxt} (nothing changed)")
        if self.follower is None and not self.read_only:
            return  # already a leader: same epoch
        epoch = self.epochs.next_epoch
        if epoch is None:  # refused, not written: EPOCHS would hold a number no reader takes
            raise DeniedError(f"ACCEPT: epoch {self.epochs.seen} is the largest there is; no new epoch can "
                              "start (nothing changed)")
        try:
            self.epochs.start(epoch, nxt, refused=False)
        except OSError as exc:
            raise UnavailableError(f"cannot record the new epoch: {exc}") from None
        follower, self.follower = self.follower, None
        if follower is not None:
            # What the old leader's readers could see stays visible here.
            self.replication.hw = max(self.replication.hw, follower.leader_visible)
            follower.cancel()
        log.warning("promoted", former_leader=follower.leader if follower else None, head=self.log.head,
                    epoch=epoch, first_id=nxt, peer=peer)
        self.read_only = False
        self.fenced_by = None
        self.leader_address = None
        self.wake_streams()  # readers may see more now (the follower's cap is gone)

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
        return replicate_handshake(self.epochs, cmd, self.log.head + 1, self.replication.min_replicas)

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
