"""Helpers for the hostile-client tests (issue 12): raw sockets with deadlines, server RSS, pushing until stalled.

A hostile client stops reading, or makes the server stop reading from it, so
every helper here works with non-blocking sockets and a deadline: a plain
``sendall`` or ``recv`` would block the test forever.
"""

from __future__ import annotations

import resource
import select
import socket
import time

import crc32c

from .conftest import RawConn, ServerProcess

MiB = 1 << 20


def record(id: int, body: bytes) -> bytes:
    """A record exactly as the server streams it (protocol.md section 1)."""
    return b"+%d %d %08x\r\n" % (id, len(body), crc32c.crc32c(body)) + body + b"\r\n"


def raise_nofile() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit; a server started afterwards inherits it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss(pid: int) -> int:
    """Resident set size of a process in bytes (VmRSS of /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def connect_small_window(srv: ServerProcess, rcvbuf: int = 4096) -> socket.socket:
    """A connection whose receive window stays small, so what it does not read stays in the server."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: it sets the window scale
    sock.connect((srv.host, srv.port))
    return sock


def readable(sock: socket.socket, timeout: float = 0.0) -> bool:
    """Whether ``sock`` has bytes (or EOF) to read within ``timeout`` s (poll: any fd number)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def writable(sock: socket.socket, timeout: float = 0.0) -> bool:
    """Whether ``sock`` can take more bytes within ``timeout`` s."""
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(max(0, int(timeout * 1000))))


def drain(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Read until the server closes or ``timeout`` s pass; return (bytes, closed by the server)."""
    sock.setblocking(False)
    deadline = time.monotonic() + timeout
    data = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(data), False
        if not readable(sock, left):
            continue
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            continue
        except ConnectionResetError:
            return bytes(data), True
        if not chunk:
            return bytes(data), True
        data += chunk


def peek_reply(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """The first reply line waiting on ``sock``, without consuming it (b"" if closed or reset first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not readable(sock, deadline - time.monotonic()):
            continue
        try:
            data = sock.recv(256, socket.MSG_PEEK)
        except (ConnectionResetError, BrokenPipeError):
            return b""
        if not data or b"\r\n" in data:
            return data.split(b"\r\n", 1)[0]
    raise AssertionError("no reply within the deadline")


def push_until_stalled(socks: list[socket.socket], unit: bytes, totals: list[int], stall_s: float = 1.5,
                       timeout: float = 30.0) -> list[int]:
    """Send ``unit`` over and over on every socket at once, totals[i] bytes on socks[i],
    until done or no byte moved for ``stall_s``; return the bytes sent on each.

    A server that stops reading a connection makes its sends stall once the
    kernel buffers are full; the test process never holds more than ``unit``.
    """
    for s in socks:
        s.setblocking(False)
    view = memoryview(unit)
    sent = [0] * len(socks)
    index = {s.fileno(): i for i, s in enumerate(socks)}
    last_progress = time.monotonic()
    deadline = last_progress + timeout
    while time.monotonic() < deadline:
        pending = [s for i, s in enumerate(socks) if sent[i] < totals[i]]
        if not pending:
            break
        poller = select.poll()
        for s in pending:
            poller.register(s, select.POLLOUT)
        for fd, _ in poller.poll(50):
            s, i = socks[index[fd]], index[fd]
            off = sent[i] % len(unit)
            try:
                sent[i] += s.send(view[off : off + min(len(unit) - off, totals[i] - sent[i])])
            except BlockingIOError:
                continue
            last_progress = time.monotonic()
        if time.monotonic() - last_progress > stall_s:
            break
    return sent


def read_stream(conn: RawConn, first_id: int) -> tuple[int, bytes]:
    """Read records with consecutive ids from ``first_id`` until a non-record line; return (next id, that line)."""
    expect = first_id
    while True:
        head = conn.line()
        if not head.startswith(b"+") or head == b"+EOF":
            return expect, head
        rid, length, crc = head[1:].split(b" ")
        assert int(rid) == expect, (rid, expect)
        body = conn.exact(int(length))
        assert conn.exact(2) == b"\r\n"
        assert int(crc, 16) == crc32c.crc32c(body)
        expect += 1
