"""Issue 13, against real `logd serve` processes: damage on disk, descriptors running out, bad input.

Each test reproduces one finding of the issue and fails on the code before it.
Descriptor exhaustion is real: the child's RLIMIT_NOFILE is lowered from
here with ``prlimit(2)`` (or set before exec) so its next open fails EMFILE.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from logd.client import Client, Consumer, FileCheckpoint
from logd.errors import CorruptRecordError
from logd.storage.record import encode_record

from ..storage.helpers import flip_bit, log_files
from .conftest import ServerProcess, wait_for
from .helpers import addr, stats_of, url_of

SEGMENT = "64KiB"
BODY = 1000


def body_of(id: int) -> bytes:
    return (b"%d:" % id).ljust(BODY, b"m")


def fill(srv: ServerProcess, count: int) -> None:
    with Client(srv.host, srv.port) as client:
        for first in range(1, count + 1, 50):
            ids = client.append(*[body_of(i) for i in range(first, min(count, first + 49) + 1)])
            assert ids[0] == first


def serve_cmd(data_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "logd.cli", "serve", "--port", "0", "--data-dir", str(data_dir),
            "--log-level", "warning", *args]


def refused_start(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `logd serve` expecting it to refuse to start (it must exit by itself)."""
    return subprocess.run(serve_cmd(data_dir, *args), capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


def logd_check(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "logd.cli", "check", *args, str(data_dir)],
                          capture_output=True, text=True, timeout=60)


def record_offset(path: Path, id: int) -> int:
    first = int(path.name[:20])
    return sum(len(encode_record(i, body_of(i))) for i in range(first, id))


def lowest_free_fd(pid: int) -> int:
    used = {int(n) for n in os.listdir(f"/proc/{pid}/fd")}
    return min(set(range(len(used) + 1)) - used)


class NoMoreDescriptors:
    """Lower a running child's RLIMIT_NOFILE so its next open(2)/accept(2) fails with EMFILE."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.saved = resource.prlimit(pid, resource.RLIMIT_NOFILE)

    def __enter__(self) -> NoMoreDescriptors:
        resource.prlimit(self.pid, resource.RLIMIT_NOFILE, (lowest_free_fd(self.pid), self.saved[1]))
        return self

    def __exit__(self, *exc: object) -> None:
        resource.prlimit(self.pid, resource.RLIMIT_NOFILE, self.saved)


# --- finding 1: corruption is not a torn tail -------------------------------------------------


@pytest.mark.parametrize("where", ["a third in", "first record"])
def test_corrupt_active_segment_refuses_to_start_and_repair_keeps_the_bytes(
    start_server, tmp_path: Path, where: str  # type: ignore[no-untyped-def]
) -> None:
    srv = start_server("--segment-bytes", SEGMENT)
    fill(srv, 300)
    assert srv.terminate() == 0
    active = log_files(srv.data_dir)[-1]
    first = int(active.name[:20])
    count = 300 - first + 1
    bad = first + (count // 3 if where == "a third in" else 0)
    offset = record_offset(active, bad)
    flip_bit(active, offset + 40)  # inside the body: the CRC no longer matches
    active.with_suffix(".idx").write_bytes(b"")  # the active index is never synced: a power cut can empty it
    before = active.read_bytes()

    result = refused_start(srv.data_dir)
    assert result.returncode == 6, result.stderr
    assert "Traceback" not in result.stderr
    message = result.stderr
    assert f"{active}: bad record at offset {offset} (id {bad}), followed by {300 - bad} valid records" in message
    assert "logd check --repair" in message
    assert active.read_bytes() == before  # refusing changed nothing

    check = logd_check(srv.data_dir)
    assert check.returncode == 1
    expect = f"{active}: offset {offset}: id {bad}: bad record: crc mismatch; {300 - bad} valid records follow"
    assert expect in check.stdout

    repair = logd_check(srv.data_dir, "--repair")
    assert f"({300 - bad} valid records," in repair.stdout
    assert Path(f"{active}.broken").read_bytes() == before[offset:]  # kept, not deleted
    again = ServerProcess(srv.data_dir, [], port=0).start()
    try:
        with Client(again.host, again.port) as client:
            assert client.head() == bad - 1
    finally:
        assert again.terminate() == 0


def test_truncated_active_segment_after_a_clean_stop_refuses_to_start(start_server) -> None:  # type: ignore[no-untyped-def]
    # Cut at a record boundary, acknowledged records vanish without a trace but the saved head.
    srv = start_server("--segment-bytes", SEGMENT)
    fill(srv, 100)
    assert srv.terminate() == 0
    active = log_files(srv.data_dir)[-1]
    os.truncate(active, record_offset(active, 98))
    result = refused_start(srv.data_dir)
    assert result.returncode == 6, result.stderr
    assert "closed cleanly at id 100 but its records end at id 97" in result.stderr
    assert "Traceback" not in result.stderr
    check = logd_check(srv.data_dir)
    assert check.returncode == 1 and "ids 98..100 lost to damage" in check.stdout


# --- findings 2 and 3: out of descriptors -----------------------------------------------------


def test_out_of_descriptors_when_waking_a_tail_does_not_kill_the_writer(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server()
    tail = srv.connect()
    tail.send(b"READ 1\r\n")
    assert tail.line() == b"OK"
    writer = srv.connect()
    writer.send(b"PING\r\n")
    assert writer.line() == b"PONG"
    with NoMoreDescriptors(srv.pid):
        writer.send(b"MSG 5\r\nhello\r\n")
        assert writer.line() == b"OK 1"
        line = tail.line()  # waking the tail opens the segment: EMFILE
        assert line.startswith(b"ERR UNAVAILABLE cannot open"), line
        writer.send(b"MSG 5\r\nworld\r\n")
        assert writer.line() == b"OK 2"  # the commit path lives on
    tail.send(b"READ 1 2\r\n")
    assert tail.line() == b"OK"
    assert [tail.record(), tail.record(), tail.record()] == [(1, b"hello"), (2, b"world"), None]
    assert srv.terminate() == 0
    assert "stream_read_failed" in srv.stderr() and "Traceback" not in srv.stderr()


def test_read_out_of_descriptors_is_an_err_reply_and_the_connection_lives(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server()
    fill(srv, 3)
    assert srv.terminate() == 0
    srv = start_server(data_dir=srv.data_dir)  # no segment opened for reading yet
    conn = srv.connect()
    conn.send(b"PING\r\n")
    assert conn.line() == b"PONG"
    with NoMoreDescriptors(srv.pid):
        conn.send(b"READ 1 3\r\n")
        assert conn.line() == b"OK"
        line = conn.line()
        assert line.startswith(b"ERR UNAVAILABLE"), line
        conn.send(b"PING\r\n")
        assert conn.line() == b"PONG"
    conn.send(b"READ 3 1\r\n")
    assert conn.line() == b"OK"
    assert conn.record() == (3, body_of(3))
    assert srv.terminate() == 0
    err = srv.stderr()
    assert "Exception ignored" not in err and "Traceback" not in err


def test_out_of_descriptors_on_accept_refuses_with_one_log_line(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server()
    with NoMoreDescriptors(srv.pid):
        refused = [srv.connect() for _ in range(5)]
        for conn in refused:
            assert conn.closed_by_peer()  # closed at once, not left hanging
        wait_for(lambda: "accept_refused" in srv.stderr(), 10, "the accept_refused line")
    with Client(srv.host, srv.port) as client:  # accepting goes on once descriptors are free
        assert int(client.stats()["refused_connections"]) >= 5
    assert srv.terminate() == 0
    assert srv.stderr().count("accept_refused") <= 2  # rate-limited: one line a second at most


def _limit_child(soft: int, hard: int):  # type: ignore[no-untyped-def]
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_soft_descriptor_limit_is_raised_to_the_hard_limit(tmp_path: Path) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    srv = ServerProcess(tmp_path / "d", [], preexec=_limit_child(256, hard)).start()
    try:
        assert resource.prlimit(srv.pid, resource.RLIMIT_NOFILE)[0] == hard
    finally:
        assert srv.terminate() == 0


def test_max_connections_is_fitted_to_a_low_hard_limit(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "d", [], preexec=_limit_child(128, 128)).start()
    try:
        # The asking connection stays open: one closed would count until the server
        # noticed, which races with the connections below.
        ctl = srv.connect()
        room = int(stats_of(ctl)["max_connections"])
        assert 0 < room < 128
        conns = [srv.connect() for _ in range(room + 10)]
        answers = []
        for conn in conns:
            conn.send(b"PING\r\n")
            answers.append(conn.line())
        assert set(answers) <= {b"PONG", b"ERR BUSY too many connections"}
        assert answers.count(b"PONG") == room - 1  # the budget holds: nobody hit EMFILE
        for conn in [ctl, *conns]:
            conn.close()
    finally:
        assert srv.terminate() == 0
    assert "max_connections_lowered" in srv.stderr()


def test_descriptor_limit_too_low_for_logd_refuses_to_start(tmp_path: Path) -> None:
    result = subprocess.run(serve_cmd(tmp_path / "d"), capture_output=True, text=True, timeout=30,
                            preexec_fn=_limit_child(32, 32), stdin=subprocess.DEVNULL)
    assert result.returncode == 3
    assert "descriptor limit (ulimit -n) is 32" in result.stderr and "Traceback" not in result.stderr


# --- finding 4: REPLICATE over a corrupt record ------------------------------------------------


def test_replicate_whose_previous_record_is_corrupt_gets_an_err_reply(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--segment-bytes", SEGMENT)
    fill(srv, 100)
    assert srv.terminate() == 0
    closed = log_files(srv.data_dir)[0]
    flip_bit(closed, record_offset(closed, 10) + 40)  # closed segments are not scanned at start
    srv = start_server("--segment-bytes", SEGMENT, data_dir=srv.data_dir)
    conn = srv.connect()
    conn.send(b"REPLICATE 11 %08x\r\n" % 0x12345678)
    line = conn.line()
    assert line.startswith(b"ERR UNAVAILABLE cannot check prev_crc: this server's record 10 is corrupt"), line
    conn.send(b"PING\r\n")
    assert conn.line() == b"PONG"
    assert srv.terminate() == 0
    assert "replica_start_corrupt" in srv.stderr() and "Traceback" not in srv.stderr()


# --- finding 5: a MSG length of 19 digits ------------------------------------------------------


def test_msg_length_of_19_digits_is_bad_format_and_closes(server: ServerProcess) -> None:
    conn = server.connect()
    conn.send(b"MSG 1000000000000000000\r\n")
    assert conn.line() == b"ERR BAD_FORMAT MSG length of 19 or more digits: the stream cannot be framed"
    assert conn.closed_by_peer()


# --- finding 8: a consumer gets past a corrupt record in a closed segment -------------------------


def test_consumer_skips_a_corrupt_record_only_when_told(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--segment-bytes", SEGMENT)
    fill(srv, 100)
    assert srv.terminate() == 0
    closed = log_files(srv.data_dir)[0]
    flip_bit(closed, record_offset(closed, 10) + 40)
    srv = start_server("--segment-bytes", SEGMENT, data_dir=srv.data_dir)
    url = url_of(srv)
    for _ in range(2):  # every attempt stops at the same record
        strict = Consumer(url, FileCheckpoint(tmp_path / "strict.ckpt"), follow=False)
        with pytest.raises(CorruptRecordError) as caught:
            for _batch in strict:
                strict.commit()
        assert caught.value.id == 10
    lenient = Consumer(url, FileCheckpoint(tmp_path / "lenient.ckpt"), follow=False, skip_corrupt=True)
    seen = [r.id for batch in lenient for r in batch]
    assert seen == [i for i in range(1, 101) if i != 10]
    assert lenient.commit() == 100


def test_follower_over_a_corrupt_leader_record_reports_why_it_cannot_follow(start_server) -> None:  # type: ignore[no-untyped-def]
    leader = start_server("--segment-bytes", SEGMENT)
    fill(leader, 100)
    follower = start_server("--replica-of", addr(leader))
    with Client(follower.host, follower.port) as client:
        wait_for(lambda: client.stats()["log_head"] == "100", 30, "the follower to catch up")
    assert follower.terminate() == 0
    with Client(leader.host, leader.port) as client:  # id 100 ends up in a closed segment
        client.append(*[body_of(i) for i in range(101, 151)])
        client.append(*[body_of(i) for i in range(151, 201)])
    assert leader.terminate() == 0
    path = [p for p in log_files(leader.data_dir) if int(p.name[:20]) <= 100][-1]
    assert path != log_files(leader.data_dir)[-1]
    flip_bit(path, record_offset(path, 100) + 40)
    leader = start_server("--segment-bytes", SEGMENT, data_dir=leader.data_dir, port=leader.port)
    follower = start_server("--replica-of", addr(leader), data_dir=follower.data_dir)
    with Client(follower.host, follower.port) as client:
        error = wait_for(lambda: "corrupt" in client.stats()["replication_error"] and client.stats(), 30,
                         "the follower to report the leader's refusal")["replication_error"]
    assert "record_100_is_corrupt" in error  # STATS values carry _ for spaces
    assert follower.terminate() == 0 and leader.terminate() == 0
    assert "record 100 is corrupt" in follower.stderr()  # each retry is logged, with the leader's reason
    assert "Traceback" not in leader.stderr() + follower.stderr()
