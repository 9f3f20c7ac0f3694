"""Replication: the follower loop and the leader's replica bookkeeping.

A follower (``logd serve --replica-of HOST:PORT``) sends ``REPLICATE <start>
<prev_crc>`` and appends what it receives, byte for byte, to its own log:
each received chunk is parsed in one pass by `protocol.replica` (framing,
id continuity, CRC per record), written with one `Log.append_encoded` per segment, committed with one
fsync, and acknowledged with one ``ACK <id>``. It starts segments only where
the leader's ``+SEG`` markers say, so closed segments are byte-identical on
both (protocol.md section 3.4).

The leader keeps a `ReplicaSet`: every replica's acknowledged id, the high
watermark (the highest id held by ``min_replicas`` replicas) and the MSG
replies waiting for it.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections import deque
from typing import TYPE_CHECKING, Any

import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

from . import protocol
from .config import parse_address
from .errors import CorruptRecordError, LogdError, ProtocolError, ServerError, UnavailableError
from .protocol.replica import (
    Chunk,
    Event,
    LeaderPosition,
    ReplicaStreamParser,
    SegmentStart,
    StreamEnd,
    StreamError,
    StreamOk,
)

if TYPE_CHECKING:
    from .server import LogServer

log = structlog.get_logger("logd.replication")

EXIT_REPLICATION_FAILED = 4  # a follower that must not go on (DIVERGED, NOT_FOUND, misaligned segments)
LINK_HIGH_WATER = 16 * 1024 * 1024  # bytes received but not yet applied before we stop reading
COMMIT_SAMPLES = 1 << 16  # (commit point, time) pairs kept for replica lag in seconds


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
        self._ids: list[int] = []  # commit points, increasing, with when they were reached
        self._times: list[float] = []
        self._waiters: deque[tuple[int, float, Any, list[Any]]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def on_commit(self, head: int) -> bool:
        """The commit point moved; return True if the high watermark moved with it."""
        self.head = head
        self._ids.append(head)
        self._times.append(time.monotonic())
        if len(self._ids) > 2 * COMMIT_SAMPLES:
            del self._ids[:COMMIT_SAMPLES], self._times[:COMMIT_SAMPLES]
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
        """How long ago the first id past ``acked`` was committed (0 when caught up)."""
        if acked >= self.head or not self._ids:
            return 0.0
        i = bisect_left(self._ids, acked + 1)
        if i == len(self._ids):
            return 0.0
        return time.monotonic() - self._times[i]

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

    def hold(self, conn: Any, slot: list[Any], last_id: int) -> None:
        """Keep a committed batch's reply until the high watermark reaches ``last_id``."""
        self._waiters.append((last_id, time.monotonic() + self.timeout, conn, slot))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.timeout, self._expire)

    def release(self) -> None:
        """Answer every held batch the high watermark has reached."""
        conns: set[Any] = set()
        waiters = self._waiters
        hw = self.hw
        while waiters and waiters[0][0] <= hw:
            last_id, _deadline, conn, slot = waiters.popleft()
            conn.answer_held(slot, b"OK %d\r\n" % last_id)
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
            last_id, _deadline, conn, slot = waiters.popleft()
            err = UnavailableError(
                f"id {last_id} is committed here but fewer than {self.min_replicas} replicas acknowledged it "
                f"{why}; it may still become visible"
            )
            conn.answer_held(slot, protocol.error_reply(err))
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
            "min_replicas": self.min_replicas,
            "high_watermark": self.hw,
            "replicas_in_sync": self.in_sync(),
        }
        for conn, acked in self.acked.items():
            name = f"replica_{conn.peer}"
            figures[f"{name}_acked"] = acked
            figures[f"{name}_lag_messages"] = max(0, self.head - acked)
            figures[f"{name}_lag_s"] = round(self.lag_seconds(acked), 3)
        return figures


# --- the follower -------------------------------------------------------------------------


class LinkLost(LogdError):
    """The connection to the leader failed or ended; reconnect with backoff."""


class ReplicationFailed(LogdError):
    """Following must stop: going on would mix two histories or skip records."""


def _feed_all(parser: ReplicaStreamParser, chunks: list[bytes]) -> list[Event]:
    """The events of received chunks, up to the end of the stream (nothing after that counts)."""
    events: list[Event] = []
    for data in chunks:
        events += parser.feed(data)
        if events and type(events[-1]) in (StreamEnd, StreamError):
            break
    return events


class _Link(asyncio.Protocol):
    """The follower's connection to its leader: buffers received bytes for the loop to take."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.lost = False
        self.paused = False
        self.event = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        self.event.set()
        if self.size > LINK_HIGH_WATER and not self.paused and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.event.set()

    async def take(self) -> list[bytes]:
        """The chunks received so far (waits for some); [] once the connection is gone.

        Not joined: the stream parser takes them one by one, so each byte is
        copied once on its way from the socket to the segment file.
        """
        while not self.chunks:
            if self.lost:
                return []
            self.event.clear()
            await self.event.wait()
        data = self.chunks
        self.chunks = []
        self.size = 0
        if self.paused and self.transport is not None and not self.lost:
            self.transport.resume_reading()
            self.paused = False
        return data

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.lost:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class Follower:
    """Follows a leader: REPLICATE, append what arrives, ACK; reconnect with jittered backoff."""

    def __init__(self, server: LogServer, leader: str) -> None:
        self.server = server
        self.leader = leader
        self.host, self.port = parse_address(leader)
        self.state = "connecting"
        self.leader_head = server.log.head  # the leader's commit point, as last told
        # What readers here may see: the leader's high watermark, as last told.
        # Until the first +HEAD, what this server already held.
        self.leader_visible = server.log.head
        self.behind_since: float | None = time.monotonic()
        self.sessions = 0
        self._task: asyncio.Task[None] | None = None
        self._link: _Link | None = None
        self._committer: asyncio.Task[None] | None = None
        self._uncommitted = [0, 0]  # messages and bytes written, not yet in a commit round

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="logd-follower")

    def cancel(self) -> None:
        """Stop following now (promotion): the loop applies nothing after this call."""
        if self._link is not None:
            self._link.close()
        if self._task is not None:
            self._task.cancel()
        self.state = "stopped"

    async def stop(self) -> None:
        """Stop following and wait for the loop to finish (shutdown)."""
        task = self._task
        self.cancel()
        if task is not None and not task.done():
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        try:
            while True:
                retrying = AsyncRetrying(
                    wait=wait_random_exponential(multiplier=0.05, max=2.0),
                    retry=retry_if_exception_type(LinkLost),
                    before_sleep=self._before_retry,
                    reraise=True,
                )
                # A session that got going and then lost the leader reconnects at
                # once (backoff starts afresh); failing to get going backs off.
                async for attempt in retrying:
                    with attempt:
                        await self._session()
        except (ReplicationFailed, LogdError, OSError, ValueError) as exc:
            log.error("replication_failed", leader=self.leader, error=str(exc), head=self.server.log.head)
            self.state = "failed"
            self.server.fail(EXIT_REPLICATION_FAILED, "replication_failed")

    def _before_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        log.warning("leader_unreachable", leader=self.leader, error=str(exc), attempt=state.attempt_number,
                    retry_in_s=round(wait, 3))

    async def _session(self) -> None:
        """One connection to the leader, from our next id until it ends."""
        srv = self.server
        lg = srv.log
        self.state = "connecting"
        if self.behind_since is None:
            self.behind_since = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            _tr, link = await asyncio.wait_for(
                loop.create_connection(_Link, self.host, self.port), timeout=srv.config.replica_timeout
            )
        except OSError as exc:  # TimeoutError included
            raise LinkLost(f"cannot connect to {self.leader}: {exc}") from None
        self._link = link
        try:
            start = lg.written + 1
            prev_crc = lg.crc_of(start - 1) if start > 1 else 0
            link.write(b"REPLICATE %d %08x\r\n" % (start, prev_crc))
            parser = ReplicaStreamParser(start)
            started = False
            self._uncommitted = [0, 0]
            while True:
                chunks = await link.take()
                self._check_commit()
                if not chunks:
                    await self._drain_commits()
                    if started:
                        log.warning("leader_lost", leader=self.leader, head=lg.head)
                        return
                    raise LinkLost(f"{self.leader} closed the connection")
                try:
                    events = _feed_all(parser, chunks)
                except (CorruptRecordError, ProtocolError) as exc:
                    # Possibly damage in transit: start again from what we hold.
                    log.error("replication_stream_bad", leader=self.leader, error=str(exc))
                    raise LinkLost(str(exc)) from None
                count = nbytes = 0
                for ev in events:
                    if type(ev) is Chunk:
                        try:
                            lg.append_encoded(ev.data, ev.offsets, ev.count)
                        except UnavailableError as exc:
                            if lg.failed is not None:
                                raise ReplicationFailed(str(exc)) from None
                            raise LinkLost(str(exc)) from None
                        count += ev.count
                        nbytes += len(ev.data)
                    elif type(ev) is SegmentStart:
                        self._segment(ev.id)
                    elif type(ev) is LeaderPosition:
                        self.leader_head = ev.head
                        self._set_visible(ev.visible)
                    elif type(ev) is StreamOk:
                        started = True
                        self.sessions += 1
                        self.state = "streaming"
                        log.info("following", leader=self.leader, start=start)
                    elif type(ev) is StreamEnd:
                        self._commit_soon(link, count, nbytes)
                        await self._drain_commits()
                        log.warning("leader_stopping", leader=self.leader, head=lg.head)
                        return
                    elif type(ev) is StreamError:
                        if ev.code in ("DIVERGED", "NOT_FOUND"):
                            raise ReplicationFailed(f"leader {self.leader} refused: {ev.code} {ev.message}")
                        raise LinkLost(f"leader {self.leader}: {ev.code} {ev.message}")
                self._commit_soon(link, count, nbytes)
                self._update_lag()
        finally:
            if self._committer is not None and not self._committer.done():
                self._committer.cancel()
            self._committer = None
            link.close()
            self._link = None
            if self.state == "streaming":
                self.state = "connecting"

    def _segment(self, first_id: int) -> None:
        lg = self.server.log
        nxt = lg.written + 1
        try:
            if first_id == nxt:
                lg.start_segment(first_id)
                return
        except ValueError as exc:
            raise ReplicationFailed(f"cannot start segment {first_id}: {exc}") from None
        active = lg.segment_of(nxt)
        if first_id != active:
            raise ReplicationFailed(
                f"segment layout differs: the leader's id {nxt} is in segment {first_id}, ours in {active}"
            )

    # Commits run beside the loop: while one fsync is in flight the loop parses
    # and writes the next chunks, and the following fsync covers all of them
    # (group commit, as the leader's queue does for MSG).

    def _commit_soon(self, link: _Link, count: int, nbytes: int) -> None:
        if not count:
            return
        self._uncommitted[0] += count
        self._uncommitted[1] += nbytes
        if self._committer is None or self._committer.done():
            self._check_commit()
            self._committer = asyncio.get_running_loop().create_task(self._commit_rounds(link))

    async def _commit_rounds(self, link: _Link) -> None:
        while self._uncommitted[0]:
            count, nbytes = self._uncommitted
            self._uncommitted = [0, 0]
            head = await self.server.queue.commit_written(count, nbytes)
            link.write(b"ACK %d\r\n" % head)
            self._update_lag()

    def _check_commit(self) -> None:
        task = self._committer
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            raise ReplicationFailed(f"commit failed: {task.exception()}")

    async def _drain_commits(self) -> None:
        if self._committer is not None:
            await asyncio.wait([self._committer])
            self._check_commit()

    def _set_visible(self, visible: int) -> None:
        if visible > self.leader_visible:
            self.leader_visible = visible
            self.server.wake_streams()

    def _update_lag(self) -> None:
        if self.server.log.head >= self.leader_head:
            self.behind_since = None
        elif self.behind_since is None:
            self.behind_since = time.monotonic()

    def stats(self) -> dict[str, object]:
        """Figures for a follower's STATS."""
        lag_s = 0.0 if self.behind_since is None else time.monotonic() - self.behind_since
        return {
            "leader": self.leader,
            "replication": self.state,
            "leader_head": self.leader_head,
            "lag_messages": max(0, self.leader_head - self.server.log.head),
            "lag_s": round(lag_s, 3),
        }
