"""The listener binds every address a host name stands for, all on one port (listener.py)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable

import pytest
import trustme

from logd.listener import Listener, bind_all, resolve


def can_bind_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        return False
    return True


def two_loopback_addresses() -> list[tuple[socket.AddressFamily, tuple[str, int]]]:
    """127.0.0.1 and ::1, as ``localhost`` resolves on most machines; 127.0.0.2 where ::1 cannot be bound."""
    second = "::1" if can_bind_ipv6_loopback() else "127.0.0.2"
    return resolve("127.0.0.1", 0) + resolve(second, 0)


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert isinstance(self.transport, asyncio.Transport)
        self.transport.write(data)


async def test_every_address_is_bound_on_one_port_and_served() -> None:
    addresses = two_loopback_addresses()
    listener = Listener(Echo, bind_all(addresses, backlog=16))
    listener.start()
    try:
        bound = listener.addresses
        assert [host for host, _port in bound] == [host for _family, (host, _port) in addresses]
        assert bound[0][1] != 0 and bound[0][1] == bound[1][1]
        for host, port in bound:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"hello " + host.encode())
            assert await asyncio.wait_for(reader.readexactly(len(host) + 6), 10) == b"hello " + host.encode()
            writer.close()
    finally:
        listener.close()
    assert all(sock.fileno() < 0 for sock in listener.sockets)


def test_resolve_keeps_every_address_of_a_name_once() -> None:
    want = {(family, addr[:2]) for family, _t, _p, _n, addr in
            socket.getaddrinfo("localhost", 7000, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)}
    got = resolve("localhost", 7000)
    assert len(got) == len(set(got)) and set(got) == want


def test_a_failed_bind_closes_the_sockets_already_bound() -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        port = taken.getsockname()[1]
        addresses = resolve("127.0.0.2", port) + resolve("127.0.0.1", port)
        with pytest.raises(OSError):
            bind_all(addresses, backlog=16)
        # The first socket (127.0.0.2) was closed: its address and port can be bound again.
        socket.create_server(("127.0.0.2", port)).close()
    finally:
        taken.close()


async def until(cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Let the loop run until ``cond`` holds; fail after ``timeout`` s (a condition with a deadline)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_tls_handshakes_in_progress_are_counted_capped_and_timed_out() -> None:
    """Issue 22, finding 7: a handshake counts from accept on; past the cap, or with no room, a
    connection is closed before its handshake starts; a stalled one is closed at its deadline."""
    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    failures: list[str] = []
    room = [True]
    seen: list[int] = []

    def has_room(handshaking: int) -> bool:
        seen.append(handshaking)
        return room[0]

    listener = Listener(Echo, bind_all(resolve("127.0.0.1", 0), backlog=16), ssl=server_ctx,
                        on_handshake_failure=lambda peer, why: failures.append(why),
                        handshake_timeout=1.0, max_handshakes=3, has_room=has_room)
    listener.start()
    host, port = listener.address
    silent = []
    try:
        silent = [socket.create_connection((host, port)) for _ in range(5)]
        await until(lambda: listener.handshaking + listener.handshakes_refused == 5, "five connections accepted")
        assert (listener.handshaking, listener.handshakes_refused) == (3, 2)
        assert seen == [0, 1, 2]  # asked with the handshakes before it; not asked past the cap
        # The three stall, and are closed at their deadline: the slots come back.
        await until(lambda: listener.handshaking == 0, "the stalled handshakes to time out")
        assert len(failures) == 5 and all("refused" in why for why in failures[:2])
        reader, writer = await asyncio.open_connection(host, port, ssl=client_ctx, server_hostname="127.0.0.1")
        writer.write(b"hi")
        assert await asyncio.wait_for(reader.readexactly(2), 10) == b"hi"
        writer.close()
        # No room (the server's --max-connections): closed before any handshake.
        room[0] = False
        with pytest.raises((ConnectionError, ssl.SSLError)):
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=client_ctx, server_hostname="127.0.0.1"), 10)
            await asyncio.wait_for(reader.read(), 10)
        assert listener.handshakes_refused == 3
    finally:
        listener.close()
        for sock in silent:
            sock.close()
