"""The leader's replica bookkeeping: acknowledged ids, the high watermark, held MSG replies."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from .. import protocol
from ..errors import ServerError, UnavailableError
from ..protocol.replica import handshake_reply
from ..protocol.session import AppendReply
from ..storage.epochs import Epochs
from .lag import CAPACITY, MIN_RESOLUTION_S, CommitTimes


def replicate_handshake(epochs: Epochs, cmd: protocol.Replicate, next_id: int, min_replicas: int) -> tuple[bytes, bool]:
    """Answer a REPLICATE that carries the replica's epoch: where that epoch ends here.

    Returns the ``OK <leader_epoch> <epoch> <end> <min_replicas>`` line and
    whether the stream follows: only if this history holds the replica's
    epoch and it does not end before the replica's ``start`` (``next_id`` is
    this leader's commit point + 1). Otherwise the replica must cut its log
    first (protocol.md 3.4) and the leader closes after the line.
    """
    assert cmd.epoch is not None
    found, end = epochs.end_of(cmd.epoch, next_id)
    reply = handshake_reply(epochs.current, found, end, min_replicas)
    return reply, found == cmd.epoch and end >= cmd.start


class ReplicaSet:
    """The leader's view of its replicas: acknowledged ids, high watermark, waiting MSGs.

    ``acked`` maps a replica's connection to the highest id it has committed.
    The high watermark ``hw`` is the highest id that ``min_replicas`` replicas
    (and this server) hold; it never goes back. With ``min_replicas`` 0 it is
    simply the commit point.
    """

    def __init__(self, min_replicas: int, timeout: float, head: int, saved_hw: int = 0) -> None:
        self.min_replicas = min_replicas
        self.timeout = timeout
        self.acked: dict[Any, int] = {}
        # A restarted leader cannot know which of its records past the
        # watermark it saved reached enough replicas: it shows nothing past
        # that until reconnecting replicas confirm more.
        self.hw = head if min_replicas == 0 else saved_hw
        self.head = head
        # When recent ids were committed, for lags in seconds: samples cover at least 4 replica
        # timeouts, so a replica older than them is surely out of sync (lag.py).
        self.commits = CommitTimes(max(MIN_RESOLUTION_S, 4 * timeout / CAPACITY))
        self._waiters: deque[tuple[int, float, Any, AppendReply]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def configure(self, min_replicas: int, head: int, visible: int) -> None:
        """Run with ``min_replicas`` from now on (a promotion). Readers saw up to ``visible``: with
        N > 0 that stays the high watermark until replicas confirm more; with 0 it is the commit point."""
        self.min_replicas = min_replicas
        self.head = head
        self.hw = head if min_replicas == 0 else min(head, visible)
        self._advance()
        self.release()  # replies held under the old setting that the new one lets go

    def on_commit(self, head: int) -> bool:
        """The commit point moved; return True if the high watermark moved with it."""
        self.head = head
        self.commits.note(head, time.monotonic())
        return self._advance()

    def ack(self, conn: Any, id: int) -> bool:
        """A replica committed up to ``id``; return True if the high watermark moved."""
        if id > self.acked.get(conn, -1):
            self.acked[conn] = id
        return self._advance()

    def forget(self, conn: Any) -> None:
        """A replica's stream ended: it no longer counts (the high watermark stays)."""
        self.acked.pop(conn, None)

    def _advance(self) -> bool:
        n = self.min_replicas
        if n == 0:
            new = self.head
        elif len(self.acked) < n:
            return False
        else:
            new = min(self.head, sorted(self.acked.values(), reverse=True)[n - 1])
        if new <= self.hw:
            return False
        self.hw = new
        return True

    def lag_seconds(self, acked: int) -> float:
        """How long ago the first id past ``acked`` was committed (0 when caught up); over-stated
        by less than the samples' resolution, and a lower bound past their window (lag.py)."""
        if acked >= self.head:
            return 0.0
        when = self.commits.committed_at(acked + 1)
        return 0.0 if when is None else time.monotonic() - when

    def in_sync(self) -> int:
        """Replicas connected and no more than ``timeout`` seconds behind."""
        return sum(1 for a in self.acked.values() if self.lag_seconds(a) <= self.timeout)

    def refusal(self) -> ServerError | None:
        """Why a MSG must be refused before it is appended (too few replicas), or None."""
        if self.min_replicas == 0:
            return None
        k = self.in_sync()
        if k >= self.min_replicas:
            return None
        return UnavailableError(
            f"{k} replicas in sync ({len(self.acked)} connected), {self.min_replicas} required; nothing was written"
        )

    # --- MSG replies held until min_replicas hold them ---------------------------------

    def hold(self, conn: Any, reply: AppendReply, last_id: int) -> None:
        """Keep a committed batch's reply until the high watermark reaches ``last_id``."""
        self._waiters.append((last_id, time.monotonic() + self.timeout, conn, reply))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.timeout, self._expire)

    def release(self) -> None:
        """Answer every held batch the high watermark has reached."""
        conns: set[Any] = set()
        waiters = self._waiters
        hw = self.hw
        while waiters and waiters[0][0] <= hw:
            last_id, _deadline, conn, reply = waiters.popleft()
            reply.resolve(protocol.ok(last_id))
            conns.add(conn)
        for conn in conns:
            conn.flush()

    def abandon(self, why: str) -> None:
        """Answer every held batch with ERR UNAVAILABLE (the server is stopping)."""
        self._fail(len(self._waiters), why)

    def _expire(self) -> None:
        self._timer = None
        now = time.monotonic()
        waiters = self._waiters
        n = 0
        while n < len(waiters) and waiters[n][1] <= now:
            n += 1
        self._fail(n, f"within {self.timeout:g} s")
        if waiters:
            self._timer = asyncio.get_running_loop().call_later(max(0.0, waiters[0][1] - now), self._expire)

    def _fail(self, n: int, why: str) -> None:
        conns: set[Any] = set()
        waiters = self._waiters
        for _ in range(n):
            last_id, _deadline, conn, reply = waiters.popleft()
            err = UnavailableError(
                f"id {last_id} is committed here but fewer than {self.min_replicas} replicas acknowledged it "
                f"{why}; it may still become visible"
            )
            reply.resolve(protocol.error_reply(err))
            conns.add(conn)
        for conn in conns:
            conn.flush()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def stats(self) -> dict[str, object]:
        """Figures for a leader's STATS: one group of lines per replica."""
        figures: dict[str, object] = {
            "high_watermark": self.hw,
            "replicas_in_sync": self.in_sync(),
        }
        for stream, acked in self.acked.items():
            name = f"replica_{stream.name}"  # the address it listens on (protocol.md 3.4)
            figures[f"{name}_acked"] = acked
            figures[f"{name}_lag_messages"] = max(0, self.head - acked)
            figures[f"{name}_lag_s"] = round(self.lag_seconds(acked), 3)
        return figures
