"""Every command and every error code, over real sockets against `logd serve`."""

from __future__ import annotations

import resource
import signal
import socket
import subprocess
import sys

import crc32c

from logd.listener import resolve

from .conftest import RawConn, ServerProcess
from .helpers import first_after_a_retention_pass


def rec(id: int, body: bytes) -> bytes:
    return b"+%d %d %08x\r\n" % (id, len(body), crc32c.crc32c(body)) + body + b"\r\n"


def test_ping_head_msg_read(server: ServerProcess) -> None:
    c = server.connect()
    c.send(b"PING\r\n")
    assert c.line() == b"PONG"
    c.send(b"HEAD\r\n")
    assert c.line() == b"OK 0"
    c.send(b"MSG 5\r\nhello\r\n")
    assert c.line() == b"OK 1"
    c.send(b"MSG 3 5\r\nabc\r\nworld\r\n")
    assert c.line() == b"OK 3"
    c.send(b"head\r\n")  # verbs are case-insensitive
    assert c.line() == b"OK 3"
    c.send(b"READ 2 2\r\n")
    assert c.line() == b"OK"
    assert c.exact(len(rec(2, b"abc") + rec(3, b"world"))) == rec(2, b"abc") + rec(3, b"world")
    assert c.line() == b"+EOF"
    # The connection takes commands again after a finite READ.
    c.send(b"PING\r\n")
    assert c.line() == b"PONG"


def test_host_localhost_is_served_on_each_of_its_addresses(start_server) -> None:  # type: ignore[no-untyped-def]
    # Review finding: only getaddrinfo's first address was bound (127.0.0.1, not ::1).
    # Here localhost may stand for 127.0.0.1 alone; tests/test_listener.py covers two addresses.
    srv = start_server("--host", "localhost")
    for family, (host, _port) in resolve("localhost", srv.port):
        c = RawConn(socket.create_connection((host, srv.port), timeout=10))
        c.send(b"PING\r\n")
        assert c.line() == b"PONG", (family, host)
        c.close()


def test_bare_lf_for_people_typing(server: ServerProcess) -> None:
    c = server.connect()
    c.send(b"MSG 2\nhi\nHEAD\n")
    assert c.line() == b"OK 1"
    assert c.line() == b"OK 1"


def test_binary_bodies_round_trip(server: ServerProcess) -> None:
    bodies = [b"\r\n", b"\x00\xff\r\n\r\n", b"", b"MSG 5\r\n", bytes(range(256))]
    c = server.connect()
    c.send(b"MSG " + b" ".join(b"%d" % len(b) for b in bodies) + b"\r\n" + b"".join(b + b"\r\n" for b in bodies))
    assert c.line() == b"OK %d" % len(bodies)
    c.send(b"READ 1 %d\r\n" % len(bodies))
    assert c.line() == b"OK"
    got = [c.record() for _ in bodies]
    assert got == [(i + 1, b) for i, b in enumerate(bodies)]
    assert c.record() is None


def test_pipelined_commands_reply_in_order(server: ServerProcess) -> None:
    c = server.connect()
    n = 2000
    c.send(b"".join(b"MSG 3\r\nm%02d\r\nPING\r\n" % (i % 100) for i in range(n)) + b"HEAD\r\n")
    for i in range(n):
        assert c.line() == b"OK %d" % (i + 1)
        assert c.line() == b"PONG"
    assert c.line() == b"OK %d" % n


def test_tail_receives_messages_written_after_it_started(server: ServerProcess) -> None:
    tail = server.connect()
    tail.send(b"READ 1\r\n")
    assert tail.line() == b"OK"
    w = server.connect()
    for i in range(1, 6):
        w.send(b"MSG 4\r\nm-%02d\r\n" % i)
        assert w.line() == b"OK %d" % i
        assert tail.record() == (i, b"m-%02d" % i)
    tail.send(b"CLOSE\r\n")
    assert tail.line() == b"+EOF"
    assert tail.line() == b"OK"
    assert tail.closed_by_peer()


def test_tail_resumes_from_checkpoint(server: ServerProcess) -> None:
    w = server.connect()
    w.send(b"MSG 1 1 1 1 1\r\na\r\nb\r\nc\r\nd\r\ne\r\n")
    assert w.line() == b"OK 5"
    checkpoint = 3  # a consumer that processed ids 1..3
    t = server.connect()
    t.send(b"READ %d\r\n" % (checkpoint + 1))
    assert t.line() == b"OK"
    assert t.record() == (4, b"d")
    assert t.record() == (5, b"e")
    w.send(b"MSG 1\r\nf\r\n")
    assert w.line() == b"OK 6"
    assert t.record() == (6, b"f")


def test_read_beyond_head_waits_for_those_ids(server: ServerProcess) -> None:
    r = server.connect()
    r.send(b"READ 3 1\r\n")
    assert r.line() == b"OK"
    w = server.connect()
    w.send(b"MSG 1 1 1\r\nx\r\ny\r\nz\r\n")
    assert w.line() == b"OK 3"
    assert r.record() == (3, b"z")
    assert r.record() is None


def test_stats_lists_figures(server: ServerProcess) -> None:
    c = server.connect()
    c.send(b"MSG 2\r\nab\r\nSTATS\r\n")
    assert c.line() == b"OK 1"
    head = c.line()
    assert head.startswith(b"OK ")
    n = int(head.split()[1])
    stats = dict(c.line().decode().split(" ", 1) for _ in range(n))
    for name in ("version", "head", "first", "segments", "bytes", "connections", "tails",
                 "appended_messages", "appended_bytes", "fsyncs", "fsync_p50_us", "fsync_p99_us",
                 "fsync_policy", "uptime_s"):
        assert name in stats, name
    assert stats["head"] == "1"
    assert stats["fsync_policy"] == "always"
    assert int(stats["fsyncs"]) >= 1


def test_unknown_command_and_bad_format_keep_connection(server: ServerProcess) -> None:
    c = server.connect()
    c.send(b"BOGUS 1 2\r\n")
    assert c.line().startswith(b"ERR UNKNOWN_COMMAND ")
    c.send(b"READ 0\r\n")
    assert c.line().startswith(b"ERR BAD_FORMAT ")
    c.send(b"READ x\r\n")
    assert c.line().startswith(b"ERR BAD_FORMAT ")
    c.send(b"HEAD extra\r\n")
    assert c.line().startswith(b"ERR BAD_FORMAT ")
    c.send(b"PING\r\n")
    assert c.line() == b"PONG"


def test_msg_with_lying_length_line_is_fatal(server: ServerProcess) -> None:
    c = server.connect()
    c.send(b"MSG 3\r\nabcdef\r\n")  # body not followed by CRLF: cannot be framed
    assert c.line().startswith(b"ERR BAD_FORMAT ")
    assert c.closed_by_peer()
    c2 = server.connect()
    c2.send(b"MSG abc\r\n")
    assert c2.line().startswith(b"ERR BAD_FORMAT ")
    assert c2.closed_by_peer()
    # Nothing partial was stored.
    c3 = server.connect()
    c3.send(b"HEAD\r\n")
    assert c3.line() == b"OK 0"


def test_too_large_message_and_batch_are_skipped(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--max-message-bytes", "10", "--max-batch", "3", "--max-batch-bytes", "25")
    c = srv.connect()
    c.send(b"MSG 11\r\n" + b"x" * 11 + b"\r\n")
    assert c.line().startswith(b"ERR TOO_LARGE ")
    c.send(b"MSG 1 1 1 1\r\na\r\nb\r\nc\r\nd\r\n")
    assert c.line().startswith(b"ERR TOO_LARGE ")
    c.send(b"MSG 10 10 10\r\n" + (b"z" * 10 + b"\r\n") * 3)  # 30 bytes > max-batch-bytes
    assert c.line().startswith(b"ERR TOO_LARGE ")
    c.send(b"MSG 10\r\n" + b"y" * 10 + b"\r\n")  # still framed: the next MSG works
    assert c.line() == b"OK 1"


def test_too_long_line_is_fatal(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--max-line-bytes", "1024")
    c = srv.connect()
    c.send(b"PING" + b" " * 2000)
    assert c.line().startswith(b"ERR TOO_LARGE ")
    assert c.closed_by_peer()


def test_not_found_before_oldest_retained_id(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--segment-bytes", "1000", "--retention-bytes", "2000")
    c = srv.connect()
    body = b"z" * 100
    for _ in range(10):
        c.send(b"MSG 100 100 100\r\n" + (body + b"\r\n") * 3)
        c.line()
    first = first_after_a_retention_pass(srv)
    assert first > 1, "retention never deleted a segment"
    c.send(b"READ 1 1\r\n")
    reply = c.line()
    assert reply.startswith(b"ERR NOT_FOUND ")
    assert str(first).encode() in reply
    c.send(b"READ %d 1\r\n" % first)
    assert c.line() == b"OK"
    assert c.record()[0] == first  # type: ignore[index]


def test_shutdown_denied_without_flag(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server()
    c = srv.connect()
    c.send(b"SHUTDOWN\r\n")
    assert c.line().startswith(b"ERR DENIED ")
    c.send(b"PING\r\n")
    assert c.line() == b"PONG"


def test_shutdown_allowed_stops_gracefully(server: ServerProcess) -> None:
    c = server.connect()
    c.send(b"MSG 1\r\nq\r\nSHUTDOWN\r\n")
    assert c.line() == b"OK 1"
    assert c.line() == b"OK"
    assert server.proc is not None
    assert server.proc.wait(timeout=20) == 0


def test_busy_when_too_many_connections(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--max-connections", "2")
    a, b = srv.connect(), srv.connect()
    a.send(b"PING\r\n")
    b.send(b"PING\r\n")
    assert a.line() == b"PONG" and b.line() == b"PONG"
    c = srv.connect()
    assert c.line().startswith(b"ERR BUSY ")
    assert c.closed_by_peer()
    a.send(b"PING\r\n")
    assert a.line() == b"PONG"


def test_idle_timeout_closes_idle_connections_not_tails(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--idle-timeout", "1")
    tail = srv.connect()
    tail.send(b"READ 1\r\n")
    assert tail.line() == b"OK"
    idle = srv.connect()
    assert idle.line().startswith(b"ERR TIMEOUT ")
    assert idle.closed_by_peer()
    w = srv.connect()
    w.send(b"MSG 1\r\nk\r\n")
    assert w.line() == b"OK 1"
    assert tail.record() == (1, b"k")


def test_unavailable_on_disk_full_and_log_stays_consistent(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A real server whose file size limit (RLIMIT_FSIZE) plays a full disk."""
    limit = 64 * 1024

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    srv = ServerProcess(tmp_path / "d", [], preexec=small_disk).start()
    try:
        c = srv.connect()
        body = b"d" * 1000
        acked = 0
        error = b""
        for _ in range(200):
            c.send(b"MSG 1000\r\n" + body + b"\r\n")
            reply = c.line()
            if reply.startswith(b"ERR"):
                error = reply
                break
            acked = int(reply.split()[1])
        assert error.startswith(b"ERR UNAVAILABLE "), error
        assert acked > 0
        c.send(b"HEAD\r\n")
        assert c.line() == b"OK %d" % acked
        c.send(b"READ 1 %d\r\n" % acked)
        assert c.line() == b"OK"
        for i in range(1, acked + 1):
            assert c.record() == (i, body)
        assert c.record() is None
        # A message that fits still goes in after the failure, with the next id.
        c.send(b"MSG 1\r\nx\r\nHEAD\r\n")
        assert c.line() == b"OK %d" % (acked + 1)
        assert c.line() == b"OK %d" % (acked + 1)
    finally:
        srv.terminate()


def test_second_server_on_a_held_data_dir_is_refused_naming_the_holder(server: ServerProcess) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "logd.cli", "serve", "--port", "0", "--data-dir", str(server.data_dir)],
        capture_output=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 3  # start-up failed
    assert f"pid {server.pid}".encode() in proc.stderr
    assert b"Traceback" not in proc.stderr


def test_preallocate_flag_and_default(start_server) -> None:  # type: ignore[no-untyped-def]
    # Default with fsync=always: zeros written ahead while running, cut at a
    # graceful stop; --no-preallocate: the file is always exactly the records.
    for args, ahead in (((), True), (("--no-preallocate",), False), (("--fsync", "never", "--preallocate"), True)):
        srv = start_server(*args)
        c = srv.connect()
        c.send(b"MSG 5\r\nhello\r\n")
        assert c.line() == b"OK 1"
        segment = srv.data_dir / "00000000000000000001.log"
        size = segment.stat().st_size
        assert (size > len(rec(1, b"hello"))) is ahead
        assert segment.read_bytes()[len(rec(1, b"hello")) :] == bytes(size - len(rec(1, b"hello")))
        c.close()
        assert srv.terminate() == 0
        assert segment.read_bytes() == rec(1, b"hello")
