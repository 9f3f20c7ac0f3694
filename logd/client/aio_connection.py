"""The asyncio transport under `AsyncClient` and `AsyncProducer`: one connection and its replies."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from .. import errors
from ..protocol import ClientProtocol, Command, EndOfStream, ErrorReply, OkReply, Reply
from .commands import auth_call, readable_now, tune, where, why
from .endpoint import Endpoint

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
    async def open(cls, endpoint: Endpoint, timeout: float | None) -> AsyncConnection:
        """Connect (TLS for ``logds://``) and, with a token, authenticate, all within ``timeout``."""
        loop = asyncio.get_running_loop()
        address = endpoint.address
        tls = endpoint.tls
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    cls, address[0], address[1], ssl=tls, server_hostname=endpoint.host if tls else None
                )
                conn.where = where(address)
                if endpoint.token is not None:
                    call = auth_call(endpoint.token)
                    conn.send(call.command)
                    try:
                        call.result([await conn.reply()])
                    except BaseException:
                        conn.close()
                        raise
        except TimeoutError:
            raise errors.ConnectionError(f"cannot connect to {where(address)}: timed out") from None
        except OSError as exc:  # ssl.SSLError included: a failed handshake
            raise errors.ConnectionError(f"cannot connect to {where(address)}: {why(exc)}") from None
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
