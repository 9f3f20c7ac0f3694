"""The asyncio producer: batches and in-flight MSGs as `producer.Producer` does, in the event loop.

Batching, backpressure and what happens on failure are the same as for the
blocking `Producer` (see `producer`); here futures are `asyncio.Future` and
one writer task owns the connection, whose acknowledgements arrive through
`AsyncConnection.on_replies`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque

from .. import defaults, errors
from ..protocol import Msg, Reply
from .aio import AsyncConnection
from .batching import Batch, BatchLimits, lost_in_flight, settle
from .commands import (
    DEFAULT_URL,
    Body,
    Retry,
    as_bytes,
    retriable,
    with_retry_async,
)
from .endpoint import endpoint

__all__ = ["AsyncProducer"]


class AsyncProducer:
    """The asyncio producer: ``fut = await producer.send(b"...")``; ``await fut`` is the id.

    ``send`` is a coroutine only so that it can wait when the producer is
    full; it returns as soon as the message is queued.
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
        self._open: Batch[asyncio.Future[int]] = Batch()
        self._timer: asyncio.TimerHandle | None = None
        self._ready: deque[Batch[asyncio.Future[int]]] = deque()
        self._inflight: deque[Batch[asyncio.Future[int]]] = deque()
        self._conn: AsyncConnection | None = None
        self._changed: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def __aenter__(self) -> AsyncProducer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send(self, body: Body) -> asyncio.Future[int]:
        """Queue one message; the future gives its id once the server has acknowledged it."""
        if self._closing:
            raise errors.LogdError("producer is closed")
        limits = self._limits
        while len(self._ready) >= limits.max_in_flight:
            await self._wait_change()
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._task = loop.create_task(self._write_loop(), name="logd-producer")
        fut: asyncio.Future[int] = loop.create_future()
        data = as_bytes(body)
        batch = self._open
        batch.bodies.append(data)
        batch.futures.append(fut)
        batch.nbytes += len(data)
        if len(batch.bodies) >= limits.max_messages or batch.nbytes >= limits.max_bytes:
            self._seal()
            # Let the writer put it on the wire and acknowledgements come in
            # now, rather than when a caller sending in a loop blocks.
            await asyncio.sleep(0)
        elif len(batch.bodies) == 1:
            self._timer = loop.call_later(limits.linger, self._seal)
        return fut

    async def flush(self) -> None:
        """Send the open batch now and wait until every batch sent so far is acknowledged."""
        if self._open.bodies:
            self._seal()
        while self._ready or self._inflight:
            await self._wait_change()

    async def close(self) -> None:
        """Flush, then stop the writer and close the connection."""
        try:
            await self.flush()
        finally:
            self._closing = True
            self._changed_now()
            if self._task is not None:
                await self._task
                self._task = None
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # --- internals --------------------------------------------------------------------

    async def _wait_change(self) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        self._changed.clear()
        await self._changed.wait()

    def _changed_now(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def _seal(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._open.bodies:
            self._ready.append(self._open)
            self._open = Batch()
            self._changed_now()

    async def _write_loop(self) -> None:
        limits = self._limits
        while True:
            room = limits.max_in_flight - len(self._inflight)
            if not self._ready or room <= 0:
                if self._closing and not self._ready and not self._inflight:
                    return
                await self._wait_change()
                continue
            try:
                conn = await self._connected()
            except errors.LogdError as exc:
                while self._ready:  # never written: fail them, later batches try again
                    settle(self._ready.popleft(), exc)
                self._changed_now()
                continue
            batches = [self._ready.popleft() for _ in range(min(room, len(self._ready)))]
            for batch in batches:
                conn.send(Msg(batch.bodies))
                self._inflight.append(batch)
            self._changed_now()
            try:
                await conn.drain()
            except errors.LogdError:
                pass  # on_lost has failed what was in flight

    async def _connected(self) -> AsyncConnection:
        conn = self._conn
        if conn is not None:
            if conn.error is None and (self._inflight or not conn.stale):
                return conn
            self._conn = None  # closed by the server while idle: replace it (see Producer)
            conn.close()
        policy = self._retry.policy(lambda e: retriable(e, True), None)
        conn = await with_retry_async(policy, AsyncConnection.open, self.endpoint, self._connect_timeout)
        conn.on_replies = lambda replies, c=conn: self._on_replies(c, replies)
        conn.on_lost = lambda why, c=conn: self._on_lost(c, why)
        self._conn = conn
        return conn

    def _on_replies(self, conn: AsyncConnection, replies: list[Reply]) -> None:
        if conn is not self._conn:
            return  # a replaced connection had nothing in flight
        inflight = self._inflight
        for reply in replies:
            if inflight:
                settle(inflight.popleft(), reply)
        self._changed_now()

    def _on_lost(self, conn: AsyncConnection, why: errors.LogdError) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        lost = list(self._inflight)
        self._inflight.clear()
        for batch in lost:
            settle(batch, lost_in_flight(len(batch.bodies), why))
        self._changed_now()

