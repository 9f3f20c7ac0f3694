"""The listening sockets: accept connections, and refuse them cleanly when out of descriptors.

A host name can stand for several addresses (``localhost``: 127.0.0.1 and
::1): one socket is bound for each, on one port, as asyncio's create_server
does, so a client reaches the server whichever address it tries first.

uvloop's own server hides what happens at EMFILE: libuv accepts and closes
pending connections with a descriptor it holds in reserve, without a log
line, and if that trick fails uvloop closes the listener for good, silently.
Here the same trick is visible: a refused connection is closed at once (the
client sees the connection end), counted, and reported in a log line at most
once a second; when even the reserve is gone, accepting pauses briefly
instead of spinning on a listener that stays readable.

With TLS, a connection is a handshake in progress from the moment it is
accepted: it is counted (``handshaking``), and one that would take the count
to ``max_handshakes``, or that ``has_room`` (the server's --max-connections,
handshakes included) says does not fit, is closed at once, before any TLS
state is allocated for it; a handshake that has not finished within
``handshake_timeout`` is closed. So peers that connect and stall hold at most
``max_handshakes`` handshakes' memory and no more descriptors than
--max-connections allows.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections.abc import Callable
from ssl import SSLContext

import structlog

from . import defaults
from .tls import describe

log = structlog.get_logger("logd.server")

ACCEPT_BATCH = 64  # connections accepted per readiness callback, so other work is not starved
REFUSED_LOG_S = 1.0  # at most one accept_refused line per this many seconds
PAUSE_S = 0.1  # how long accepting pauses when no descriptor can be freed to refuse with
BIND_ATTEMPTS = 5  # tries to find an ephemeral port free on every address
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def _peer(conn: socket.socket) -> str:
    try:
        host, port = conn.getpeername()[:2]
    except OSError:
        return "?"
    return f"{host}:{port}"


def resolve(host: str, port: int) -> list[tuple[socket.AddressFamily, tuple[str, int]]]:
    """``(family, (address, port))`` of every address ``host`` stands for, in getaddrinfo's order, once each."""
    out: list[tuple[socket.AddressFamily, tuple[str, int]]] = []
    for family, _type, _proto, _name, addr in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        if family in (socket.AF_INET, socket.AF_INET6) and (family, addr[:2]) not in out:
            out.append((family, (str(addr[0]), int(addr[1]))))
    return out


def bind_all(addresses: list[tuple[socket.AddressFamily, tuple[str, int]]], backlog: int) -> list[socket.socket]:
    """A listening socket on each address, all on one port (port 0: the one the first socket got).

    With port 0 the port chosen for the first address may be taken on another
    one; then every socket is closed and binding starts again, a few times.
    """
    for attempt in range(BIND_ATTEMPTS):
        socks: list[socket.socket] = []
        try:
            for family, (host, port) in addresses:
                if socks and port == 0:
                    port = socks[0].getsockname()[1]
                # create_server sets IPV6_V6ONLY: :: and 0.0.0.0 can be bound side by side.
                sock = socket.create_server((host, port), family=family, backlog=backlog)
                sock.setblocking(False)
                socks.append(sock)
            return socks
        except OSError as exc:
            for sock in socks:
                sock.close()
            ephemeral_clash = exc.errno == errno.EADDRINUSE and socks and addresses[0][1][1] == 0
            if not ephemeral_clash or attempt == BIND_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _open_reserve() -> int:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


class Listener:
    """Listening TCP sockets (see `bind_all`) feeding accepted connections to ``protocol_factory``'s protocols."""

    def __init__(
        self,
        protocol_factory: Callable[[], asyncio.Protocol],
        sockets: list[socket.socket],
        ssl: SSLContext | None = None,
        on_handshake_failure: Callable[[str, str], None] | None = None,
        handshake_timeout: float = defaults.TLS_HANDSHAKE_TIMEOUT,
        max_handshakes: int = defaults.MAX_TLS_HANDSHAKES,
        has_room: Callable[[int], bool] | None = None,
    ) -> None:
        self._factory = protocol_factory
        # TLS (tls.py): the handshake runs inside connect_accepted_socket, before the protocol
        # sees the connection; a failed one is reported as (peer, reason), without a traceback.
        self._ssl = ssl
        self._on_handshake_failure = on_handshake_failure
        self._handshake_timeout = handshake_timeout
        self._max_handshakes = max_handshakes
        self._has_room = has_room  # called with `handshaking`: may one more connection start?
        self.handshaking = 0  # TLS handshakes in progress (each a connection, not yet the protocol's)
        self.handshakes_refused = 0  # connections closed before their handshake: no room
        self.sockets = sockets
        self._reserve = _open_reserve()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resume: asyncio.TimerHandle | None = None
        self._reading = False
        self._starting: set[asyncio.Task[None]] = set()  # held so a connection being set up is not collected
        self.refused = 0  # connections closed unserved for want of descriptors
        self._unreported = 0
        self._reported_at = 0.0

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """``(host, port)`` of each socket, the first one first."""
        return [(str(s.getsockname()[0]), int(s.getsockname()[1])) for s in self.sockets]

    @property
    def address(self) -> tuple[str, int]:
        """The first socket's ``(host, port)``: the one announced at start-up."""
        return self.addresses[0]

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for host, port in self.addresses:
            log.info("listening_on", host=host, port=port)
        self._read(True)

    def close(self) -> None:
        """Stop accepting and close the sockets (and the reserve descriptor)."""
        self._read(False)
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        for sock in self.sockets:
            sock.close()
        if self._reserve >= 0:
            os.close(self._reserve)
            self._reserve = -1

    def _read(self, on: bool) -> None:
        if self._loop is None or on == self._reading:
            return
        for sock in self.sockets:
            if sock.fileno() < 0:
                continue  # closed
            if on:
                self._loop.add_reader(sock.fileno(), self._accept, sock)
            else:
                self._loop.remove_reader(sock.fileno())
        self._reading = on

    def _accept(self, sock: socket.socket) -> None:
        assert self._loop is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    self._refuse_pending(sock, exc)
                else:
                    log.error("accept_failed", error=str(exc))
                    self._pause()
                return
            if self._ssl is not None:
                if self.handshaking >= self._max_handshakes or (
                    self._has_room is not None and not self._has_room(self.handshaking)
                ):
                    self._refuse_handshake(conn)
                    continue
                self.handshaking += 1  # until _serve ends: the handshake is over, one way or the other
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = self._loop.create_task(self._serve(conn))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    def _refuse_handshake(self, conn: socket.socket) -> None:
        """No room for another TLS connection: close it now (it cannot be told why in plain text)."""
        peer = _peer(conn)
        conn.close()
        self.handshakes_refused += 1
        if self._on_handshake_failure is not None:
            self._on_handshake_failure(peer, "refused: too many connections or TLS handshakes in progress")

    async def _serve(self, conn: socket.socket) -> None:
        assert self._loop is not None
        peer = _peer(conn)  # now: a failed handshake leaves the socket closed
        try:
            if self._ssl is None:
                await self._loop.connect_accepted_socket(self._factory, conn)
            else:
                try:
                    await self._loop.connect_accepted_socket(
                        self._factory, conn, ssl=self._ssl, ssl_handshake_timeout=self._handshake_timeout
                    )
                finally:
                    self.handshaking -= 1
        except (OSError, TimeoutError) as exc:  # ssl.SSLError included: a failed TLS handshake
            conn.close()
            if self._ssl is not None and self._on_handshake_failure is not None:
                self._on_handshake_failure(peer, describe(exc))
            else:
                log.warning("connection_setup_failed", peer=peer, error=str(exc))
        except Exception as exc:  # e.g. out of memory for the transport: drop this one, go on
            conn.close()
            log.warning("connection_setup_failed", error=str(exc))

    def _refuse_pending(self, sock: socket.socket, exc: OSError) -> None:
        """Out of descriptors: free the reserve one, accept and close every pending connection with it."""
        refused = 0
        if self._reserve >= 0:
            os.close(self._reserve)
            self._reserve = -1
            while True:
                try:
                    conn, _addr = sock.accept()
                except OSError:
                    break
                conn.close()
                refused += 1
            self._reserve = _open_reserve()
        self.refused += refused
        self._unreported += refused
        now = time.monotonic()
        if now - self._reported_at >= REFUSED_LOG_S:
            log.error(
                "accept_refused",
                error=os.strerror(exc.errno or 0),
                refused=self._unreported,
                refused_total=self.refused,
                hint="out of file descriptors: raise ulimit -n or lower --max-connections",
            )
            self._reported_at = now
            self._unreported = 0
        if not refused or self._reserve < 0:
            self._pause()  # nothing could be freed: do not spin on a readable listener

    def _pause(self) -> None:
        assert self._loop is not None
        self._read(False)
        if self._resume is None:
            self._resume = self._loop.call_later(PAUSE_S, self._unpause)

    def _unpause(self) -> None:
        self._resume = None
        if self._reserve < 0:
            self._reserve = _open_reserve()
        self._read(True)
