"""Issue 29: a tail never outlives its peer for long, and a half-closed reader keeps its tail.

A client that exits sends a FIN, as a reader that half-closes does (``nc``
at the end of its input). The server keeps a half-closed connection's tail
going and sends it an empty line between records after 5 s without output
(protocol.md 3.1, "Half-close"); a peer that has gone entirely answers that
with a reset, and the server releases the connection. Nothing is appended
while the tests wait: on a quiet log nothing else would ever be written.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time

import pytest

from .adversary import connect_small_window
from .conftest import RawConn, ServerProcess, wait_for
from .helpers import head, read_all, send_msgs, stats_of, url_of

TAILS = 50
RELEASED_WITHIN_S = 20.0  # issue 29's bound; the server's is 5 s of silence, then one or two sweeps

# A client process: the Python client's tail, up to the head, then it waits for the test and exits.
CHILD = r"""
import os, sys
import logd
url, last = sys.argv[1], int(sys.argv[2])
client = logd.connect(url)
for record in client.tail(1):
    if record.id == last:
        print("at-head", flush=True)
        sys.stdin.read()
        os._exit(0)  # the process ends: its kernel closes the socket with a FIN
"""


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def counts(ctl: RawConn) -> tuple[int, int, int]:
    s = stats_of(ctl)
    return int(s["connections"]), int(s["tails"]), int(s["half_closed"])


def line_with_deadline(proc: subprocess.Popen[bytes], deadline: float) -> bytes:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
    return proc.stdout.readline() if ready else b""


@pytest.mark.parametrize("build", ["c", "python"])
def test_tails_of_exited_clients_are_released_on_an_idle_log(start_server, monkeypatch, build: str) -> None:  # type: ignore[no-untyped-def]
    """50 Python-client tails at the head of an idle log, their processes exit: all released within 20 s,
    with no append (before: all held until the next append; 300 held 323 descriptors for over 70 s)."""
    monkeypatch.setenv("LOGD_NO_EXTENSIONS", "1" if build == "python" else "0")
    srv: ServerProcess = start_server()
    last = send_msgs(srv, [b"m%d" % i for i in range(1, 101)])
    assert len(read_all(srv, 1, last)) == last  # the segment's read descriptor is now open (in the baseline)
    ctl = srv.connect(timeout=60)
    wait_for(lambda: counts(ctl) == (1, 0, 0), what="only the control connection")
    baseline = descriptors(srv.pid)
    children = [
        subprocess.Popen([sys.executable, "-c", CHILD, url_of(srv), str(last)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE)
        for _ in range(TAILS)
    ]
    try:
        deadline = time.monotonic() + 180
        for child in children:
            assert line_with_deadline(child, deadline) == b"at-head\n"
        wait_for(lambda: int(stats_of(ctl)["waiting_tails"]) == TAILS, what="every tail parked at the head")
        assert counts(ctl) == (1 + TAILS, TAILS, 0)
        for child in children:
            assert child.stdin is not None
            child.stdin.close()
        for child in children:
            assert child.wait(timeout=60) == 0
        # From here on nothing is appended: only the probe can tell the server its peers are gone.
        wait_for(lambda: counts(ctl) == (1, 0, 0) and descriptors(srv.pid) == baseline,
                 timeout=RELEASED_WITHIN_S, what="every exited client's connection released")
        assert head(srv) == last
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


def record_skipping_empty_lines(conn: RawConn) -> tuple[tuple[int, bytes] | None, int]:
    """The next record (None at +EOF) and how many empty lines came before it."""
    empty = 0
    while True:
        line = conn.line()
        if line == b"":
            empty += 1
            continue
        if line == b"+EOF":
            return None, empty
        rid, length, _crc = line[1:].split(b" ")
        body = conn.exact(int(length))
        assert conn.exact(2) == b"\r\n"
        return (int(rid), body), empty


def test_a_half_closed_reader_keeps_its_tail_and_skips_empty_lines(start_server) -> None:  # type: ignore[no-untyped-def]
    """``nc``-style: READ, shutdown(SHUT_WR), keep reading. The tail goes on (before: it ended with
    +EOF at the next commit); while the log is idle it gets empty lines, and it is not released."""
    srv: ServerProcess = start_server()
    send_msgs(srv, [b"first"])
    ctl = srv.connect(timeout=60)
    reader = srv.connect(timeout=60)
    reader.send(b"READ 1\r\n")
    reader.sock.shutdown(socket.SHUT_WR)
    assert reader.line() == b"OK"
    assert record_skipping_empty_lines(reader) == ((1, b"first"), 0)
    assert reader.line() == b""  # the log is idle: a probe, which the reader skips
    assert counts(ctl) == (2, 1, 1)  # still there
    for i in range(2, 5):
        send_msgs(srv, [b"m%d" % i, b"n%d" % i])
        for rid in (2 * i - 2, 2 * i - 1):
            rec, _empty = record_skipping_empty_lines(reader)
            assert rec is not None and rec[0] == rid
        # send_msgs's own connection counts until it has gone (its EOF, then its close).
        wait_for(lambda: counts(ctl) == (2, 1, 1), what="the reader still there, alone")
    reader.close()  # now it has gone entirely: released, with nothing appended
    wait_for(lambda: counts(ctl) == (1, 0, 0), timeout=RELEASED_WITHIN_S, what="the closed reader released")


def test_a_half_closed_finite_read_gets_its_records_then_the_server_closes(start_server) -> None:  # type: ignore[no-untyped-def]
    """``READ 1 3`` then EOF, with one record committed: the read waits for the other two, ends with +EOF,
    and the server closes (before: +EOF at the first commit after the EOF, with what it had)."""
    srv: ServerProcess = start_server()
    send_msgs(srv, [b"a"])
    reader = srv.connect(timeout=60)
    reader.send(b"READ 1 3\r\n")
    reader.sock.shutdown(socket.SHUT_WR)
    assert reader.line() == b"OK" and reader.record() == (1, b"a")
    send_msgs(srv, [b"b"])
    send_msgs(srv, [b"c", b"d"])
    got = [record_skipping_empty_lines(reader)[0] for _ in range(3)]
    assert got == [(2, b"b"), (3, b"c"), None]
    assert reader.closed_by_peer()


def test_throttled_tails_of_closed_clients_are_released(start_server) -> None:  # type: ignore[no-untyped-def]
    """Tails waiting for room in the server's output budget (held by a client that pipelines STATS and
    never reads) whose clients close: released within 20 s, although their stream never writes."""
    srv: ServerProcess = start_server("--server-output-bytes", "1", "--conn-output-bytes", "64KiB")
    send_msgs(srv, [b"x" * 1000] * 50)
    ctl = srv.connect(timeout=60)
    hog = socket.socket()
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.connect((srv.host, srv.port))
    hog.sendall(b"STATS\r\n" * 20_000)  # its replies wait in the server: the output budget stays over
    wait_for(lambda: int(stats_of(ctl)["output_bytes"]) > 1, what="the output budget held by the hog")
    tails = [srv.connect(timeout=60) for _ in range(5)]
    for t in tails:
        t.send(b"READ 1\r\n")
        assert t.line() == b"OK"
    wait_for(lambda: counts(ctl)[1] == 5 and int(stats_of(ctl)["waiting_tails"]) == 0,
             what="five tails running, none at the head")
    for t in tails:
        t.close()
    wait_for(lambda: counts(ctl) == (2, 0, 0), timeout=RELEASED_WITHIN_S, what="the closed tails released")
    hog.close()


def test_write_paused_tails_of_closed_clients_are_released(start_server) -> None:  # type: ignore[no-untyped-def]
    """Tails whose clients stopped reading (their output waits in the server), half-closed, then closed:
    released. Their unread bytes make the close a reset, which the server sees while it waits to write."""
    srv: ServerProcess = start_server("--conn-output-bytes", "64KiB")
    send_msgs(srv, [b"y" * 60_000] * 100)
    ctl = srv.connect(timeout=60)
    stuck = [connect_small_window(srv) for _ in range(3)]
    for sock in stuck:
        sock.sendall(b"READ 1\r\n")
        sock.shutdown(socket.SHUT_WR)
    wait_for(lambda: counts(ctl) == (4, 3, 3) and int(stats_of(ctl)["output_bytes"]) > 0,
             what="three half-closed tails with output waiting")
    for sock in stuck:
        sock.close()
    wait_for(lambda: counts(ctl) == (1, 0, 0), timeout=RELEASED_WITHIN_S, what="the stuck tails released")
