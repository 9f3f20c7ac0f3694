"""Cursors on a real full disk (issue 22, finding 1): a COMMIT is OK only once its whole line is written.

Each test mounts a small tmpfs as the server's data dir (tests/fulldisk.py),
fills it to the brim, and checks on a real server that no COMMIT answered OK
is lost, across a kill -9 and a restart.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from logd.storage.cursors import FILE, encode_line
from tests.e2e.conftest import RawConn, ServerProcess, wait_for
from tests.e2e.helpers import read_all
from tests.fulldisk import PAGE, fill, tmpfs


def _ask(conn: RawConn, line: bytes) -> bytes:
    conn.send(line + b"\r\n")
    return conn.line()


def _cursors(srv: ServerProcess) -> dict[str, int]:
    conn = srv.connect(timeout=30)
    try:
        conn.send(b"CURSORS\r\n")
        first = conn.line()
        assert first.startswith(b"OK "), first
        lines = [conn.line().decode().split(" ") for _ in range(int(first.split()[1]))]
        return {name: int(id) for name, id in lines}
    finally:
        conn.close()


def test_a_commit_the_full_disk_would_cut_is_an_error_and_nothing_acknowledged_is_lost(  # type: ignore[no-untyped-def]
    start_server, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "disk", "8m") as disk:
        srv = start_server(data_dir=disk)  # fsync=always: OK after the sync that covers the line
        conn = srv.connect(timeout=30)
        assert _ask(conn, b"MSG 1\r\nx") == b"OK 1"
        # Lines "<name> 1 <crc>\n" are len(name) + 12 bytes: 53 of 76 and one of 58 end the
        # file 10 bytes short of its first page, so the next 76-byte line needs a second page.
        names = [f"c{i:063d}" for i in range(53)] + ["p" * 46]
        for name in names:
            assert _ask(conn, b"COMMIT %s 1" % name.encode()) == b"OK"
        assert (disk / FILE).stat().st_size == PAGE - 10
        filler = fill(disk)

        torn = "t" * 64
        reply = _ask(conn, b"COMMIT %s 1" % torn.encode())
        assert reply.startswith(b"ERR UNAVAILABLE "), reply  # was OK, with 10 bytes of it on disk
        assert (disk / FILE).stat().st_size == PAGE - 10  # the 10 bytes were cut: the file ends a whole line
        assert _ask(conn, b"CURSOR %s" % torn.encode()) == b"OK 0"
        assert _ask(conn, b"PING") == b"PONG"

        filler.unlink()  # space again: the next COMMITs are whole lines after the last whole one
        assert _ask(conn, b"COMMIT after 1") == b"OK"
        assert _ask(conn, b"COMMIT %s 1" % torn.encode()) == b"OK"
        conn.close()
        want = dict.fromkeys([*names, "after", torn], 1)
        assert _cursors(srv) == want

        srv.kill()  # kill -9: what was acknowledged under fsync=always is on disk
        data = (disk / FILE).read_bytes()
        assert data.endswith(encode_line("after", 1) + encode_line(torn, 1))
        again = start_server(data_dir=disk)
        assert _cursors(again) == want
        assert "cursor_lines_skipped" not in again.stderr()
        again.terminate()


def test_msg_and_commit_run_to_a_full_disk_lose_no_acknowledged_cursor(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with tmpfs(tmp_path / "disk", "20m") as disk:
        reserve = disk / "reserve"  # freed before the restart: recovery rewrites the active index
        reserve.write_bytes(bytes(1 << 20))
        srv = start_server(data_dir=disk)
        acked_msgs: dict[int, bytes] = {}
        msg_errors: list[bytes] = []
        full = threading.Event()
        stop = threading.Event()
        killing = threading.Event()

        def write() -> None:
            # 8 KiB bodies, 16 MSGs in flight, until the disk is full and a while after.
            conn = srv.connect(timeout=60)
            sent: list[bytes] = []
            k = 0
            try:
                while not stop.is_set():
                    while len(sent) - len(acked_msgs) - len(msg_errors) < 16:
                        body = b"%08d" % k + b"m" * 8184
                        k += 1
                        sent.append(body)
                        conn.send(b"MSG %d\r\n%s\r\n" % (len(body), body))
                    reply = conn.line()
                    body = sent[len(acked_msgs) + len(msg_errors)]
                    if reply.startswith(b"OK "):
                        acked_msgs[int(reply.split()[1])] = body
                    else:
                        assert reply.startswith(b"ERR UNAVAILABLE "), reply
                        msg_errors.append(reply)
                        full.set()
            except ConnectionError:
                assert killing.is_set()  # the kill -9 below, and nothing else, ends the connection
            finally:
                conn.close()

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        # One committer, 200 cursors in turn, each moved to the newest acknowledged id.
        acked: dict[str, int] = {}
        tried: dict[str, int] = {}
        replies = {b"OK": 0, b"ERR": 0}
        conn = srv.connect(timeout=60)
        deadline = time.monotonic() + 300
        k = after_full = 0
        while after_full < 2000 and time.monotonic() < deadline:
            name, id = f"consumer-{k % 200:04d}", max(acked_msgs, default=0)
            k += 1
            tried[name] = id
            reply = _ask(conn, b"COMMIT %s %d" % (name.encode(), id))
            if reply == b"OK":
                acked[name] = max(acked.get(name, 0), id)
            else:
                assert reply.startswith(b"ERR UNAVAILABLE "), reply
            replies[reply[:3] if reply != b"OK" else b"OK"] += 1
            after_full += full.is_set()
        conn.close()
        assert full.is_set(), "the disk never filled up"
        assert replies[b"ERR"] > 0 and replies[b"OK"] > 0, replies  # both sides of a full page were met
        killing.set()
        srv.kill()  # with MSGs still in flight
        stop.set()
        writer.join(60)
        assert not writer.is_alive()

        reserve.unlink()
        again = start_server(data_dir=disk)
        got = _cursors(again)
        for name, id in acked.items():
            assert id <= got.get(name, 0) <= tried[name], (name, id, got.get(name))
        last = max(acked_msgs)
        records = dict(read_all(again, 1, last))
        assert all(records[i] == body for i, body in acked_msgs.items())
        wait_for(lambda: again.proc is not None and again.proc.poll() is None, what="the server to run")
        again.terminate()
