"""Concurrency, backpressure and stop/crash behaviour of a real `logd serve`."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import psutil

from .conftest import ServerProcess, wait_for


def body_for(writer: int, seq: int, k: int) -> bytes:
    return b"w%03d-s%05d-k%d" % (writer, seq, k)


def run_writers(srv: ServerProcess, writers: int, rounds: int, stop: threading.Event | None = None,
                acked: dict[int, bytes] | None = None) -> dict[int, bytes]:
    """Each writer sends MSGs of 1-3 messages; returns acknowledged id -> body (filled as acks arrive)."""
    acked = {} if acked is None else acked
    lock = threading.Lock()
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            c = srv.connect()
            for seq in range(rounds):
                if stop is not None and stop.is_set():
                    break
                bodies = [body_for(w, seq, k) for k in range(seq % 3 + 1)]
                c.send(b"MSG " + b" ".join(b"%d" % len(b) for b in bodies) + b"\r\n"
                       + b"".join(b + b"\r\n" for b in bodies))
                try:
                    reply = c.line()
                except (ConnectionError, OSError):
                    break  # the server went away: what was acked is what counts
                assert reply.startswith(b"OK "), reply
                last = int(reply.split()[1])
                with lock:
                    for i, b in enumerate(bodies):
                        acked[last - len(bodies) + 1 + i] = b
            c.close()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return acked


def read_all(srv: ServerProcess, start: int, count: int) -> dict[int, bytes]:
    c = srv.connect()
    c.send(b"READ %d %d\r\n" % (start, count))
    assert c.line() == b"OK"
    out: dict[int, bytes] = {}
    while (r := c.record()) is not None:
        out[r[0]] = r[1]
    return out


def test_fifty_concurrent_writers_get_distinct_continuous_ids(server: ServerProcess) -> None:
    acked = run_writers(server, writers=50, rounds=40)
    ids = sorted(acked)
    assert ids == list(range(1, len(ids) + 1))  # distinct and continuous
    stored = read_all(server, 1, len(ids))
    assert stored == acked
    # Each writer's messages are in its own submission order.
    for w in range(50):
        mine = [i for i in ids if acked[i].startswith(b"w%03d" % w)]
        assert [acked[i] for i in mine] == sorted(acked[i] for i in mine)


def test_stalled_reader_does_not_grow_memory_or_block_others(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--fsync", "never")
    proc = psutil.Process(srv.pid)
    stalled = socket.create_connection((srv.host, srv.port))
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.sendall(b"READ 1\r\n")  # a tail that never reads
    live = srv.connect()
    live.send(b"READ 1\r\n")
    assert live.line() == b"OK"
    w = srv.connect()
    body = b"m" * 1000
    batch = b"MSG " + b" ".join([b"1000"] * 1000) + b"\r\n" + (body + b"\r\n") * 1000
    w.send(batch)
    assert w.line() == b"OK 1000"
    rss_before = proc.memory_info().rss
    total = 200  # 200 MB through the log while a reader is stalled
    received = 0
    for i in range(2, total + 1):
        w.send(batch)
        assert w.line() == b"OK %d" % (i * 1000)
        # The live tail keeps up: drain what it has so far.
        while received < (i - 1) * 1000:
            r = live.record()
            assert r is not None
            received += 1
    growth = proc.memory_info().rss - rss_before
    assert growth < 48 * 1024 * 1024, f"server RSS grew by {growth} bytes with a stalled reader"
    while received < total * 1000:
        r = live.record()
        assert r is not None and r[1] == body
        received += 1
    stalled.close()


def acked_while_stopped(srv: ServerProcess, stop_server: Callable[[], None]) -> dict[int, bytes]:
    """Run 8 busy writers, stop the server under them, return what was acknowledged."""
    stop = threading.Event()
    acked: dict[int, bytes] = {}
    t = threading.Thread(target=run_writers, args=(srv, 8, 100_000, stop, acked))
    t.start()
    wait_for(lambda: len(acked) > 500, what="writes to get going")
    stop_server()
    stop.set()
    t.join(timeout=60)
    return dict(acked)


def assert_all_stored(srv: ServerProcess, acked: dict[int, bytes]) -> None:
    """Every acknowledged message is stored intact, and ids are continuous up to the head."""
    c = srv.connect()
    c.send(b"HEAD\r\n")
    head = int(c.line().split()[1])
    assert head >= max(acked)
    stored = read_all(srv, 1, head)
    for i, b in acked.items():
        assert stored[i] == b
    assert sorted(stored) == list(range(1, head + 1))


def test_sigterm_while_writers_busy_loses_no_acknowledged_message(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server()
    acked = acked_while_stopped(srv, lambda: assert_exit_ok(srv.terminate(timeout=30)))
    assert_all_stored(start_server(data_dir=srv.data_dir), acked)


def test_sigkill_with_fsync_always_loses_no_acknowledged_message(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--fsync", "always")
    acked = acked_while_stopped(srv, srv.kill)
    assert_all_stored(start_server(data_dir=srv.data_dir), acked)


def assert_exit_ok(status: int) -> None:
    assert status == 0, f"server exited with {status}"


def test_sigterm_ends_tails_with_eof_and_drops_reads_queued_behind(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server()
    tail = srv.connect()
    tail.send(b"READ 1\r\nREAD 1\r\n")  # the second READ waits behind a tail that never ends
    assert tail.line() == b"OK"
    w = srv.connect()
    w.send(b"MSG 2\r\nhi\r\n")
    assert w.line() == b"OK 1"
    assert tail.record() == (1, b"hi")
    assert srv.terminate() == 0
    assert tail.record() is None  # +EOF ends the tail...
    assert tail.closed_by_peer()
    assert bytes(tail.buf) == b""  # ...and the queued READ was never started
