"""The asyncio client: `AsyncClient` and its `AsyncTail`, the same API as `Client`, awaited."""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar

from .. import defaults, errors
from ..protocol import ErrorReply, Head, Msg, Read, Record, Reply
from .aio_connection import AsyncConnection
from .commands import (
    CLOSING_CODES,
    CURSORS,
    DEFAULT_PORT,
    DEFAULT_URL,
    FIRST,
    HEAD,
    PING,
    SHUTDOWN,
    STATS,
    Body,
    Call,
    Retry,
    as_bytes,
    checked,
    clamp,
    commit_call,
    corrupt_id_in,
    cursor_call,
    cursors_page_call,
    deadline_after,
    drop_call,
    id_of,
    last_id_of,
    msg_call,
    next_page,
    read_call,
    remaining,
    retriable,
    stream_step,
    where,
    with_retry_async,
)
from .endpoint import Endpoint, endpoint

__all__ = ["AsyncClient", "AsyncTail"]

T = TypeVar("T")


class AsyncClient:
    """The asyncio twin of `Client`: the same methods, awaited; calls take turns on one connection."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        timeout: float | None = defaults.CLIENT_TIMEOUT,
        connect_timeout: float = defaults.CLIENT_CONNECT_TIMEOUT,
        retry: Retry = Retry(),  # noqa: B008 - frozen
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.endpoint = Endpoint(host, port, ssl_context, token)
        self.address = (host, port)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retry = retry
        self._conn: AsyncConnection | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str = DEFAULT_URL, **kwargs: Any) -> AsyncClient:
        """A client for ``logd://[:TOKEN@]host:port`` or ``logds://...``; keywords as for the constructor."""
        ep = endpoint(url, token=kwargs.pop("token", None), ssl_context=kwargs.pop("ssl_context", None))
        return cls(ep.host, ep.port, token=ep.token, ssl_context=ep.tls, **kwargs)

    def __repr__(self) -> str:
        return f"<AsyncClient {self.endpoint.url}>"

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection (the next call opens a new one)."""
        self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _connection(self, deadline: float | None) -> AsyncConnection:
        conn = self._conn
        if conn is not None and conn.stale:
            self._drop()
            conn = None
        if conn is None:
            conn = await AsyncConnection.open(self.endpoint, remaining(deadline, self.connect_timeout))
            self._conn = conn
        return conn

    async def _execute(self, call: Call[T], timeout: float | None) -> T:
        """Run one command: connect if needed, send, await its whole reply, retry per policy."""
        limit = self.timeout if timeout is None else timeout
        deadline = deadline_after(limit)
        sent = [False]
        policy = self.retry.policy(lambda e: retriable(e, call.idempotent or not sent[0]), limit)
        return await with_retry_async(policy, self._attempt, call, deadline, sent)

    async def _attempt(self, call: Call[T], deadline: float | None, sent: list[bool]) -> T:
        sent[0] = False
        return call.result(await self._once(call, deadline, sent))

    async def _once(self, call: Call[Any], deadline: float | None, sent: list[bool]) -> list[Reply]:
        async with self._lock:
            try:
                async with asyncio.timeout(remaining(deadline)):
                    conn = await self._connection(deadline)
                    sent[0] = True
                    conn.send(call.command)
                    replies = await conn.collect(call.stream)
            except TimeoutError:
                self._drop()
                raise errors.TimeoutError(f"no reply from {where(self.address)} in time") from None
            except BaseException:
                self._drop()  # failed or cancelled mid-reply: never reuse this stream
                raise
            last = replies[-1]
            if isinstance(last, ErrorReply) and last.code in CLOSING_CODES:
                self._drop()
            return replies

    # --- commands (the same as Client's) -----------------------------------------

    async def append(self, *bodies: Body, timeout: float | None = None) -> list[int]:
        """Append the messages atomically (one MSG); return their ids. ``str`` is sent as UTF-8."""
        return await self._execute(msg_call(bodies), timeout)

    async def head(self, *, timeout: float | None = None) -> int:
        """The id of the last committed message (0: the log is empty)."""
        return await self._execute(HEAD, timeout)

    async def ping(self, *, timeout: float | None = None) -> bool:
        """True when the server answers PONG."""
        return await self._execute(PING, timeout)

    async def stats(self, *, timeout: float | None = None) -> dict[str, str]:
        """The server's figures, name -> value (see protocol.md, STATS)."""
        return await self._execute(STATS, timeout)

    async def first(self, *, timeout: float | None = None) -> int:
        """The oldest id still retained (where reading "from the beginning" starts; 1 for an empty log)."""
        return await self._execute(FIRST, timeout)

    async def commit(self, name: str, id: int, *, timeout: float | None = None) -> None:
        """Move the named cursor forward to ``id`` (StaleCursorError if it is past that already)."""
        await self._execute(commit_call(name, id), timeout)

    async def cursor(self, name: str, *, timeout: float | None = None) -> int:
        """The named cursor's id (0 if it was never committed)."""
        return await self._execute(cursor_call(name), timeout)

    async def cursors(self, *, timeout: float | None = None) -> dict[str, int]:
        """Every cursor on the server, name -> id (a page at a time when a bare CURSORS is TOO_LARGE)."""
        try:
            return await self._execute(CURSORS, timeout)
        except errors.TooLargeError:
            pass
        found: dict[str, int] = {}
        after: str | None = None
        while True:
            page = await self._execute(cursors_page_call(after), timeout)
            found.update(page)
            after = next_page(after, page)
            if after is None:
                return found

    async def drop_cursor(self, name: str, *, timeout: float | None = None) -> None:
        """Delete the named cursor (NotFoundError if there is none); with authentication, the
        token must own it (its cursor grant) or be admin. Not resent after a lost connection."""
        await self._execute(drop_call(name), timeout)

    async def read(
        self,
        start: int,
        limit: int = 1000,
        *,
        wait: bool = False,
        timeout: float | None = None,
        skip_corrupt: bool = False,
    ) -> list[Record]:
        """Up to ``limit`` records from id ``start`` (see `Client.read`, ``skip_corrupt`` included)."""
        if not wait:
            limit = clamp(start, limit, await self.head(timeout=timeout))
            if not limit:
                return []
        end = start + limit
        out: list[Record] = []
        while start < end:
            try:
                out.extend(await self._read_exact(start, end - start, timeout))
                break
            except errors.CorruptRecordError as exc:
                if not skip_corrupt:
                    raise
                bad = corrupt_id_in(exc, start, end)
                if bad > start:
                    out.extend(await self._read_exact(start, bad - start, timeout))
                start = bad + 1
        return out

    async def _read_exact(self, start: int, limit: int, timeout: float | None) -> list[Record]:
        return await self._execute(read_call(start, limit), timeout)

    def tail(self, start: int | None = None, *, skip_corrupt: bool = False) -> AsyncTail:
        """Records from id ``start`` (None: only new ones) as they are committed, forever (see `Client.tail`)."""
        return AsyncTail(self, start, skip_corrupt=skip_corrupt)

    async def append_batches(
        self, batches: Iterable[Sequence[Body]], *, max_in_flight: int = 16, timeout: float | None = None
    ) -> AsyncIterator[range]:
        """Append each batch as one MSG, pipelined; yield each batch's ids (see `Client.append_batches`)."""
        async with self._lock:
            limit = self.timeout if timeout is None else timeout
            conn: AsyncConnection | None = None
            sizes: deque[int] = deque()
            try:
                for bodies in batches:
                    if not bodies:
                        continue
                    if conn is None:
                        policy = self.retry.policy(lambda e: retriable(e, True), limit)
                        conn = await with_retry_async(policy, self._connection, deadline_after(limit))
                    while len(sizes) >= max_in_flight:
                        yield await self._acked(conn, sizes.popleft(), limit)
                    conn.send(Msg([as_bytes(b) for b in bodies]))
                    sizes.append(len(bodies))
                    await conn.drain()
                while sizes:
                    assert conn is not None
                    yield await self._acked(conn, sizes.popleft(), limit)
            except BaseException:
                self._drop()
                raise

    async def _acked(self, conn: AsyncConnection, n: int, limit: float | None) -> range:
        try:
            async with asyncio.timeout(limit):
                last = last_id_of([await conn.reply()], n)
        except TimeoutError:
            raise errors.TimeoutError(f"no reply from {where(self.address)} in time") from None
        return range(last - n + 1, last + 1)

    async def shutdown(self, *, timeout: float | None = None) -> None:
        """Ask the server to stop gracefully (DeniedError unless it allows SHUTDOWN)."""
        await self._execute(SHUTDOWN, timeout)


class AsyncTail:
    """The asyncio twin of `Tail`: ``async for record in client.tail(start)``."""

    def __init__(self, client: AsyncClient, start: int | None, *, skip_corrupt: bool = False) -> None:
        if start is not None and start < 1:
            raise ValueError("a tail starts at an id >= 1")
        self._client = client
        self._skip_corrupt = skip_corrupt
        self._want = start
        self._conn: AsyncConnection | None = None
        self._records: deque[Record] = deque()

    @property
    def position(self) -> int | None:
        """The id of the next record this tail will hand out (None: not connected yet)."""
        return self._records[0].id if self._records else self._want

    def __aiter__(self) -> AsyncTail:
        return self

    async def __anext__(self) -> Record:
        while not self._records:
            await self._fill()
        return self._records.popleft()

    async def batch(self, max_records: int = 1000, timeout: float | None = None) -> list[Record]:
        """Up to ``max_records`` records, waiting up to ``timeout`` s (None: forever) for the first."""
        if not self._records:
            try:
                async with asyncio.timeout(timeout):
                    await self._fill()
            except TimeoutError:
                pass  # waiting for replies is cancel-safe: nothing read is lost
        take = self._records.popleft
        return [take() for _ in range(min(max_records, len(self._records)))]

    async def __aenter__(self) -> AsyncTail:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the tail's connection (iterating again reconnects)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _fill(self) -> None:
        while not self._records:
            if self._conn is None:
                policy = self._client.retry.policy(lambda e: retriable(e, True), None)
                try:
                    self._conn = await with_retry_async(policy, self._connect)
                except errors.CorruptRecordError as exc:  # in the chunk that came with the OK
                    await self._corrupt(exc)
                    continue
            try:
                replies = await self._conn.receive()
            except errors.ConnectionError:
                await self.aclose()
                continue
            except errors.CorruptRecordError as exc:
                await self._corrupt(exc)
                continue
            except errors.LogdError:  # a bad reply: nothing to resume from
                await self.aclose()
                raise
            try:
                nxt, ended = stream_step(replies, self._records)
            except BaseException:
                await self.aclose()
                raise
            if nxt:
                self._want = nxt
            if ended:
                await self.aclose()

    async def _corrupt(self, exc: errors.CorruptRecordError) -> None:
        """A corrupt record: raise it, or (``skip_corrupt``) fetch the good records before it
        (their chunk was lost) and resume after it."""
        await self.aclose()
        if not self._skip_corrupt or self._want is None:
            raise exc
        bad = corrupt_id_in(exc, self._want, exc.id + 1)
        if bad > self._want:
            self._records.extend(await self._client.read(self._want, bad - self._want, wait=True, skip_corrupt=True))
        self._want = bad + 1

    async def _connect(self) -> AsyncConnection:
        client = self._client
        deadline = deadline_after(client.timeout)
        conn = await AsyncConnection.open(client.endpoint, remaining(deadline, client.connect_timeout))
        try:
            async with asyncio.timeout(remaining(deadline)):
                if self._want is None:
                    conn.send(Head())
                    self._want = id_of([await conn.reply()]) + 1
                conn.send(Read(self._want, 0))
                checked(await conn.reply())
        except TimeoutError:
            conn.close()
            raise errors.TimeoutError(f"no reply from {conn.where} in time") from None
        except BaseException:
            conn.close()
            raise
        return conn
