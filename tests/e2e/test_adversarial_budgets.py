"""Issue 12, findings 4-7: memory budgets of a real `logd serve` under clients that never finish or never read.

Memory is the server's VmRSS (/proc/<pid>/status), measured against a
baseline taken after start; bounds are what the budget flags guarantee plus
generous slack (Python's allocator keeps memory; page cache is not RSS).
Clients that stop reading get a small receive window, so what they leave
unread stays in the server rather than in the kernel.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from .adversary import (
    MiB,
    connect_small_window,
    drain,
    peek_reply,
    push_until_stalled,
    raise_nofile,
    read_stream,
    rss,
)
from .conftest import RawConn, ServerProcess, wait_for
from .helpers import stats_of

SLACK = 48 * MiB  # allocator, parser and transport buffers, code paged in by the first requests


@pytest.fixture
def hold() -> Iterator[list[socket.socket]]:
    """Sockets closed when the test ends, pass or fail, before its servers are stopped
    (a server stopping with unread tails waits for them)."""
    socks: list[socket.socket] = []
    yield socks
    for sock in socks:
        sock.close()


def fill_log(srv: ServerProcess, messages: int) -> RawConn:
    """Append ``messages`` 1 MiB messages in one MSG; return the (open) writer connection."""
    w = srv.connect()
    w.send(b"MSG " + b" ".join([b"%d" % MiB] * messages) + b"\r\n" + (b"r" * MiB + b"\r\n") * messages)
    assert w.line() == b"OK %d" % messages
    return w


def warm_baseline(srv: ServerProcess, conn: RawConn) -> int:
    """RSS after a few round trips have paged in the paths the test exercises."""
    stats_of(conn)
    conn.send(b"PING\r\n")
    assert conn.line() == b"PONG"
    return rss(srv.pid)


def test_msgs_behind_a_waiting_read_stop_being_read(start_server, hold) -> None:  # type: ignore[no-untyped-def]
    """Finding 4: 1 MiB MSGs pipelined behind `READ 1000000000` were buffered without limit."""
    srv = start_server("--conn-input-bytes", "16MiB")
    other = srv.connect()
    base = warm_baseline(srv, other)
    c = srv.connect()
    hold.append(c.sock)
    c.send(b"READ 1000000000\r\n")
    assert c.line() == b"OK"
    msg = b"MSG %d\r\n" % MiB + b"m" * MiB + b"\r\n"
    offered = 400 * len(msg)
    [sent] = push_until_stalled([c.sock], msg, [offered])
    growth = rss(srv.pid) - base
    assert growth < 100 * MiB, f"server RSS grew by {growth / MiB:.0f} MiB for {sent / MiB:.0f} MiB of queued MSGs"
    assert sent < offered, "the server never stopped reading the connection"
    other.send(b"PING\r\nHEAD\r\n")  # the others are served; nothing behind the READ was appended
    assert other.line() == b"PONG"
    assert other.line() == b"OK 0"


def test_closed_tails_count_against_max_connections_until_flushed(start_server, hold) -> None:  # type: ignore[no-untyped-def]
    """Finding 5: a tail that sent CLOSE and never read left the count but kept its buffer."""
    raise_nofile()
    srv = start_server("--fsync", "never", "--max-connections", "20", "--conn-output-bytes", "1MiB")
    writer = fill_log(srv, 8)  # stays open: it is one of the 20
    base = warm_baseline(srv, writer)
    accepted, refused = [], []
    for _ in range(40):
        sock = connect_small_window(srv)
        hold.append(sock)
        try:
            sock.sendall(b"READ 1\r\n")
        except OSError:
            pass  # refused and already closed: its ERR BUSY is still there to read
        first = peek_reply(sock)
        if first == b"OK":
            sock.sendall(b"CLOSE\r\n")  # the tail is running: end it, then never read
            accepted.append(sock)
        else:
            refused.append((sock, first))
    growth = rss(srv.pid) - base
    assert len(accepted) == 19, (
        f"{len(accepted)} tails accepted with --max-connections 20 and 1 writer (RSS grew {growth / MiB:.0f} MiB)"
    )
    assert all(first.startswith(b"ERR BUSY ") for _, first in refused), [first for _, first in refused]
    bound = 20 * (1 * MiB + MiB) + SLACK  # output budget + one read chunk each
    assert growth < bound, f"server RSS grew by {growth / MiB:.0f} MiB"
    writer.send(b"PING\r\n")
    assert writer.line() == b"PONG"


def kernel_bytes_per_connection() -> int:
    """The most the kernel can hold of one loopback connection's stream: the sender's send buffer
    and the receiver's receive buffer, each at its autotuning maximum (tcp_wmem, tcp_rmem)."""
    total = 0
    for name in ("tcp_wmem", "tcp_rmem"):
        with open(f"/proc/sys/net/ipv4/{name}") as f:
            total += int(f.read().split()[2])
    return total


def test_partial_msgs_are_bounded_server_wide(start_server, hold) -> None:  # type: ignore[no-untyped-def]
    """Finding 6: partial MSGs were capped per connection only (~61 MiB each)."""
    clients, kernel = 12, kernel_bytes_per_connection()
    # Bodies big enough that the clients offer more than the server's budget and every kernel
    # buffer on the way can take (hosts that raise tcp_rmem/tcp_wmem hold far more than the
    # defaults): a server that stops reading leaves some of it unsent, whatever the host.
    size = 24 * MiB
    while True:
        budget = max(64 * MiB, size)  # --server-input-bytes may not be under --max-batch-bytes
        most_sent = budget + clients * MiB + clients * kernel  # + one read chunk each
        if clients * (size - MiB) > most_sent:
            break
        size += MiB
    srv = start_server("--max-message-bytes", str(size), "--max-batch-bytes", str(size),
                       "--server-input-bytes", str(budget))
    other = srv.connect()
    base = warm_baseline(srv, other)
    socks = [srv.connect().sock for _ in range(clients)]
    hold.extend(socks)
    for sock in socks:
        sock.sendall(b"MSG %d\r\n" % size)
    # Each sends all but the last MiB of its body, and never the rest.
    sent = push_until_stalled(socks, b"p" * MiB, [size - MiB] * clients)
    growth = rss(srv.pid) - base
    bound = budget + clients * MiB + SLACK  # the server-wide budget + one read chunk each
    assert growth < bound, f"server RSS grew by {growth / MiB:.0f} MiB holding {sum(sent) / MiB:.0f} MiB of bodies"
    assert sum(sent) <= most_sent, (
        f"the server read {sum(sent) / MiB:.0f} MiB of partial bodies ({kernel / MiB:.0f} MiB of kernel buffers"
        f" per connection, a {budget / MiB:.0f} MiB budget)")
    other.send(b"PING\r\nHEAD\r\n")
    assert other.line() == b"PONG"
    assert other.line() == b"OK 0"


def test_stalled_tails_hold_their_budget_then_are_dropped(start_server, hold) -> None:  # type: ignore[no-untyped-def]
    """Finding 7: tails that stop reading held ~5 MiB each and were never dropped."""
    raise_nofile()
    tails, budget = 100, 256 * 1024
    # A sweep a second; a dropped tail's peer has another 4 s to come back for its ERR BUSY.
    srv = start_server("--fsync", "never", "--conn-output-bytes", "256KiB", "--tail-stall-timeout", "4")
    ctl = fill_log(srv, 8)
    base = warm_baseline(srv, ctl)
    socks = [connect_small_window(srv) for _ in range(tails)]
    hold.extend(socks)
    for sock in socks:
        sock.sendall(b"READ 1\r\n")
    for sock in socks:
        assert peek_reply(sock) == b"OK"
    bound = tails * (budget + MiB) + SLACK  # output budget + one read chunk each
    peak = 0
    seen: dict[str, str] = {}

    def dropped_or_over() -> bool:
        nonlocal peak
        peak = max(peak, rss(srv.pid) - base)
        seen.update(stats_of(ctl))
        return peak > bound or seen["tails"] == "0"

    # Until the stall timeout drops them (tails 0), watch that RSS stays bounded.
    wait_for(dropped_or_over, timeout=30, what="the stalled tails to be dropped")
    assert peak < bound, f"server RSS grew by {peak / MiB:.0f} MiB with {tails} stalled tails"
    # The last tail's peer comes back after a sweep has passed since every tail was dropped
    # (before, that sweep reset it, with ERR BUSY unsent): it reads whole records from id 1,
    # ERR BUSY after them, then EOF.
    dropped_by = int(seen["sweeps"])
    wait_for(lambda: int(stats_of(ctl)["sweeps"]) > dropped_by, timeout=30, what="a sweep after the drops")
    last = socks[-1]
    last.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MiB)
    data, closed = drain(last, timeout=30)
    conn = RawConn(last)
    conn.buf = bytearray(data)
    assert conn.line() == b"OK"
    next_id, line = read_stream(conn, 1)
    assert line.startswith(b"ERR BUSY "), line
    assert next_id > 1 and not conn.buf and closed
    # The others go on reading nothing: a stall timeout after their drop they are reset, and
    # their buffers freed (only ctl is left).
    wait_for(lambda: stats_of(ctl)["connections"] == "1", timeout=30, what="the dropped tails to be reset")
    wait_for(lambda: "stall" in srv.stderr().lower(), timeout=10, what="a log line about the stalled tail")
