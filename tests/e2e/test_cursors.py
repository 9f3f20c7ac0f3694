"""Named cursors end to end: COMMIT / CURSOR / CURSORS on real `logd serve` processes.

Round trips, forward-only, bad names, durability across kill -9, a promoted
follower, retention that keeps what a cursor needs, the client and the CLI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import logd
from logd.client import Client, Consumer, ServerCursor

from .conftest import RawConn, ServerProcess, wait_for
from .helpers import addr, first_after_a_retention_pass, head, send_msgs, stats, url_of


def ask(srv: ServerProcess, *lines: bytes) -> list[bytes]:
    """Send each command line; return the first reply line of each."""
    conn = srv.connect()
    try:
        conn.send(b"".join(line + b"\r\n" for line in lines))
        return [conn.line() for _ in lines]
    finally:
        conn.close()


def cursor_of(srv: ServerProcess, name: str) -> int:
    reply = ask(srv, b"CURSOR " + name.encode())[0]
    assert reply.startswith(b"OK "), reply
    return int(reply.split()[1])


@pytest.mark.parametrize("fsync", ["always", "never"])
def test_round_trip_and_forward_only(start_server, fsync: str) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--fsync", fsync)
    send_msgs(srv, [b"m%d" % i for i in range(10)])
    assert ask(srv, b"CURSOR app", b"COMMIT app 4", b"CURSOR app", b"COMMIT app 4", b"COMMIT app 7") == [
        b"OK 0", b"OK", b"OK 4", b"OK", b"OK"]
    back = ask(srv, b"COMMIT app 3")[0]
    assert back.startswith(b"ERR STALE ") and b"only moves forward" in back and b"at 7" in back
    ahead = ask(srv, b"COMMIT app 11")[0]
    assert ahead.startswith(b"ERR NOT_FOUND ") and b"past the head 10" in ahead
    assert cursor_of(srv, "app") == 7  # neither refusal moved it
    conn = srv.connect()
    conn.send(b"COMMIT b.x-1_Z 10\r\nCURSORS\r\n")
    assert conn.line() == b"OK"
    assert conn.line() == b"OK 2"
    assert {conn.line(), conn.line()} == {b"app 7", b"b.x-1_Z 10"}
    conn.close()
    figures = stats(srv)
    assert figures["cursors"] == "2"
    assert (figures["cursor_app_id"], figures["cursor_app_lag"]) == ("7", "3")
    assert (figures["cursor_b.x-1_Z_id"], figures["cursor_b.x-1_Z_lag"]) == ("10", "0")


def test_commit_acts_after_the_msg_before_it(server: ServerProcess) -> None:
    """Pipelined: a COMMIT of the id a MSG just got, sent before that MSG is acknowledged."""
    conn = server.connect()
    conn.send(b"MSG 1\r\na\r\nCOMMIT p 1\r\nCURSOR p\r\n")
    assert [conn.line(), conn.line(), conn.line()] == [b"OK 1", b"OK", b"OK 1"]
    conn.close()


@pytest.mark.parametrize("line, complaint", [
    (b"COMMIT b@d 1", b"bad cursor name"),
    (b"COMMIT " + b"n" * 65 + b" 1", b"bad cursor name"),
    (b"CURSOR caf\xc3\xa9", b"bad cursor name"),
    (b"COMMIT app", b"COMMIT takes <name> <id>"),
    (b"COMMIT app -1", b"COMMIT id must be a decimal number"),
    (b"CURSOR", b"CURSOR takes <name>"),
    (b"CURSORS app", b"CURSORS limit must be a decimal number"),
    (b"CURSORS 1001", b"CURSORS limit must be 1 to 1000"),
    (b"CURSORS 10 b@d", b"bad cursor name"),
])
def test_bad_commands_get_bad_format_and_the_connection_stays(server: ServerProcess, line: bytes,
                                                               complaint: bytes) -> None:
    conn = server.connect()
    conn.send(line + b"\r\nPING\r\n")
    reply = conn.line()
    assert reply.startswith(b"ERR BAD_FORMAT ") and complaint in reply, reply
    assert conn.line() == b"PONG"
    conn.close()
    assert ask(server, b"COMMIT " + b"n" * 64 + b" 0") == [b"OK"]  # 64 characters is the limit


@pytest.mark.parametrize("kill_after", [200, 3000])
def test_acknowledged_commits_survive_kill_9(start_server, tmp_path: Path, kill_after: int) -> None:  # type: ignore[no-untyped-def]
    """Under fsync=always: commits pipelined as fast as acks come back, then SIGKILL mid-stream.

    After the restart every cursor is at least where its last acknowledged COMMIT put it.
    Over 3000 commits each (over 120 KiB of lines) the server compacts CURSORS on its
    compaction thread: that kill waits until one compaction is seen done, and may land in
    the middle of the next.
    """
    srv = start_server()
    # Ids for far more commits than the kill waits for: the committers are still running when it
    # lands, even if this thread sends it many seconds late (they make ~1,000-2,000 a second here).
    top = 0
    while top < 60_000:
        top = send_msgs(srv, [b"x"] * 10_000)  # the most one MSG may hold (--max-batch)
    acked: dict[str, int] = {}

    def committer(name: str) -> None:
        conn: RawConn = srv.connect()
        sent = 0
        try:
            while sent < top:
                burst = range(sent + 1, min(top, sent + 20) + 1)
                conn.send(b"".join(b"COMMIT %s %d\r\n" % (name.encode(), i) for i in burst))
                for i in burst:
                    if conn.line() != b"OK":
                        return
                    acked[name] = i
                sent = burst[-1]
        except (ConnectionError, OSError):
            return

    shortest_line = len(b"c0 1 00000000\n")
    compacted = False

    def ready_for_the_kill() -> bool:
        """Each committer past ``kill_after``; for 3000, a compaction seen done (not just begun)."""
        nonlocal compacted
        now = dict(acked)  # before the size: these COMMITs' lines are in the file unless it was rewritten
        if not compacted:
            compacted = os.path.getsize(Path(srv.data_dir) / "CURSORS") < sum(now.values()) * shortest_line
        return len(now) == 3 and min(now.values()) >= kill_after and (compacted or kill_after <= 200)

    threads = [threading.Thread(target=committer, args=(f"c{k}",), daemon=True) for k in range(3)]
    for t in threads:
        t.start()
    wait_for(ready_for_the_kill, 60, "commits acknowledged")
    srv.kill()
    for t in threads:
        t.join(timeout=20)
    seen = dict(acked)
    assert all(v < top for v in seen.values()), "the kill came after every commit: the test proved nothing"
    again = start_server(data_dir=srv.data_dir)
    for name, last in seen.items():
        assert cursor_of(again, name) >= last


def test_cursors_reach_a_follower_and_survive_its_promotion(start_server) -> None:  # type: ignore[no-untyped-def]
    leader = start_server("--segment-bytes", "4KiB")
    send_msgs(leader, [b"early-%d" % i for i in range(50)])
    assert ask(leader, b"COMMIT before 20") == [b"OK"]  # committed before the follower exists
    follower = start_server("--replica-of", addr(leader))
    wait_for(lambda: cursor_of(follower, "before") == 20, 30, "the early cursor on the follower")
    top = send_msgs(leader, [b"late-%d" % i for i in range(200)])
    assert ask(leader, b"COMMIT after %d" % top, b"COMMIT before 30") == [b"OK", b"OK"]
    wait_for(lambda: cursor_of(follower, "after") == top and cursor_of(follower, "before") == 30, 30,
             "the later cursors on the follower")
    assert ask(follower, b"COMMIT after %d" % top)[0].startswith(b"ERR READONLY")
    leader.terminate()
    assert ask(follower, b"ACCEPT") == [b"OK"]
    assert cursor_of(follower, "after") == top
    nxt = send_msgs(follower, [b"on the new leader"])
    assert ask(follower, b"COMMIT after %d" % nxt, b"COMMIT before 29") [0] == b"OK"
    # And they are on its disk: a restart of the promoted server keeps them.
    follower.terminate()
    again = start_server(data_dir=follower.data_dir)
    assert (cursor_of(again, "after"), cursor_of(again, "before")) == (nxt, 30)


def test_retention_keeps_what_a_cursor_needs(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--segment-bytes", "1KiB", "--retention-bytes", "2KiB", "--retention-keep-cursors",
                       "--retention-cap-bytes", "1MiB")
    body = b"r" * 100
    send_msgs(srv, [body] * 8)  # one MSG per segment: ids 1-8, 9-16, 17-24, 25-32
    # Still under --retention-bytes: the cursor is there before a retention pass (one a second)
    # has anything to delete, so no pass deletes as if there were none.
    assert ask(srv, b"COMMIT slow 1") == [b"OK"]
    for _ in range(3):
        send_msgs(srv, [body] * 8)
    assert ask(srv, b"COMMIT slow 25") == [b"OK"]
    for _ in range(10):
        send_msgs(srv, [body] * 8)
    # A pass between COMMIT slow 25 and these writes could stop at 17 (--retention-bytes met):
    # one whole pass after them has deleted all it may.
    first = first_after_a_retention_pass(srv)
    assert first == 25, f"cursor 'slow' (at 25) needs id 26 on, in the segment from 25: first is {first}"
    assert int(stats(srv)["bytes"]) > 2048  # over retention-bytes: the cursor holds it
    assert ask(srv, b"COMMIT slow %d" % head(srv)) == [b"OK"]
    wait_for(lambda: int(stats(srv)["first"]) > 25 and int(stats(srv)["bytes"]) <= 2048, 30,
             "retention once the cursor moved on")


def test_a_cursor_committed_at_zero_exists_and_keeps_the_whole_log(start_server) -> None:  # type: ignore[no-untyped-def]
    # Review finding: COMMIT <name> 0 (a consumer that has processed nothing yet) answered OK and
    # made no cursor: none in CURSORS, and retention deleted what that consumer had yet to read.
    srv = start_server("--segment-bytes", "1KiB", "--retention-bytes", "2KiB", "--retention-keep-cursors",
                       "--retention-cap-bytes", "1MiB")
    assert ask(srv, b"COMMIT fresh 0", b"CURSORS") == [b"OK", b"OK 1"]
    for _ in range(8):
        send_msgs(srv, [b"r" * 100] * 8)
    assert first_after_a_retention_pass(srv) == 1  # over --retention-bytes: the cursor holds it all
    follower = start_server("--replica-of", addr(srv))
    wait_for(lambda: stats(follower)["cursors"] == "1", 30, "the cursor on the follower")
    srv.terminate()
    again = start_server(data_dir=srv.data_dir)
    assert ask(again, b"CURSOR fresh", b"CURSORS") == [b"OK 0", b"OK 1"]


def test_retention_cap_drops_segments_a_cursor_needs(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--segment-bytes", "1KiB", "--retention-bytes", "2KiB", "--retention-keep-cursors",
                       "--retention-cap-bytes", "4KiB")
    body = b"r" * 100
    send_msgs(srv, [body] * 8)
    assert ask(srv, b"COMMIT stuck 1") == [b"OK"]
    for _ in range(12):
        send_msgs(srv, [body] * 8)

    def down_to_the_cap() -> bool:
        figures = stats(srv)
        return int(figures["first"]) > 2 and int(figures["bytes"]) <= 4096 + 1024

    # Both from one STATS: a pass between the writes may already have made first > 2, and the
    # writes after it put bytes over the cap again until the next pass.
    wait_for(down_to_the_cap, 30, "retention down to the cap")
    wait_for(lambda: "retention_dropped_for_cursors" in srv.stderr(), 10, "the warning in the log")


def test_client_server_cursor_and_consumer(server: ServerProcess) -> None:
    url = url_of(server)
    with Client.from_url(url) as client:
        client.append(*[b"a%d" % i for i in range(7)])
        assert client.cursor("svc") == 0
        client.commit("svc", 3)
        with pytest.raises(logd.StaleCursorError, match="only moves forward"):
            client.commit("svc", 2)
        assert client.cursors() == {"svc": 3}
    cursor = ServerCursor("svc")
    consumer = Consumer(url, cursor, follow=False, max_batch=2)
    got = []
    for batch in consumer:
        got += [r.id for r in batch]
        consumer.commit()
    assert got == [4, 5, 6, 7]
    assert cursor.load() == 7 and cursor_of(server, "svc") == 7
    cursor.close()


def test_cli_consume_with_a_cursor_and_logd_cursors(server: ServerProcess, tmp_path: Path) -> None:
    url = url_of(server)
    send_msgs(server, [b"one", b"two", b"three"])
    logd_cli = [sys.executable, "-m", "logd.cli"]
    out = tmp_path / "out"
    proc = subprocess.run([*logd_cli, "consume", "--url", url, "--cursor", "cli", "--no-follow", "--",
                           "sh", "-c", f"cat >> {out}"], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == b"one\ntwo\nthree\n"
    assert cursor_of(server, "cli") == 3
    send_msgs(server, [b"four"])
    listing = subprocess.run([*logd_cli, "cursors", "--url", url], capture_output=True, timeout=60,
                             env=dict(os.environ))
    lines = listing.stdout.decode().splitlines()
    assert lines[0].split() == ["cursor", "id", "lag"] and lines[1].split() == ["cli", "3", "1"]
    bad = subprocess.run([*logd_cli, "consume", "--url", url, "--cursor", "no/slash", "--", "cat"],
                         capture_output=True, timeout=60)
    assert bad.returncode == 2 and b"bad cursor name" in bad.stderr
