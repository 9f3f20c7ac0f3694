"""Reading the log for a sink: batches of CRC-checked records from a position on.

``--once`` reads with `Client.read` up to the head seen at start, one READ
per batch. Following reads a `Tail` (one READ that never ends), and a batch
closes when it holds ``batch`` records or ``linger`` seconds after its first
record arrived, whichever comes first. Waits are cut into short slices so a
stop request (SIGTERM) is noticed within about `POLL_S`. A `Prefetcher` reads
the next batch in a thread while the pipeline delivers the current one (for
databases that work in another process); a `Reader` reads when asked.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from ..client import Client, Retry, Tail
from ..protocol import RecordRow

__all__ = ["LogSource", "Prefetcher", "Reader"]

POLL_S = 0.2  # longest wait before looking at the stop flag again


class LogSource:
    """Batches of records from ``start`` on; ``stop_at`` (the head at start) ends a ``--once`` run."""

    def __init__(self, url: str, start: int, *, follow: bool, timeout: float, retry: Retry,
                 token: str | None = None, ssl_context: Any = None) -> None:
        self.client = Client.from_url(url, timeout=timeout, retry=retry, token=token, ssl_context=ssl_context)
        self.next_id = start
        self.follow = follow
        self.stop_at: int | None = None
        self._tail: Tail | None = None

    def begin(self) -> None:
        """Settle where the run starts and, for ``--once``, where it ends."""
        if self.next_id < 1:  # nothing delivered yet: the oldest record still retained
            self.next_id = self.client.first()
        if not self.follow:
            self.stop_at = self.client.head()

    def head(self) -> int:
        """The log's head now."""
        return self.client.head()

    @property
    def done(self) -> bool:
        """A ``--once`` run has read everything up to the head seen at start."""
        return self.stop_at is not None and self.next_id > self.stop_at

    def batch(self, size: int, linger: float, stopping: Callable[[], bool]) -> list[RecordRow]:
        """The next batch (possibly empty: nothing new yet, or a stop was asked for)."""
        if not self.follow:
            assert self.stop_at is not None
            n = min(size, self.stop_at - self.next_id + 1)
            # (id, body) tuples built in C from the received bytes: no per-record Python work.
            records = self.client.read_rows(self.next_id, n) if n > 0 else []
        else:
            records = self._from_tail(size, linger, stopping)
        if records:
            self.next_id = records[-1][0] + 1
        return records

    def _from_tail(self, size: int, linger: float, stopping: Callable[[], bool]) -> list[RecordRow]:
        if self._tail is None:
            self._tail = self.client.tail(self.next_id, rows=True)
        records: list[RecordRow] = []
        closes: float | None = None  # when the batch closes: linger after its first record
        while len(records) < size and not stopping():
            wait = POLL_S if closes is None else min(POLL_S, closes - time.monotonic())
            if wait <= 0 and records:
                break
            records += self._tail.batch(size - len(records), timeout=max(wait, 0.0))  # type: ignore[arg-type]  # rows
            if records and closes is None:
                closes = time.monotonic() + linger
                if linger <= 0:
                    break
            if not records:
                return records  # nothing in POLL_S: let the caller report progress, look at flags
        return records

    def close(self) -> None:
        if self._tail is not None:
            self._tail.close()
            self._tail = None
        self.client.close()


class Reader:
    """Reads each batch when asked (for targets that work in this process: SQLite)."""

    def __init__(self, source: LogSource, size: int, linger: float, stopping: Callable[[], bool]) -> None:
        self.source = source
        self._args = (size, linger, stopping)

    def get(self) -> list[RecordRow] | None:
        """The next batch ([] when nothing came in a while); None once a ``--once`` run has read everything."""
        return None if self.source.done else self.source.batch(*self._args)

    def close(self) -> None:
        self.source.close()


class Prefetcher(Reader):
    """Reads the next batch in a thread while the caller delivers the current one.

    The database works in its own process while the sink waits for a COPY or
    an INSERT to finish; reading and checking the next batch meanwhile keeps
    both busy. At most one batch waits read-ahead; a batch read but never
    delivered (a stop, a crash) is simply read again by the next run.
    `get` returns None once a ``--once`` run has read everything, and raises
    what the reading raised (the caller closes this and retries).
    """

    def __init__(self, source: LogSource, size: int, linger: float, stopping: Callable[[], bool]) -> None:
        super().__init__(source, size, linger, stopping)
        self._ready: queue.Queue[list[RecordRow] | BaseException | None] = queue.Queue(maxsize=1)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="logd-sink-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        size, linger, stopping = self._args
        while not self._closed.is_set():
            try:
                item: list[RecordRow] | BaseException | None = (
                    None if self.source.done else self.source.batch(size, linger, stopping)
                )
            except BaseException as exc:  # noqa: BLE001 - handed to the caller by get()
                item = exc
            while not self._closed.is_set():
                try:
                    self._ready.put(item, timeout=POLL_S)
                    break
                except queue.Full:
                    continue
            if item is None or isinstance(item, BaseException):
                return

    def get(self) -> list[RecordRow] | None:
        """The next batch ([] when nothing came in a while, or after a stop request).

        After a stop request the reader hands over the batch it was filling
        within `POLL_S`, so that batch is delivered too.
        """
        item = self._ready.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop reading ahead and close the source."""
        self._closed.set()
        self._thread.join()
        self.source.close()
