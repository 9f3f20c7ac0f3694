"""A TCP proxy for fault-injection tests: drop, delay, cut mid-record, partition one way or both.

It runs its own asyncio loop in a daemon thread, listens on 127.0.0.1 (an
ephemeral port) and forwards each accepted connection to its current target.
The test thread steers it with plain method calls:

- `drop()`: abort every connection now (both sides see a reset).
- `delay(s)`: hold every chunk ``s`` seconds before forwarding it.
- `partition("up" | "down" | "both")`: stop forwarding in that direction
  (``up`` is client -> server) while the connections stay open; what arrives
  meanwhile is held, as TCP would retransmit it, and delivered by `heal()`.
  New connections are accepted but their bytes are held too.
- `cut_next(direction)`: forward only the first half of the next chunk in
  that direction (for a replication stream: part of a record), then abort.
- `retarget(host, port)`: later connections go elsewhere (a failover
  without restarting the client).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import Future
from typing import Any

DIRECTIONS = ("up", "down")


class Proxy:
    """One listening port forwarding to a target, with faults switched on and off by the test."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.delay_s = 0.0
        self.blocked: set[str] = set()
        self.cut: set[str] = set()
        self.connections = 0  # accepted so far
        self.forwarded = {"up": 0, "down": 0}  # bytes
        self.received = {"up": 0, "down": 0}  # bytes read, forwarded or held
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="test-proxy")
        self._server: asyncio.Server | None = None
        self._pipes: set[_Pipe] = set()
        self._healed: asyncio.Event | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Proxy:
        self._thread.start()
        self._call(self._listen()).result(10)
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._close()).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- faults (called from the test thread) -------------------------------------

    def retarget(self, host: str, port: int) -> None:
        self.target = (host, port)

    def delay(self, seconds: float) -> None:
        self.delay_s = seconds

    def partition(self, direction: str = "both") -> None:
        wanted = set(DIRECTIONS) if direction == "both" else {direction}
        assert wanted <= set(DIRECTIONS), direction
        self._call(self._block(wanted)).result(10)

    def heal(self) -> None:
        self._call(self._block(set())).result(10)

    def drop(self) -> None:
        self._call(self._abort_all()).result(10)

    def cut_next(self, direction: str = "down") -> None:
        assert direction in DIRECTIONS
        self.cut.add(direction)

    # --- on the proxy's loop ---------------------------------------------------------

    def _call(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _listen(self) -> None:
        self._healed = asyncio.Event()
        self._healed.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._abort_all()

    async def _block(self, directions: set[str]) -> None:
        assert self._healed is not None
        self.blocked = directions
        if directions:
            self._healed.clear()
        else:
            self._healed.set()

    async def _abort_all(self) -> None:
        for pipe in list(self._pipes):
            pipe.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pipe = _Pipe(self, writer, up_writer)
        self._pipes.add(pipe)
        try:
            await asyncio.gather(pipe.pump(reader, up_writer, "up"), pipe.pump(up_reader, writer, "down"))
        finally:
            pipe.abort()
            self._pipes.discard(pipe)

    async def wait_healed(self, direction: str) -> None:
        assert self._healed is not None
        while direction in self.blocked:
            await self._healed.wait()


class _Pipe:
    """The two halves of one proxied connection."""

    def __init__(self, proxy: Proxy, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.writers = (client, server)
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        for w in self.writers:
            w.transport.abort()

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        proxy = self.proxy
        try:
            while not self.aborted:
                data = await reader.read(1 << 16)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                proxy.received[direction] += len(data)
                if proxy.delay_s:
                    await asyncio.sleep(proxy.delay_s)  # the injected latency itself
                await proxy.wait_healed(direction)
                if direction in proxy.cut:
                    proxy.cut.discard(direction)
                    writer.write(data[: max(1, len(data) // 2)])
                    await writer.drain()
                    self.abort()
                    return
                writer.write(data)
                proxy.forwarded[direction] += len(data)
                await writer.drain()
        except (ConnectionError, OSError):
            self.abort()
