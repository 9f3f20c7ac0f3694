"""Producers: batch messages like Kafka's producer and keep several MSGs in flight.

`send(body)` adds a message to the open batch and returns a future of its
id. A batch is sealed when it holds ``max_batch_messages`` messages or
``max_batch_bytes`` bytes, or ``linger_ms`` after its first message arrived;
sealed batches go out in order on one connection, each as one MSG, with up
to ``max_in_flight`` MSGs unacknowledged at a time. Because they share one
connection and the server answers in order, ids follow the order of `send`.

Failures: a batch not yet written when its connection fails is sent on the
next connection (connecting is retried per ``retry``; when that gives up, the
batch's futures fail with `errors.ConnectionError`). A batch already written
when the connection fails is never sent again (it may or may not have been
appended: resending could duplicate it); its futures fail with
`errors.ConnectionError`. A MSG is atomic, so an ``ERR`` reply (say
TOO_LARGE for one message) fails every future of its batch with the matching
exception. A connection the server closed while the producer was idle is
replaced before anything is written to it.

`send` waits (backpressure) while ``max_in_flight`` sealed batches are
already waiting to be written, so memory stays bounded.

`Producer` (here) is the blocking one (a background thread owns the socket;
`send` returns a `pending.PendingId`, a small future of the id with
`result(timeout)`, `done()`, `exception()` and `add_done_callback`);
`aio_producer.AsyncProducer` runs
in the event loop (futures are `asyncio.Future`). What both share (the
batch, its limits, settling futures from a reply) is in `batching`.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections import deque
from typing import Any

from .. import defaults, errors
from ..protocol import Msg, Reply
from .batching import Batch, BatchLimits, lost_in_flight, settle
from .commands import (
    DEFAULT_URL,
    RECV_BYTES,
    Body,
    Retry,
    retriable,
    with_retry,
)
from .endpoint import endpoint
from .pending import PendingId, resolve_batch
from .sync import Connection

__all__ = ["Producer"]


class Producer:
    """A blocking, batching producer: ``producer.send(b"...").result()`` is the id.

    A background thread seals batches and writes them, another reads the
    acknowledgements. Use it as a context manager, or call `close` (which
    flushes first).
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        linger_ms: float = 5.0,
        max_batch_messages: int = 1000,
        max_batch_bytes: int = 1 << 20,
        max_in_flight: int = 8,
        connect_timeout: float = defaults.CLIENT_CONNECT_TIMEOUT,
        retry: Retry = Retry(),  # noqa: B008 - frozen
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.endpoint = endpoint(url, token=token, ssl_context=ssl_context)
        self.address = self.endpoint.address
        self._limits = BatchLimits.check(linger_ms, max_batch_messages, max_batch_bytes, max_in_flight)
        self._connect_timeout = connect_timeout
        self._retry = retry
        # One plain lock guards the batches; the condition on it wakes the
        # writer, the reader, flush() and senders waiting for room.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # The open batch, kept as bare lists: send() is the per-message hot path.
        self._bodies: list[bytes] = []
        self._futures: list[PendingId] = []
        self._nbytes = 0
        self._opened_at = 0.0
        self._ready: deque[Batch[PendingId]] = deque()
        self._writing = 0  # batches the writer has taken but not yet put in flight
        self._inflight: deque[Batch[PendingId]] = deque()
        self._conn: Connection | None = None
        self._closing = False
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="logd-producer", daemon=True)
        self._writer.start()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, body: Body) -> PendingId:
        """Queue one message; the handle gives its id once the server has acknowledged it.

        Blocks while ``max_in_flight`` sealed batches already wait to be written.
        """
        fut = PendingId()
        data = body.encode() if isinstance(body, str) else body
        limits = self._limits
        with self._lock:
            if len(self._ready) >= limits.max_in_flight or self._closing:
                self._wait_for_room()
            self._bodies.append(data)
            self._futures.append(fut)
            self._nbytes += len(data)
            n = len(self._bodies)
            full = n >= limits.max_messages or self._nbytes >= limits.max_bytes
            if full:
                self._seal()
            elif n == 1:
                self._opened_at = time.monotonic()
                self._cond.notify_all()  # the writer times the linger from now
        if full:
            time.sleep(0)  # hand the GIL to the writer: the batch goes out now
        return fut

    def _wait_for_room(self) -> None:
        while len(self._ready) >= self._limits.max_in_flight and not self._closing:
            self._cond.wait()
        if self._closing:
            raise errors.LogdError("producer is closed")

    def flush(self, timeout: float | None = None) -> None:
        """Send the open batch now and wait until every batch sent so far is acknowledged."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if self._bodies:
                self._seal()
            while self._ready or self._writing or self._inflight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise errors.TimeoutError("flush timed out")
                self._cond.wait(left)

    def close(self, timeout: float | None = None) -> None:
        """Flush, then stop the threads and close the connection."""
        if self._closed:
            return
        try:
            self.flush(timeout)
        finally:
            with self._lock:
                self._closing = True
                self._cond.notify_all()
            self._writer.join()
            self._closed = True

    # --- the writer thread -----------------------------------------------------------

    def _seal(self) -> None:
        """Move the open batch to the ready queue (lock held)."""
        self._ready.append(Batch(self._bodies, self._futures, self._nbytes))
        self._bodies = []
        self._futures = []
        self._nbytes = 0
        self._cond.notify_all()

    def _next_batches(self) -> list[Batch[PendingId]] | None:
        """Wait for batches to write (lock held); None once closing and all is done."""
        limits = self._limits
        while True:
            if self._bodies and time.monotonic() - self._opened_at >= limits.linger:
                self._seal()
            room = limits.max_in_flight - len(self._inflight)
            if self._ready and room > 0:
                self._writing = min(room, len(self._ready))
                return [self._ready.popleft() for _ in range(self._writing)]
            if self._closing and not self._ready and not self._inflight and not self._bodies:
                return None
            wait = None
            if self._bodies and room > 0:
                wait = max(0.0, self._opened_at + limits.linger - time.monotonic())
            self._cond.wait(wait)

    def _write_loop(self) -> None:
        try:
            while True:
                with self._lock:
                    batches = self._next_batches()
                    self._cond.notify_all()  # senders waiting for room in the ready queue
                if batches is None:
                    return
                self._write(batches)
        finally:
            if self._conn is not None:
                try:
                    self._conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _connected(self) -> Connection:
        conn = self._conn
        if conn is not None:
            if self._inflight or not conn.stale():
                return conn
            # Closed by the server while idle (idle timeout, restart): a batch
            # written now would be lost for nothing. Replace it.
            with self._lock:
                self._conn = None
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)  # wakes its reader thread
            except OSError:
                pass
        policy = self._retry.policy(lambda e: retriable(e, True), None)
        conn = with_retry(policy, Connection, self.endpoint, self._connect_timeout)
        conn.sock.settimeout(None)
        self._conn = conn
        threading.Thread(target=self._read_loop, args=(conn,), name="logd-producer-acks", daemon=True).start()
        return conn

    def _write(self, batches: list[Batch[PendingId]]) -> None:
        try:
            conn = self._connected()
        except errors.LogdError as exc:
            for batch in batches:  # never written: fail them, later batches try again
                settle(batch, exc, resolve_batch)
            with self._lock:
                self._writing = 0
                self._cond.notify_all()
            return
        with self._lock:
            self._writing = 0
            if conn is not self._conn:  # lost while we were connecting
                self._ready.extendleft(reversed(batches))
                return
            data = b"".join(conn.proto.send(Msg(b.bodies)) for b in batches)
            self._inflight.extend(batches)
        try:
            conn.sock.sendall(data)
        except OSError:
            pass  # the reader thread sees the loss and fails what was in flight

    # --- the reader thread -------------------------------------------------------------

    def _read_loop(self, conn: Connection) -> None:
        """Resolve acknowledged batches, in order, until the connection ends."""
        failure: errors.LogdError | None = None
        while failure is None:
            try:
                chunk = conn.sock.recv(RECV_BYTES)
            except OSError as exc:
                chunk = b""
                failure = errors.ConnectionError(f"connection lost: {exc}")
            done: list[tuple[Batch[Any], Reply]] = []
            with self._lock:
                try:
                    replies = conn.proto.receive_data(chunk)
                    if not chunk and failure is None:
                        failure = errors.ConnectionError("connection closed by the server")
                except errors.LogdError as exc:
                    replies = []
                    failure = exc
                # A connection the writer replaced had nothing in flight: what
                # it still says (ERR TIMEOUT, end of stream) concerns no batch.
                current = self._conn is conn
                for reply in replies:
                    if current and self._inflight:
                        done.append((self._inflight.popleft(), reply))
                lost: list[Batch[Any]] = []
                if failure is not None:
                    if current:
                        lost = list(self._inflight)
                        self._inflight.clear()
                        self._conn = None
                    conn.close()
                self._cond.notify_all()
            for batch, reply in done:
                settle(batch, reply, resolve_batch)
            if failure is not None:
                for batch in lost:
                    settle(batch, lost_in_flight(len(batch.bodies), failure), resolve_batch)
