"""Issue 22's wrong answers, on real `logd serve` processes: each test fails on 0af9568.

- cursors past a log cut back by `logd check --repair` (or ending before them
  at open) are moved back, so their consumers read the ids handed out again;
- an EPOCHS file that is empty, cut short or does not match its CRC fails
  closed: the server starts read-only until ACCEPT;
- a follower whose --replica-of is its own address stops with a clear error.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from logd.client import Client
from logd.storage.cursors import FILE as CURSORS
from logd.storage.cursors import encode_line
from logd.storage.epochs import FILE as EPOCHS
from logd.storage.epochs import Epochs
from logd.storage.record import encode_record

from ..storage.helpers import flip_bit
from .conftest import RawConn, ServerProcess, wait_for
from .helpers import addr, head, logd_cli, send_msgs, stats, try_msg
from .proxy import Proxy


def _ask(srv: ServerProcess, *lines: bytes) -> list[bytes]:
    conn: RawConn = srv.connect(timeout=30)
    try:
        conn.send(b"".join(line + b"\r\n" for line in lines))
        return [conn.line() for _ in lines]
    finally:
        conn.close()


def _body(i: int) -> bytes:
    return b"old-%04d" % i


def _check(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "logd.cli", "check", *args, str(data_dir)],
                          capture_output=True, text=True, timeout=60)


# --- cursors past the end of the log -------------------------------------------------------


def test_repair_moves_cursors_back_so_their_consumer_reads_the_new_records(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server()
    with Client(srv.host, srv.port) as client:
        assert client.append(*[_body(i) for i in range(1, 301)])[-1] == 300
    assert _ask(srv, b"COMMIT app 300", b"COMMIT early 100") == [b"OK", b"OK"]
    assert srv.terminate() == 0
    segment = srv.data_dir / "00000000000000000001.log"
    offset = sum(len(encode_record(i, _body(i))) for i in range(1, 261))
    flip_bit(segment, offset + 20)  # record 261's body: 39 valid records follow, so it is corruption

    check = _check(srv.data_dir)
    assert check.returncode == 1
    assert "1 cursors past the last id 260 (app at 300); --repair moves them back" in check.stdout
    repair = _check(srv.data_dir, "--repair")
    assert "repair: CURSORS: 1 cursors moved back to 260 (app at 300)" in repair.stdout, repair.stdout

    again = start_server(data_dir=srv.data_dir)
    assert _ask(again, b"CURSOR app", b"CURSOR early") == [b"OK 260", b"OK 100"]  # app said 300
    with Client(again.host, again.port) as client:
        assert client.append(*[b"new-%04d" % i for i in range(261, 301)])[0] == 261
        assert client.read(261, 1)[0].body == b"new-0261"  # what the consumer reads next
    assert _ask(again, b"COMMIT app 260", b"COMMIT app 270") == [b"OK", b"OK"]  # it was STALE


def test_a_cursor_past_the_head_at_open_is_moved_back(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server()
    assert send_msgs(srv, [b"a"] * 10) == 10
    assert _ask(srv, b"COMMIT app 10") == [b"OK"]
    assert srv.terminate() == 0
    # What fsync=never can leave after a power cut: the cursor's line on disk, its records not.
    with open(srv.data_dir / CURSORS, "ab") as f:
        f.write(encode_line("app", 50) + encode_line("ahead", 40))
    again = start_server(data_dir=srv.data_dir)
    assert _ask(again, b"CURSOR app", b"CURSOR ahead") == [b"OK 10", b"OK 10"]
    assert "cursors_cut_back" in again.stderr()
    assert again.terminate() == 0
    assert "ahead 40" not in (srv.data_dir / CURSORS).read_text()  # rewritten, so it stays back


def test_a_follower_that_cuts_its_log_moves_its_cursors_back(start_server) -> None:  # type: ignore[no-untyped-def]
    a = start_server()  # asynchronous replication: a cursor may run ahead of a replica
    with Proxy(a.host, a.port) as to_b, Proxy(a.host, a.port) as to_c:
        b = start_server("--replica-of", to_b.address)
        c = start_server("--replica-of", to_c.address)
        assert send_msgs(a, [b"a"] * 100) == 100
        wait_for(lambda: head(b) == 100 and head(c) == 100, what="both followers hold 100")
        to_c.partition("both")
        assert send_msgs(a, [b"b"] * 50) == 150
        assert _ask(a, b"COMMIT app 150") == [b"OK"]
        wait_for(lambda: _ask(b, b"CURSOR app") == [b"OK 150"], what="B has the cursor")
        a.kill()
        to_c.drop()
        to_c.heal()
        assert logd_cli("promote", "--next-id", "101", addr(c)).returncode == 0
        assert send_msgs(c, [b"c"] * 10) == 110
        to_b.retarget(c.host, c.port)
        to_b.drop()
        wait_for(lambda: stats(b)["epoch"] == "1" and int(stats(b)["log_head"]) == 110,
                 what="B cut its log at 100 and follows C")
        assert _ask(b, b"CURSOR app") == [b"OK 100"]  # it said 150, past records 101..110 it must read
        assert "cursors_cut_back" in b.stderr()


# --- EPOCHS fails closed -------------------------------------------------------------------


def _lose_refused_line(text: bytes) -> bytes:
    # As an older logd wrote it, or a file cut short: no crc line, and here no `refused` line either.
    return b"".join(line + b"\n" for line in text.splitlines() if line != b"refused" and not line.startswith(b"crc"))


@pytest.mark.parametrize("damage", ["empty", "refused line lost", "crc mismatch"])
def test_a_damaged_epochs_file_starts_the_server_read_only(start_server, damage: str) -> None:  # type: ignore[no-untyped-def]
    srv = start_server()
    assert send_msgs(srv, [b"one", b"two"]) == 2
    assert logd_cli("demote", addr(srv)).returncode == 0  # REFUSE: durable, in EPOCHS
    assert srv.terminate() == 0
    path = srv.data_dir / EPOCHS
    text = path.read_bytes()
    assert b"refused\n" in text
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "refused line lost":
        path.write_bytes(_lose_refused_line(text))
    else:
        path.write_bytes(text.replace(b"refused\n", b""))  # the crc line stays, and no longer matches

    again = start_server(data_dir=srv.data_dir)
    assert stats(again)["role"] == "readonly"
    assert try_msg(again, b"x").startswith(b"ERR READONLY")  # it was OK 3: the REFUSE was lost
    assert "epochs_unverified" in again.stderr()
    assert logd_cli("promote", "--next-id", "3", addr(again)).returncode == 0  # the operator decides
    assert send_msgs(again, [b"three"]) == 3
    assert again.terminate() == 0
    loaded = Epochs.load(str(srv.data_dir))
    assert loaded.unverified is None and not loaded.refused


def test_logd_check_notes_an_epochs_file_it_cannot_verify(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server()
    assert send_msgs(srv, [b"one"]) == 1
    assert srv.terminate() == 0
    (srv.data_dir / EPOCHS).write_bytes(b"0 1\nseen 0\n")
    check = _check(srv.data_dir)
    assert check.returncode == 0, check.stdout
    assert "note: it does not end with its crc line" in check.stdout and "starts read-only" in check.stdout


# --- a follower of itself ------------------------------------------------------------------


def test_a_follower_pointed_at_its_own_address_stops_with_a_clear_error(start_server) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as probe:  # a free port for it to listen on and to name as its leader
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    srv = start_server("--replica-of", f"127.0.0.1:{port}", port=port)
    assert srv.port == port
    wait_for(lambda: srv.proc is not None and srv.proc.poll() is not None, timeout=60,
             what="the follower of itself to stop (it reported 'streaming' for ever)")
    assert srv.proc is not None and srv.proc.returncode == 4
    assert "would follow itself" in srv.stderr() and "Traceback" not in srv.stderr()
