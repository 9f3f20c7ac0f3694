"""The single ordered event queue: group commit, acknowledgements, waking tails.

Every connection submits its MSG batches here; one writer task applies them
in arrival order. While a write + fsync is in flight, new batches wait; the
next round takes all of them, writes them with one ``write`` and makes them
durable with one fsync (group commit, as LevelDB's ``BuildBatchGroup``).
Then each submitter's callback gets its id range, and commit listeners
(tails, replicas) are told the new commit point.

fsync runs on a dedicated thread so the event loop never blocks on it.

With ``fsync=interval`` or ``never`` there is no fsync to wait for, so there
is no writer task either: the first batch submitted schedules `kick` with
``call_soon``. It runs once the loop has handled every socket that was ready,
so one write still covers the batches of all of them, and their acks go out
without a task switch in between.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import structlog

from .errors import LogdError, UnavailableError
from .storage import Log

log = structlog.get_logger("logd.queue")

# A round takes at most this much from the queue, so one huge burst cannot
# make a single write (and the memory to build it) unbounded.
MAX_ROUND_BYTES = 16 * 1024 * 1024
# Longest a group-commit round waits for more batches to join it (see _gather).
GATHER_S = 0.0002
FSYNC_SAMPLES = 1024  # recent fsync durations kept for STATS percentiles


class Submitter(Protocol):
    """Who gets told the outcome of a batch (a connection)."""

    def batch_done(self, token: object, last_id: int) -> None: ...

    def batch_failed(self, token: object, error: LogdError) -> None: ...

    def flush(self) -> None: ...


class AppendQueue:
    """Applies MSG batches from every connection to the log, in one order."""

    def __init__(self, log_: Log) -> None:
        self.log = log_
        self._pending: deque[tuple[list[bytes], int, Submitter, object]] = deque()
        self._pending_bytes = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="logd-fsync")
        self._task: asyncio.Task[None] | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[int], None]] = []
        self._closing = False
        self._last_round = 0  # batches in the previous round, the target for _gather
        # interval/never: batches are applied by kick(), not by a writer task.
        self._inline = log_.policy.mode != "always"
        self._kick_scheduled = False
        # Figures for STATS.
        self.appended_messages = 0
        self.appended_bytes = 0
        self.fsyncs = 0
        self._fsync_us: deque[float] = deque(maxlen=FSYNC_SAMPLES)

    # --- life cycle -----------------------------------------------------------

    def start(self) -> None:
        """Start the writer task (fsync=always) or the interval syncer (interval)."""
        if not self._inline:
            self._task = asyncio.get_running_loop().create_task(self._writer(), name="logd-writer")
        if self.log.policy.mode == "interval":
            self._sync_task = asyncio.get_running_loop().create_task(
                self._interval_syncer(), name="logd-syncer"
            )

    async def drain(self) -> None:
        """Wait until every submitted batch has been written and acknowledged."""
        while self._pending or not self._idle.is_set():
            if not self._idle.is_set():
                await self._idle.wait()
            else:
                await asyncio.sleep(0)  # let the writer task take the next round

    async def stop(self) -> None:
        """Finish what was submitted, sync, and stop the tasks."""
        self._closing = True
        await self.drain()
        for task in (self._task, self._sync_task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        if self.log.failed is None and self.log.needs_sync:
            await self._sync()
        self._executor.shutdown(wait=True)

    def add_listener(self, fn: Callable[[int], None]) -> None:
        """Call ``fn(commit_point)`` whenever the commit point moves."""
        self._listeners.append(fn)

    # --- submitting -----------------------------------------------------------

    def submit(self, bodies: list[bytes], nbytes: int, who: Submitter, token: object) -> None:
        """Queue a batch; ``who.batch_done(token, last_id)`` is called once it is committed."""
        self._pending.append((bodies, nbytes, who, token))
        self._pending_bytes += nbytes
        if self._inline:
            if not self._kick_scheduled:
                self._kick_scheduled = True
                asyncio.get_running_loop().call_soon(self.kick)
        elif not self._wake.is_set():
            self._wake.set()

    def kick(self) -> None:
        """Apply every pending batch now, when no fsync is waited for (interval/never)."""
        self._kick_scheduled = False
        if not self._inline:
            return
        while self._pending:
            round_ = self._take_round()
            if self._append(round_):
                self._acknowledge(round_)

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    # --- the writer -------------------------------------------------------------

    async def _writer(self) -> None:
        """Group commit for fsync=always: one write and one fsync per round."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                self._idle.clear()
                await self._gather()
                round_ = self._take_round()
                self._last_round = len(round_)
                try:
                    await self._apply(round_)
                finally:
                    self._idle.set()

    async def _gather(self) -> None:
        """Let a group form before paying for an fsync (PostgreSQL's commit_delay).

        Writers that wait for their ack send their next batch only after the
        previous round's acks: they come back spread over a few hundred
        microseconds. Taking whatever is pending at once would split them
        into a tiny round and a big one, two fsyncs where one would do. So
        while fewer batches are pending than the last round had, let the
        event loop read more sockets, for at most GATHER_S. A lone writer
        (last round of 1) never waits.
        """
        target = self._last_round
        if target <= 1 or len(self._pending) >= target:
            return
        deadline = time.perf_counter() + GATHER_S
        while len(self._pending) < target and time.perf_counter() < deadline:
            await asyncio.sleep(0)

    def _take_round(self) -> list[tuple[list[bytes], int, Submitter, object]]:
        round_: list[tuple[list[bytes], int, Submitter, object]] = []
        size = 0
        pending = self._pending
        while pending and (size < MAX_ROUND_BYTES or not round_):
            item = pending.popleft()
            size += item[1]
            round_.append(item)
        self._pending_bytes -= size
        return round_

    async def _apply(self, round_: list[tuple[list[bytes], int, Submitter, object]]) -> None:
        """Write a round, fsync it, acknowledge it (fsync=always)."""
        if not self._append(round_):
            return
        try:
            await self._sync()
        except LogdError as exc:
            self._fail(round_, exc)
            return
        self._acknowledge(round_)

    def _append(self, round_: list[tuple[list[bytes], int, Submitter, object]]) -> bool:
        """Write a round to the log; on failure tell its submitters and return False."""
        bodies: list[bytes] = []
        for item in round_:
            bodies += item[0]
        try:
            self.log.append(bodies, sum(item[1] for item in round_))
            if self.log.needs_sync and self.log.policy.mode == "never":
                # A roll left a closed segment to finish; do it off the loop.
                asyncio.get_running_loop().run_in_executor(self._executor, self._sync_quietly)
        except LogdError as exc:
            self._fail(round_, exc)
            return False
        except OSError as exc:  # unexpected: report as storage failure
            self._fail(round_, UnavailableError(f"storage error: {exc}"))
            return False
        return True

    def _fail(self, round_: list[tuple[list[bytes], int, Submitter, object]], exc: LogdError) -> None:
        log.error("append_failed", error=str(exc), batches=len(round_))
        for _b, _n, who, token in round_:
            who.batch_failed(token, exc)
        self._flush_all(round_)

    def _acknowledge(self, round_: list[tuple[list[bytes], int, Submitter, object]]) -> None:
        """Hand out the id ranges of a committed round, in submission order, and tell the listeners."""
        messages = sum(len(item[0]) for item in round_)
        self.appended_messages += messages
        self.appended_bytes += sum(item[1] for item in round_)
        first = self.log.head + 1 - messages
        for batch, _n, who, token in round_:
            first += len(batch)
            who.batch_done(token, first - 1)
        self._flush_all(round_)
        head = self.log.head
        for fn in self._listeners:
            fn(head)

    async def commit_written(self, messages: int, nbytes: int) -> int:
        """Commit records a replica wrote straight to the log, as a MSG round would.

        Syncs under ``fsync=always``, counts them, and tells the commit
        listeners (tails). Returns the commit point. A follower has no MSG
        traffic, so this never interleaves with `_apply`'s rounds.
        """
        if self.log.policy.mode == "always":
            await self._sync()
        elif self.log.needs_sync and self.log.policy.mode == "never":
            asyncio.get_running_loop().run_in_executor(self._executor, self._sync_quietly)
        self.appended_messages += messages
        self.appended_bytes += nbytes
        head = self.log.head
        for fn in self._listeners:
            fn(head)
        return head

    @staticmethod
    def _flush_all(round_: list[tuple[list[bytes], int, Submitter, object]]) -> None:
        # One transport.write per connection per round, however many batches it had.
        for who in dict.fromkeys([item[2] for item in round_]):
            who.flush()

    async def _sync(self) -> None:
        t0 = time.perf_counter()
        await asyncio.get_running_loop().run_in_executor(self._executor, self.log.sync)
        self.fsyncs += 1
        self._fsync_us.append((time.perf_counter() - t0) * 1e6)

    def _sync_quietly(self) -> None:
        try:
            self.log.sync()
        except LogdError as exc:
            log.error("sync_failed", error=str(exc))

    async def _interval_syncer(self) -> None:
        interval = self.log.policy.interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            if self.log.needs_sync and self.log.failed is None:
                try:
                    await self._sync()
                except LogdError as exc:
                    log.error("sync_failed", error=str(exc))

    def fsync_percentiles(self) -> tuple[int, int]:
        """p50 and p99 of recent fsync durations, in microseconds."""
        if not self._fsync_us:
            return 0, 0
        s = sorted(self._fsync_us)
        return int(s[len(s) // 2]), int(s[min(len(s) - 1, (len(s) * 99) // 100)])
