"""Issue 22, findings 6-10 and the partial lines: nothing unauthenticated or slow holds a real `logd serve`.

Each test plays the hostile peers of one finding against a real server and
then checks that a well-behaved client is still served. Memory is the
server's VmHWM (its peak resident set, /proc/<pid>/status) against its VmRSS
once warmed up, so a peak between two looks is not missed; descriptors and
threads come from /proc too. Waits are for states (a reply, a close, a
client let in), each with a generous deadline; no bound here is a time.
"""

from __future__ import annotations

import gzip
import os
import socket
import ssl
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest

from logd import errors
from logd.client import NO_RETRY, Client
from logd.storage.cursors import encode_line
from logd.tls import client_context

from .adversary import MiB, connect_small_window, drain, raise_nofile, readable, rss
from .conftest import RawConn, ServerProcess, new_token, wait_for
from .helpers import send_msgs, stats_of
from .test_metrics import metrics_url, scrape
from .test_tls import Certs, certs, tls_args  # noqa: F401  (certs: the module's certificates fixture)

SLACK = 48 * MiB  # allocator, parser and transport buffers, code paged in by the first requests
RESERVED_FDS = 56  # what logd keeps for itself beyond its connections (logd/fdlimit.py)


@pytest.fixture
def hold() -> Iterator[list[socket.socket]]:
    """Sockets closed when the test ends, pass or fail, before its servers are stopped."""
    socks: list[socket.socket] = []
    yield socks
    for sock in socks:
        sock.close()


def status(pid: int, key: str) -> int:
    """A number from /proc/<pid>/status (VmRSS, VmHWM in bytes; Threads as a count)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                value = int(line.split()[1])
                return value * 1024 if line.rstrip().endswith("kB") else value
    raise AssertionError(f"no {key} for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def warm_baseline(srv: ServerProcess, conn: RawConn) -> int:
    """RSS after a few round trips have paged in the paths the test exercises."""
    stats_of(conn)
    conn.send(b"PING\r\n")
    assert conn.line() == b"PONG"
    return rss(srv.pid)


def authed(srv: ServerProcess, token: str) -> RawConn:
    conn = srv.connect(timeout=30)
    conn.send(b"AUTH %s\r\n" % token.encode())
    assert conn.line() == b"OK"
    return conn


def pong_on_new(srv: ServerProcess) -> None:
    """A PING round trip on a new connection: accepted after every earlier one (the listener takes
    them in order), so the server has set those up and read what they had sent by the time it answers."""
    conn = srv.connect(timeout=60)
    try:
        conn.send(b"PING\r\n")
        assert conn.line() == b"PONG"
    finally:
        conn.close()


# --- finding 6: peers that never AUTH -------------------------------------------------------------


def test_connections_that_never_authenticate_are_closed_at_the_auth_deadline(  # type: ignore[no-untyped-def]
    start_server, tmp_path: Path, hold
) -> None:
    """20 sockets that only PING held --max-connections 20 for ever: a token holder got ERR BUSY."""
    auth_file = tmp_path / "auth"
    token = new_token(auth_file, "app", "write")
    srv = start_server("--auth-file", str(auth_file), "--max-connections", "20")  # --auth-timeout: 5 s
    squatters = []
    for _ in range(20):
        conn = srv.connect()
        hold.append(conn.sock)
        conn.send(b"PING\r\n")
        assert conn.line() == b"PONG"
        squatters.append(conn)
    late = srv.connect()
    assert late.line() == b"ERR BUSY too many connections"  # the 20 hold every slot
    late.close()

    def token_holder_served() -> bool:
        for conn in squatters:  # busy all along: activity does not put the deadline off
            try:
                conn.sock.send(b"PING\r\n")
            except OSError:
                pass
        conn = srv.connect()
        try:
            conn.send(b"AUTH %s\r\nPING\r\n" % token.encode())
            return conn.line() == b"OK" and conn.line() == b"PONG"
        except OSError:  # refused (ERR BUSY, then closed) and reset under our feet
            return False
        finally:
            conn.close()

    wait_for(token_holder_served, timeout=60, what="a token holder to be let in")
    for conn in squatters:
        data, closed = drain(conn.sock, timeout=30)
        lines = (bytes(conn.buf) + data).split(b"\r\n")
        assert closed and b"ERR TIMEOUT no successful AUTH within 5 s" in lines, lines[-3:]
        assert set(lines) <= {b"PONG", b"ERR TIMEOUT no successful AUTH within 5 s", b""}
    wait_for(lambda: "auth_timeout" in srv.stderr(), timeout=10, what="the auth_timeout log line")


def test_unauthenticated_msg_headers_reserve_no_input_budget(  # type: ignore[no-untyped-def]
    start_server, tmp_path: Path, hold, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two unauthenticated 8 MiB MSG headers reserved the whole 16 MiB input budget: an
    authenticated 4 MiB MSG waited for ever. The AUTH deadline is far off here: no part of this
    (set through the environment, which a server without the setting ignores)."""
    monkeypatch.setenv("LOGD_AUTH_TIMEOUT", "600")
    auth_file = tmp_path / "auth"
    token = new_token(auth_file, "app", "write")
    srv = start_server("--auth-file", str(auth_file), "--max-batch-bytes", "8MiB", "--server-input-bytes", "16MiB")
    header = b"MSG " + b" ".join([b"%d" % MiB] * 8) + b"\r\n"  # 8 MiB declared
    bodies = (b"x" * MiB + b"\r\n") * 8
    squatters = [srv.connect(timeout=30) for _ in range(2)]
    for conn in squatters:
        hold.append(conn.sock)
        conn.send(header + bodies[:1])  # the header and one byte, then nothing
    watcher = authed(srv, token)

    def headers_taken() -> bool:  # refused (an ERR is waiting) or, before, reserved in the budget
        return all(readable(c.sock) for c in squatters) or int(stats_of(watcher)["input_bytes"]) >= 16 * MiB

    wait_for(headers_taken, timeout=60, what="the server to take both MSG headers")
    writer = authed(srv, token)
    writer.sock.settimeout(60)  # the old server never read this MSG while the squatters held the budget
    writer.send(b"MSG " + b" ".join([b"%d" % MiB] * 4) + b"\r\n" + (b"w" * MiB + b"\r\n") * 4)
    assert writer.line() == b"OK 4"
    for conn in squatters:
        assert conn.line() == b"ERR DENIED authentication required"
    assert int(stats_of(watcher)["input_bytes"]) == 0
    # The refused MSG's bodies are read and dropped as they come; the stream stays framed.
    squatters[0].send(bodies[1:] + b"PING\r\n")
    assert squatters[0].line() == b"PONG"
    assert int(stats_of(watcher)["input_bytes"]) == 0 and int(stats_of(watcher)["head"]) == 4


# --- the partial lines: bounded before AUTH --------------------------------------------------------


def test_unauthenticated_partial_lines_hold_no_memory(start_server, tmp_path: Path, hold) -> None:  # type: ignore[no-untyped-def]
    """1,500 unauthenticated connections each sending 60 kB with no line end held +92 MB."""
    raise_nofile()
    auth_file = tmp_path / "auth"
    token = new_token(auth_file, "ops", "read")
    srv = start_server("--auth-file", str(auth_file), "--max-connections", "2000")
    watcher = authed(srv, token)
    base = warm_baseline(srv, watcher)
    socks = []
    for _ in range(1500):
        sock = socket.create_connection((srv.host, srv.port), timeout=30)
        hold.append(sock)
        socks.append(sock)
        try:
            sock.sendall(b"P" * 60_000)
        except OSError:
            pass  # the server closed it already: the line was over its limit before AUTH
    pong_on_new(srv)
    growth = status(srv.pid, "VmHWM") - base
    bound = 1500 * 4096 + SLACK  # a connection's objects and its 1 KiB line each, far under 60 kB each
    assert growth < bound, f"server peak RSS grew by {growth / MiB:.0f} MiB for 1,500 partial lines"
    for sock in socks:
        data, closed = drain(sock, timeout=30)
        assert closed and data == b"ERR TOO_LARGE command line over 1024 bytes before AUTH\r\n", data[:80]


# --- finding 7: TLS handshakes in progress --------------------------------------------------------


def partial_client_hello() -> bytes:
    """A real TLS ClientHello but for its last byte: the server holds TLS state for it, waiting."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    outgoing = ssl.MemoryBIO()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert len(hello) > 100
    return hello[:-1]


def test_tls_handshakes_count_as_connections_and_stalled_ones_hold_little(  # type: ignore[no-untyped-def]
    start_server, certs: Certs, hold  # noqa: F811
) -> None:
    """6,000 ClientHellos short of their last byte took RSS from 34 to 390 MB; 600 silent sockets took
    every descriptor under --max-connections 10. Here 3,000 of them, under --max-connections 40 (the
    cap on handshakes, 128 by default, is above it: tests/test_listener.py has that one)."""
    raise_nofile()
    srv = start_server(*tls_args(certs, client_certs=False), "--max-connections", "40")
    ctx = client_context(str(certs.ca))

    def real_client_served() -> dict[str, str] | None:
        try:
            with Client(srv.host, srv.port, ssl_context=ctx, timeout=10, retry=NO_RETRY) as client:
                assert client.ping()
                return {k: str(v) for k, v in client.stats().items()}
        except errors.ConnectionError:  # closed before its handshake: the slots were taken
            return None

    real_client_served()
    base = rss(srv.pid)
    hello = partial_client_hello()
    for _ in range(3000):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        hold.append(sock)
        sock.settimeout(30)
        try:
            sock.connect((srv.host, srv.port))
            sock.sendall(hello)
        except OSError:
            pass  # closed at once: no room for another handshake
    # A real client gets in (the stalled handshakes time out: --tls-handshake-timeout, 5 s)...
    figures = wait_for(real_client_served, timeout=60, what="a real TLS client to be served")
    # ... and the flood never held more than the handshakes allowed at once.
    growth = status(srv.pid, "VmHWM") - base
    bound = 40 * 256 * 1024 + SLACK  # a quarter MiB per handshake in progress is generous
    assert growth < bound, f"server peak RSS grew by {growth / MiB:.0f} MiB for 3,000 stalled handshakes"
    fds = open_fds(srv.pid)
    assert fds < 40 + RESERVED_FDS + 16, f"the server holds {fds} descriptors under --max-connections 40"
    assert int(figures["refused_handshakes"]) > 0 and int(figures["tls_handshakes"]) <= 40, figures
    wait_for(lambda: "tls_handshake_failed" in srv.stderr(), timeout=10, what="the refusals logged")


# --- finding 8: the metrics port -------------------------------------------------------------------


def test_metrics_requests_that_never_end_hold_no_threads_or_descriptors(start_server, hold) -> None:  # type: ignore[no-untyped-def]
    """385 requests whose headers never end held 382 threads and every descriptor."""
    raise_nofile()
    srv = start_server("--metrics-port", "0")  # --metrics-max-connections 8, --metrics-timeout 10 s
    url = metrics_url(srv)
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    scrape(url)
    threads = status(srv.pid, "Threads")
    socks = []
    for _ in range(385):
        sock = socket.create_connection((host, int(port)), timeout=30)
        hold.append(sock)
        socks.append(sock)
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: logd\r\n")  # the blank line never comes

    def scraped() -> dict | None:
        try:
            return scrape(url)
        except (urllib.error.URLError, OSError):  # 503 while the slots are taken
            return None

    samples = wait_for(scraped, timeout=60, what="a real scrape")
    # The real scrape was accepted after the 385: each of them has been accepted by now.
    assert status(srv.pid, "Threads") <= threads + 2, "a thread per request"
    fds = open_fds(srv.pid)
    assert fds < 8 + RESERVED_FDS + 16, f"the server holds {fds} descriptors"
    assert samples[("logd_connections", frozenset())] == 0
    assert send_msgs(srv, [b"after"]) == 1
    for sock in socks:  # 503 at once beyond the cap; the others closed at their deadline
        data, closed = drain(sock, timeout=60)
        assert closed and (data == b"" or data.startswith(b"HTTP/1.1 503 ")), data[:60]


def http(host: str, port: int, request: bytes) -> tuple[bytes, bytes]:
    """Send ``request`` on a new connection; return the response's head and body (the server closes)."""
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(request)
        data, closed = drain(sock, timeout=30)
    assert closed, data[:80]
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def test_metrics_endpoint_answers_each_request_once_and_closes(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--metrics-port", "0")
    host, port = metrics_url(srv).split("//")[1].split("/")[0].rsplit(":", 1)
    head, body = http(host, int(port), b"GET /metrics HTTP/1.1\r\nHost: logd\r\nAccept-Encoding: gzip\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Encoding: gzip" in head
    assert b"logd_info{" in gzip.decompress(body) and b"Content-Length: %d" % len(body) in head
    head, body = http(host, int(port), b"HEAD /metrics HTTP/1.0\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == b"" and b"Content-Length: 0" not in head
    head, _ = http(host, int(port), b"POST /metrics HTTP/1.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405 ")
    head, _ = http(host, int(port), b"GET /metrics HTTP/1.1\r\nX: " + b"x" * 9000)
    assert head.startswith(b"HTTP/1.1 431 ")
    head, _ = http(host, int(port), b"hello\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")


# --- findings 9 and 10: STATS, CURSORS and the metrics with many cursors -----------------------------


def with_cursors(start_server, cursors: dict[str, int], messages: int, *args: str) -> ServerProcess:  # type: ignore[no-untyped-def]
    """A server whose log holds ``messages`` messages and whose CURSORS file holds ``cursors``
    (written while it is stopped: committing them one by one is not what these tests are about)."""
    srv = start_server("--fsync", "never")
    assert send_msgs(srv, [b"m"] * messages) == messages
    assert srv.terminate() == 0
    (srv.data_dir / "CURSORS").write_bytes(b"".join(encode_line(name, id) for name, id in cursors.items()))
    return start_server("--fsync", "never", *args, data_dir=srv.data_dir)


def test_stats_and_cursors_with_60k_cursors_to_300_peers_that_never_read(start_server, hold) -> None:  # type: ignore[no-untyped-def]
    """With 60k cursors, 300 connections sending STATS and never reading took RSS from 41 to 328 MB
    under --server-output-bytes 64MiB (STATS had 120k cursor lines); the metrics page was 10 MiB."""
    raise_nofile()
    cursors = {f"c{i:05d}": i % 101 for i in range(60_000)}
    srv = with_cursors(start_server, cursors, 100, "--server-output-bytes", "16MiB", "--metrics-port", "0")
    other = srv.connect(timeout=60)
    base = warm_baseline(srv, other)
    bound = 16 * MiB + SLACK
    socks = [connect_small_window(srv) for _ in range(300)]
    hold.extend(socks)
    for sock in socks:
        sock.sendall(b"STATS\r\nCURSORS\r\n")

    def all_answered() -> bool:
        growth = rss(srv.pid) - base
        assert growth < bound, f"server RSS grew by {growth / MiB:.0f} MiB for 300 STATS"
        return all(readable(sock) for sock in socks)

    wait_for(all_answered, timeout=120, what="every STATS answered")
    pong_on_new(srv)
    growth = status(srv.pid, "VmHWM") - base
    assert growth < bound, f"server peak RSS grew by {growth / MiB:.0f} MiB for 300 STATS"
    # STATS: the totals, and the 100 most lagging (id 0: c00000, c00101, ...), by name.
    figures = stats_of(other)
    assert (figures["cursors"], figures["cursors_listed"], figures["cursors_max_lag"]) == ("60000", "100", "100")
    listed = sorted(name[len("cursor_"):-len("_id")] for name in figures if name.endswith("_id")
                    and name.startswith("cursor_"))
    assert listed == [f"c{i:05d}" for i in range(0, 101 * 100, 101)]
    assert len(figures) < 300
    # CURSORS: a bare one is refused (more than 1000), the pages give every cursor, once.
    other.send(b"CURSORS\r\nCURSORS 3 c59998\r\n")
    assert other.line() == (b"ERR TOO_LARGE 60000 cursors, more than 1000: list them a page at a time with "
                            b"CURSORS <limit> [<after>]")
    assert [other.line() for _ in range(2)] == [b"OK 1", b"c59999 %d" % (59999 % 101)]
    with Client(srv.host, srv.port, timeout=60) as client:
        assert client.cursors() == cursors
    # The metrics page names the same 100, with the totals.
    samples = scrape(metrics_url(srv))
    assert samples[("logd_cursors", frozenset())] == 60000
    assert samples[("logd_cursor_lag_max_messages", frozenset())] == 100
    assert len([key for key in samples if key[0] == "logd_cursor_id"]) == 100


def test_cursors_replies_wait_for_the_output_budget_then_go_on(start_server, hold) -> None:  # type: ignore[no-untyped-def]
    """CURSORS replies were made however much unsent output the server held: 10 connections that
    pipeline 500 CURSORS (70 kB each) and do not read held --conn-output-bytes each, past what the
    kernel takes (a loopback send buffer grows to 4 MiB: tcp_wmem)."""
    raise_nofile()
    cursors = {f"{i:04d}-" + "c" * 59: i % 51 for i in range(1000)}
    srv = with_cursors(start_server, cursors, 50, "--server-output-bytes", "2MiB", "--conn-output-bytes", "32MiB")
    reply = b"OK 1000\r\n" + b"".join(b"%s %d\r\n" % (name.encode(), id) for name, id in sorted(cursors.items()))
    other = srv.connect(timeout=60)
    base = warm_baseline(srv, other)
    socks = [connect_small_window(srv) for _ in range(10)]
    hold.extend(socks)
    for sock in socks:
        sock.sendall(b"CURSORS\r\n" * 500)
    pong_on_new(srv)  # a PING on another connection is answered meanwhile
    # Once the peers that never read are gone, the replies that waited go on, whole and in order.
    readers = socks[:2]
    for sock in socks[2:]:
        sock.close()
    got = {sock: bytearray() for sock in readers}
    want = reply * 500
    for sock in readers:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MiB)

    def all_read() -> bool:
        for sock, data in got.items():
            if len(data) < len(want) and readable(sock):
                chunk = sock.recv(1 << 20)
                assert chunk, "closed by the server"
                data += chunk
        return all(len(data) >= len(want) for data in got.values())

    wait_for(all_read, timeout=120, what="every CURSORS reply")
    assert all(data == want for data in got.values())
    growth = status(srv.pid, "VmHWM") - base
    bound = 2 * MiB + SLACK
    assert growth < bound, f"server peak RSS grew by {growth / MiB:.0f} MiB under --server-output-bytes 2MiB"


def test_a_peer_that_never_reads_its_stats_does_not_starve_the_stats_of_others(  # type: ignore[no-untyped-def]
    start_server, hold
) -> None:
    """A peer pipelining STATS without reading holds the server's output budget; a connection whose
    peer reads (nothing unsent) still gets its STATS: it adds one bounded reply, not a queue."""
    srv = start_server("--server-output-bytes", "1", "--conn-output-bytes", "64KiB")
    hog = connect_small_window(srv)
    hold.append(hog)
    hog.sendall(b"STATS\r\n" * 20_000)  # its replies wait in the server: the budget stays over
    reader = srv.connect(timeout=60)
    wait_for(lambda: int(stats_of(reader)["output_bytes"]) > 1, what="the output budget held by the hog")
    for _ in range(3):  # again and again, not once by luck
        assert int(stats_of(reader)["connections"]) == 2
