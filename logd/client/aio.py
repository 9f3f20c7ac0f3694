"""The asyncio client: `AsyncClient` and its `AsyncTail`, the same API as `Client`, awaited."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar

from .. import errors
from ..protocol import ClientProtocol, Command, EndOfStream, ErrorReply, Head, Msg, OkReply, Read, Record, Reply
from .commands import (
    CLOSING_CODES,
    DEFAULT_PORT,
    DEFAULT_URL,
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
    deadline_after,
    id_of,
    msg_call,
    parse_url,
    read_call,
    readable_now,
    remaining,
    retriable,
    stream_step,
    tune,
    where,
    why,
    with_retry_async,
)

__all__ = ["AsyncClient", "AsyncTail"]

T = TypeVar("T")
# What an async connection holds, unread by its user, before it stops reading
# from the socket (a tail whose reader is slower than the server); it reads
# again once its user has taken everything.
HOLD_REPLIES = 100_000
HOLD_BYTES = 8 << 20


class AsyncConnection(asyncio.Protocol):
    """An asyncio transport and its ClientProtocol; any failure closes it for good.

    Replies queue up for `reply` / `receive`, or go straight to
    ``on_replies`` when set (the producer resolves futures there).
    """

    def __init__(self) -> None:
        self.proto = ClientProtocol()
        self.replies: deque[Reply] = deque()
        self.transport: asyncio.Transport | None = None
        self.error: errors.LogdError | None = None
        self.on_replies: Callable[[list[Reply]], None] | None = None
        self.on_lost: Callable[[errors.LogdError], None] | None = None
        self.where = "?"
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._read_paused = False
        self._held_bytes = 0  # received since the user last took every reply
        self._fd = -1

    @classmethod
    async def open(cls, address: tuple[str, int], timeout: float | None) -> AsyncConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(cls, address[0], address[1])
        except TimeoutError:
            raise errors.ConnectionError(f"cannot connect to {where(address)}: timed out") from None
        except OSError as exc:
            raise errors.ConnectionError(f"cannot connect to {where(address)}: {why(exc)}") from None
        conn.where = where(address)
        return conn

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        tune(sock)
        self._fd = sock.fileno() if sock is not None else -1

    def data_received(self, data: bytes) -> None:
        try:
            got = self.proto.receive_data(data)
        except errors.LogdError as exc:
            self._fail(exc)
            return
        if not got:
            return
        if self.on_replies is not None:
            self.on_replies(got)
            return
        self.replies.extend(got)
        self._held_bytes += len(data)
        if (len(self.replies) > HOLD_REPLIES or self._held_bytes > HOLD_BYTES) and not self._read_paused:
            assert self.transport is not None
            self.transport.pause_reading()
            self._read_paused = True
        self._wake()

    def eof_received(self) -> bool:
        try:
            self.proto.receive_data(b"")
        except errors.LogdError as exc:
            self._fail(exc)
        else:
            self._fail(errors.ConnectionError(f"connection closed by {self.where}"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        detail = f": {exc}" if exc else ""
        self._fail(errors.ConnectionError(f"connection to {self.where} lost{detail}"))
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        if self._drained is None or self._drained.done():
            self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # use

    def _fail(self, exc: errors.LogdError) -> None:
        if self.error is not None:
            return
        self.error = exc
        if self.transport is not None:
            self.transport.abort()
        self._wake()
        if self.on_lost is not None:
            self.on_lost(exc)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    @property
    def stale(self) -> bool:
        """Closed, or the server spoke unprompted (BUSY, TIMEOUT, end of stream); check while idle.

        Asks the socket too: the event loop may not have run since the server
        closed it (then a MSG sent now would fail after leaving).
        """
        if self.error is not None or self.replies:
            return True
        return self._fd >= 0 and readable_now(self._fd)

    def send(self, command: Command) -> None:
        if self.error is not None:
            raise self.error
        assert self.transport is not None
        self.transport.write(self.proto.send(command))

    async def drain(self) -> None:
        """Wait while the transport's write buffer is over its high-water mark."""
        if self._drained is not None and not self._drained.done():
            await self._drained
        if self.error is not None:
            raise self.error

    async def receive(self) -> list[Reply]:
        """Every reply received so far, waiting for at least one."""
        while not self.replies:
            if self.error is not None:
                raise self.error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        out = list(self.replies)
        self.replies.clear()
        self._resume()
        return out

    async def reply(self) -> Reply:
        while not self.replies:
            self.replies.extend(await self.receive())
        reply = self.replies.popleft()
        self._resume()
        return reply

    def _resume(self) -> None:
        if self.replies:
            return
        self._held_bytes = 0
        if self._read_paused and self.transport is not None:
            self.transport.resume_reading()
            self._read_paused = False

    async def collect(self, stream: bool) -> list[Reply]:
        """The whole reply to one command: one line, or OK + records + ``+EOF``."""
        first = await self.reply()
        if not stream or not isinstance(first, OkReply):
            return [first]
        out: list[Reply] = [first]
        while True:
            reply = await self.reply()
            out.append(reply)
            if isinstance(reply, EndOfStream | ErrorReply):
                return out

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class AsyncClient:
    """The asyncio twin of `Client`: the same methods, awaited; calls take turns on one connection."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        timeout: float | None = 10.0,
        connect_timeout: float = 5.0,
        retry: Retry = Retry(),  # noqa: B008 - frozen
    ) -> None:
        self.address = (host, port)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retry = retry
        self._conn: AsyncConnection | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_url(cls, url: str = DEFAULT_URL, **kwargs: Any) -> AsyncClient:
        """A client for ``logd://host:port``; keywords as for the constructor."""
        host, port = parse_url(url)
        return cls(host, port, **kwargs)

    def __repr__(self) -> str:
        return f"<AsyncClient logd://{where(self.address)}>"

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
            conn = await AsyncConnection.open(self.address, remaining(deadline, self.connect_timeout))
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

    async def read(
        self, start: int, limit: int = 1000, *, wait: bool = False, timeout: float | None = None
    ) -> list[Record]:
        """Up to ``limit`` records from id ``start`` (see `Client.read`)."""
        if not wait:
            limit = clamp(start, limit, await self.head(timeout=timeout))
            if not limit:
                return []
        return await self._execute(read_call(start, limit), timeout)

    def tail(self, start: int | None = None) -> AsyncTail:
        """Records from id ``start`` (None: only new ones) as they are committed, forever."""
        return AsyncTail(self, start)

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
                last = id_of([await conn.reply()])
        except TimeoutError:
            raise errors.TimeoutError(f"no reply from {where(self.address)} in time") from None
        return range(last - n + 1, last + 1)

    async def shutdown(self, *, timeout: float | None = None) -> None:
        """Ask the server to stop gracefully (DeniedError unless it allows SHUTDOWN)."""
        await self._execute(SHUTDOWN, timeout)


class AsyncTail:
    """The asyncio twin of `Tail`: ``async for record in client.tail(start)``."""

    def __init__(self, client: AsyncClient, start: int | None) -> None:
        if start is not None and start < 1:
            raise ValueError("a tail starts at an id >= 1")
        self._client = client
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
                self._conn = await with_retry_async(policy, self._connect)
            try:
                replies = await self._conn.receive()
            except errors.ConnectionError:
                await self.aclose()
                continue
            except errors.LogdError:  # a corrupt record or reply: nothing to resume from
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

    async def _connect(self) -> AsyncConnection:
        client = self._client
        deadline = deadline_after(client.timeout)
        conn = await AsyncConnection.open(client.address, remaining(deadline, client.connect_timeout))
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
