"""The listener binds every address a host name stands for, all on one port (listener.py)."""

from __future__ import annotations

import asyncio
import socket

import pytest

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
