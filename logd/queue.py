"""The single ordered event queue: group commit, acknowledgements, waking tails.

Every connection submits its MSG batches here and they are applied in
arrival order. A *round* takes every batch pending, writes them with one
``write`` and (under ``fsync=always``) makes them durable with one fsync:
group commit, as LevelDB's ``BuildBatchGroup``. Then each submitter learns
its id range, and the commit listeners (tails, replicas) the new commit point.

A round starts from ``call_soon``: after the event loop has read every socket
that was ready, so one round takes the batches of all of them (the loop's own
batching; no spin, no timer). While a round's fsync runs on the sync thread,
new batches wait; the round after it takes them all.

Connections submit MSGs two ways: their Python path calls `submit`; their
C lane (lane.py) appends ``(bodies, nbytes, lane, None)`` to the pending
queue itself and calls `_kick` only when no round is armed or the backlog
is passed. The queue's `Hub` holds what the lanes read and write: the
pending bytes, whether a round is armed, whether MSGs are accepted.

fsync runs on one dedicated thread (`SyncThread`) that reports back with
``call_soon_threadsafe``: no thread pool and no future per round, and the
event loop never blocks on the disk.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from queue import SimpleQueue
from typing import Protocol

import structlog

from .errors import LogdError, UnavailableError
from .histogram import FSYNC_BUCKETS_S, ROUND_BUCKETS, Histogram
from .lane import Hub, ack_round, gather
from .storage import Log

log = structlog.get_logger("logd.queue")

# A round takes at most this much from the queue, so one huge burst cannot
# make a single write (and the memory to build it) unbounded.
MAX_ROUND_BYTES = 16 * 1024 * 1024
FSYNC_SAMPLES = 1024  # recent fsync durations kept for STATS percentiles

Batch = tuple[list[bytes], int, "Submitter", object]
SyncDone = Callable[[BaseException | None], None]


class Submitter(Protocol):
    """Who gets told the outcome of a batch (a connection).

    A batch with the token None is a connection's lane's (lane.py): it is
    told through ``lane_ack(nbytes, last_id)`` instead of `batch_done`.
    """

    def batch_done(self, token: object, last_id: int) -> bool:
        """The batch is committed, its last message with ``last_id``; True: call `flush` after the round."""

    def batch_failed(self, token: object, nbytes: int, error: LogdError) -> None:
        """The batch of ``nbytes`` failed: answer it with ``error`` (token None: a lane's batch)."""

    def flush(self) -> None: ...


class SyncThread:
    """One thread that runs ``log.sync`` on request and reports back on the event loop.

    Requests that arrive while a sync runs share the next one.
    """

    def __init__(
        self, log_: Log, loop: asyncio.AbstractEventLoop, timings: deque[float], histogram: Histogram | None = None
    ) -> None:
        self._log = log_
        self._loop = loop
        self._timings = timings
        self._histogram = histogram
        # A C-implemented queue: put/get cost a few hundred ns, where a Condition costs a lock per wait.
        self._requests: SimpleQueue[SyncDone | None] = SimpleQueue()
        self.count = 0
        self._thread = threading.Thread(target=self._run, name="logd-fsync", daemon=True)
        self._thread.start()

    def request(self, done: SyncDone) -> None:
        """Sync everything written so far, then call ``done(None)`` (or ``done(error)``) on the loop."""
        self._requests.put(done)

    def _run(self) -> None:
        requests = self._requests
        while True:
            taken = [requests.get()]
            while not requests.empty():  # every request made meanwhile shares this sync
                taken.append(requests.get())
            dones = [done for done in taken if done is not None]
            if dones:
                self._sync(dones)
            if len(dones) < len(taken):  # stop() was called
                return

    def _sync(self, dones: list[SyncDone]) -> None:
        t0 = time.perf_counter()
        error: BaseException | None = None
        try:
            self._log.sync()
        except BaseException as exc:  # reported to the requesters on the loop
            error = exc
        elapsed = time.perf_counter() - t0
        self._timings.append(elapsed * 1e6)
        if self._histogram is not None:
            self._histogram.observe(elapsed)
        self.count += 1
        try:
            self._loop.call_soon_threadsafe(_report, dones, error)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the requests made so far, then end the thread (a daemon: a hung disk cannot keep us)."""
        self._requests.put(None)
        self._thread.join(timeout)


def _report(dones: list[SyncDone], error: BaseException | None) -> None:
    for done in dones:
        done(error)


class AppendQueue:
    """Applies MSG batches from every connection to the log, in one order."""

    def __init__(
        self,
        log_: Log,
        on_failure: Callable[[str, BaseException], None] | None = None,
        backlog_bytes: int = 1 << 62,
        on_backlog: Callable[[bool], None] | None = None,
        conn_input: int = 1 << 62,
    ) -> None:
        self.log = log_
        self._pending: deque[Batch] = deque()
        # Shared with every connection's lane; hub.pending_bytes counts what _pending holds.
        self.hub = Hub(self._pending.append, self._kick, backlog_bytes, conn_input)
        # Over backlog_bytes pending (hub.backlog_bytes), on_backlog(True) is called (the server
        # stops reading from writers); on_backlog(False) once rounds have taken it below again.
        self._on_backlog = on_backlog
        self.backlogged = False
        self._listeners: list[Callable[[int], None]] = []
        self._on_failure = on_failure
        self._always = log_.policy.mode == "always"
        self._never = log_.policy.mode == "never"
        self._scheduled = False
        self._syncing: list[Batch] | None = None  # the round whose fsync is running
        self._taken: list[Batch] = []  # the round being written, until answered (for a fail-stop)
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._sync_task: asyncio.Task[None] | None = None
        self._syncer: SyncThread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Figures for STATS.
        self.appended_messages = 0
        self.appended_bytes = 0
        self._fsync_us: deque[float] = deque(maxlen=FSYNC_SAMPLES)
        # For the metrics endpoint: one observation per fsync and per round, not per message.
        self.fsync_seconds = Histogram(FSYNC_BUCKETS_S)
        self.round_messages = Histogram(ROUND_BUCKETS)

    # --- life cycle -----------------------------------------------------------

    def start(self) -> None:
        """Start the sync thread (and the interval syncer under ``interval``)."""
        self._loop = loop = asyncio.get_running_loop()
        self._syncer = SyncThread(self.log, loop, self._fsync_us, self.fsync_seconds)
        if self.log.policy.mode == "interval":
            self._sync_task = loop.create_task(self._interval_syncer(), name="logd-syncer")

    @property
    def fsyncs(self) -> int:
        return self._syncer.count if self._syncer is not None else 0

    @property
    def busy(self) -> bool:
        return bool(self._pending) or self._syncing is not None or self._scheduled

    async def drain(self) -> None:
        """Wait until every submitted batch has been written and acknowledged."""
        while self.busy and self.log.failed is None:
            fut = asyncio.get_running_loop().create_future()
            self._idle_waiters.append(fut)
            await fut

    async def stop(self) -> None:
        """Finish what was submitted, sync, and stop the sync thread."""
        await self.drain()
        if self._sync_task is not None:
            self._sync_task.cancel()
            try:
                await self._sync_task
            except asyncio.CancelledError:
                pass
        if self.log.failed is None and self.log.needs_sync:
            try:
                await self.sync()
            except LogdError as exc:
                log.error("sync_failed", error=str(exc))
        if self._syncer is not None:
            self._syncer.stop()

    def add_listener(self, fn: Callable[[int], None]) -> None:
        """Call ``fn(commit_point)`` whenever the commit point moves."""
        self._listeners.append(fn)

    @property
    def pending_bytes(self) -> int:
        return self.hub.pending_bytes  # type: ignore[no-any-return]

    # --- submitting -----------------------------------------------------------

    def submit(self, who: Submitter, bodies: list[bytes], nbytes: int, token: object) -> None:
        """Queue a batch; ``who.batch_done(token, last_id)`` is called once it is committed."""
        self._pending.append((bodies, nbytes, who, token))
        self.hub.pending_bytes += nbytes
        self._kick()

    def _kick(self) -> None:
        """Batches were added: go over the backlog if they take it there; arm a round if none is."""
        hub = self.hub
        if hub.pending_bytes > hub.backlog_bytes and not self.backlogged:
            self._backlog(True)
        if not self._scheduled and self._syncing is None:
            self._scheduled = hub.armed = True
            self._loop.call_soon(self._round)  # type: ignore[union-attr]

    def _round(self) -> None:
        """Write what is pending; acknowledge it now (interval, never) or after its fsync (always)."""
        self._scheduled = self.hub.armed = False
        try:
            if not self._always:
                while self._pending:
                    round_ = self._write_round()
                    if round_ is not None:
                        self._acknowledge(round_)
            elif self._syncing is None and self._pending:
                round_ = self._write_round()
                if round_ is not None:
                    self._syncing, self._taken = round_, []
                    self.hub.armed = True  # the round after the fsync takes what comes meanwhile
                    self._syncer.request(self._synced)  # type: ignore[union-attr]
        except Exception as exc:  # a bug or an unforeseen fault: stop, loudly, rather than hang
            self._fail_stop("append queue failed", exc)
        if self.backlogged or self._idle_waiters:
            self._check_idle()

    def _synced(self, error: BaseException | None) -> None:
        round_, self._syncing = self._syncing, None
        self.hub.armed = self._scheduled
        try:
            if round_ is not None:
                if error is None:
                    self._acknowledge(round_)
                elif isinstance(error, LogdError):
                    self._fail(round_, error)
                else:
                    self._fail(round_, UnavailableError(f"fsync failed: {error}"))
            if self._pending and not self._scheduled:
                self._scheduled = self.hub.armed = True
                self._loop.call_soon(self._round)  # type: ignore[union-attr]
        except Exception as exc:
            self._fail_stop("acknowledging a commit failed", exc)
        self._check_idle()

    def _write_round(self) -> list[Batch] | None:
        """Take a round from the queue and write it to the log: the round, or None when it failed
        (its submitters are told)."""
        pending = self._pending
        if self.hub.pending_bytes <= MAX_ROUND_BYTES:  # the common case: everything pending
            round_ = list(pending)
            pending.clear()
            self.hub.pending_bytes = 0
        else:
            round_ = self._take_some()
        self._taken = round_
        bodies, nbytes = gather(round_)
        if not bodies:
            return round_  # only cursor commits (no messages): the round's sync is all they need
        try:
            self.log.append(bodies, nbytes)
        except LogdError as exc:
            self._fail(round_, exc)
            return None
        except OSError as exc:  # unexpected: report as storage failure
            self._fail(round_, UnavailableError(f"storage error: {exc}"))
            return None
        if self._never and self.log.needs_sync:
            self._sync_later()  # a roll left a closed segment to finish
        return round_

    def _take_some(self) -> list[Batch]:
        """At least one batch, and no more than MAX_ROUND_BYTES once past the first."""
        pending = self._pending
        round_: list[Batch] = []
        size = 0
        while pending and (size < MAX_ROUND_BYTES or not round_):
            item = pending.popleft()
            size += item[1]
            round_.append(item)
        self.hub.pending_bytes -= size
        return round_

    def _fail(self, round_: list[Batch], exc: LogdError) -> None:
        self._taken = []
        log.error("append_failed", error=str(exc), batches=len(round_))
        for _b, n, who, token in round_:
            who.batch_failed(token, n, exc)
        self._flush_all(round_)

    def _acknowledge(self, round_: list[Batch]) -> None:
        """Hand out the id ranges of a committed round, in submission order, and tell the listeners."""
        self._taken = []
        head = self.log.head
        messages, nbytes, to_flush = ack_round(round_, head)  # each lane's OK is written in there
        self.appended_messages += messages
        self.appended_bytes += nbytes
        self.round_messages.observe(messages)
        # One transport.write per connection per round, however many batches it had.
        for who in dict.fromkeys(to_flush) if len(to_flush) > 1 else to_flush:
            who.flush()
        for fn in self._listeners:
            fn(head)

    @staticmethod
    def _flush_all(round_: list[Batch]) -> None:
        # One transport.write per connection per round, however many batches it had.
        if len(round_) == 1:
            round_[0][2].flush()
            return
        for who in dict.fromkeys([item[2] for item in round_]):
            who.flush()

    def _backlog(self, on: bool) -> None:
        self.backlogged = on
        if self._on_backlog is not None:
            self._on_backlog(on)

    def _check_idle(self) -> None:
        if self.backlogged and self.hub.pending_bytes <= self.hub.backlog_bytes:
            self._backlog(False)
        if self._idle_waiters and not (self._pending or self._syncing is not None or self._scheduled):
            waiters, self._idle_waiters = self._idle_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def _fail_stop(self, what: str, exc: BaseException) -> None:
        log.exception("fail_stop", what=what, error=repr(exc))
        if self._on_failure is not None:
            self._on_failure(what, exc)
        # Whatever was in flight will never be acknowledged: say so.
        stuck = self._taken + list(self._pending) + (self._syncing or [])
        self._taken = []
        self._pending.clear()
        self.hub.pending_bytes = 0
        self._syncing = None
        self.hub.armed = self._scheduled
        err = UnavailableError(f"server failed: {what}: {exc!r}")
        for _b, n, who, token in stuck:
            try:
                who.batch_failed(token, n, err)
                who.flush()
            except Exception:  # a connection that cannot even be told: it goes with the server
                pass

    # --- syncing --------------------------------------------------------------

    def sync(self) -> asyncio.Future[None]:
        """Sync everything written so far on the sync thread; the future fails with the error, if any."""
        loop = self._loop
        assert loop is not None and self._syncer is not None
        fut: asyncio.Future[None] = loop.create_future()

        def done(error: BaseException | None) -> None:
            if fut.done():
                return
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)

        self._syncer.request(done)
        return fut

    def _sync_later(self) -> None:
        """Sync in the background; a failure is logged (the log refuses writes from then on)."""

        def done(error: BaseException | None) -> None:
            if error is not None:
                log.error("sync_failed", error=str(error))

        if self._syncer is not None:
            self._syncer.request(done)

    async def commit_written(self, messages: int, nbytes: int) -> int:
        """Commit records a replica wrote straight to the log, as a MSG round would.

        Syncs under ``fsync=always``, counts them, and tells the commit
        listeners (tails). Returns the commit point. A follower has no MSG
        traffic, so this never interleaves with the MSG rounds.
        """
        if self._always:
            await self.sync()
        elif self.log.needs_sync and self.log.policy.mode == "never":
            self._sync_later()
        self.appended_messages += messages
        self.appended_bytes += nbytes
        head = self.log.head
        for fn in self._listeners:
            fn(head)
        return head

    async def _interval_syncer(self) -> None:
        interval = self.log.policy.interval_ms / 1000
        while True:
            await asyncio.sleep(interval)
            if self.log.needs_sync and self.log.failed is None:
                try:
                    await self.sync()
                except LogdError as exc:
                    log.error("sync_failed", error=str(exc))

    def fsync_percentiles(self) -> tuple[int, int]:
        """p50 and p99 of recent fsync durations, in microseconds."""
        if not self._fsync_us:
            return 0, 0
        s = sorted(self._fsync_us)
        return int(s[len(s) // 2]), int(s[min(len(s) - 1, (len(s) * 99) // 100)])
