"""Replication safety on real processes: epochs, fencing, truncation, retention (issue 15).

Links between servers go through `proxy.Proxy` where a test needs to break
or re-point them. No sleeps as synchronisation: every wait polls a condition
with a deadline.
"""

from __future__ import annotations

import socket
import threading

from logd.storage.record import encode_record

from .conftest import ServerProcess, wait_for
from .helpers import addr, closed_segments_identical, head, logd_cli, read_all, send_msgs, stats, try_msg
from .proxy import Proxy


def test_old_leader_coming_back_is_fenced(start_server) -> None:  # type: ignore[no-untyped-def]
    a = start_server("--min-replicas", "1", "--replica-timeout", "2")
    b = start_server("--replica-of", addr(a))
    with Proxy(a.host, a.port) as link:
        c = start_server("--replica-of", link.address)
        wait_for(lambda: stats(a)["replicas_in_sync"] == "2", what="both replicas in sync")
        assert send_msgs(a, [b"a-%d" % i for i in range(1, 51)]) == 50
        wait_for(lambda: head(b) == 50 and head(c) == 50, what="replicas hold 50")
        assert a.terminate() == 0  # A stops
        assert logd_cli("promote", "--next-id", "51", addr(b)).returncode == 0
        assert stats(b)["min_replicas"] == "1"  # A's, kept by B (it was started without the flag)
        link.retarget(b.host, b.port)
        link.drop()  # C follows B
        wait_for(lambda: stats(b)["replicas_in_sync"] == "1", what="C in sync with B")
        assert send_msgs(b, [b"b-51"]) == 51
        wait_for(lambda: head(c) == 51, what="C follows B")
        assert stats(c)["epoch"] == "1" and stats(b)["epoch"] == "1"
        # The new leader shows each replica's lag in ids and in seconds.
        s = stats(b)
        lag = {k.rsplit("_", 2)[-2] + "_" + k.rsplit("_", 1)[-1]: v for k, v in s.items() if "_lag_" in k}
        assert s["role"] == "leader" and set(lag) == {"lag_messages", "lag_s"}, s

        # A restarts by itself as a leader, and C is mis-pointed back at it.
        a2 = start_server("--min-replicas", "1", "--replica-timeout", "2", data_dir=a.data_dir)
        assert stats(a2)["epoch"] == "0" and stats(a2)["role"] == "leader"
        replies: list[bytes] = []
        stop = threading.Event()

        def write_to_old_leader() -> None:
            while not stop.is_set():
                replies.append(try_msg(a2, b"stale"))

        writer = threading.Thread(target=write_to_old_leader, daemon=True)
        writer.start()
        try:
            link.retarget(a2.host, a2.port)
            link.drop()
            # C tells A of epoch 1: A steps down (read-only, in STATS, logged) ...
            wait_for(lambda: stats(a2)["role"] == "readonly", what="A steps down")
            # The reply after the one in flight now belongs to a MSG sent after the step-down.
            seen = len(replies)
            wait_for(lambda: len(replies) > seen + 1, what="MSGs after the step-down")
        finally:
            stop.set()
            writer.join(30)
        s = stats(a2)
        assert s["fenced_by_epoch"] == "1" and s["epoch_seen"] == "1"
        assert "stepped_down" in a2.stderr()
        # ... A's MSGs were never acknowledged ...
        assert replies and not [r for r in replies if r.startswith(b"OK")], replies[:5]
        assert replies[-1].startswith(b"ERR READONLY")
        # ... and C refused A: it kept B's history and took nothing from A.
        wait_for(lambda: "leader_fenced" in c.stderr(), what="C logs that it refused A")
        assert head(c) == 51 and read_all(c, 51, 1) == [(51, b"b-51")]
        assert c.proc is not None and c.proc.poll() is None
        # The step-down is durable: A restarted is still read-only until ACCEPT.
        a2.kill()
        a3 = start_server("--min-replicas", "1", data_dir=a.data_dir)
        assert stats(a3)["role"] == "readonly"
        assert try_msg(a3, b"x").startswith(b"ERR READONLY")
        # C pointed back at B goes on.
        link.retarget(b.host, b.port)
        link.drop()
        wait_for(lambda: stats(b)["replicas_in_sync"] == "1", what="C in sync with B again")
        assert send_msgs(b, [b"b-52"]) == 52
        wait_for(lambda: head(c) == 52, what="C follows B again")


def test_refuse_survives_a_restart_and_accept_starts_an_epoch(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server()
    assert send_msgs(srv, [b"one", b"two"]) == 2
    assert stats(srv)["epoch"] == "0"
    assert logd_cli("demote", addr(srv)).returncode == 0
    srv.kill()  # even a crash keeps the REFUSE
    srv = start_server(data_dir=srv.data_dir)
    assert stats(srv)["role"] == "readonly"
    assert try_msg(srv, b"x").startswith(b"ERR READONLY")
    out = logd_cli("promote", "--next-id", "2", addr(srv))
    assert out.returncode != 0 and "next id is 3" in out.stderr
    assert stats(srv)["role"] == "readonly"
    assert logd_cli("promote", "--next-id", "3", addr(srv)).returncode == 0
    assert stats(srv)["epoch"] == "1" and send_msgs(srv, [b"three"]) == 3
    assert (srv.data_dir / "EPOCHS").read_text().startswith("0 1\n1 3\nseen 1\ncrc ")
    srv.kill()
    srv = start_server(data_dir=srv.data_dir)
    assert stats(srv)["role"] == "leader" and send_msgs(srv, [b"four"]) == 4


def _partitioned_burst(a: ServerProcess, link: Proxy, count: int) -> list[bytes]:
    """Cut the proxied follower off, send ``count`` MSGs to ``a`` at once; return their replies."""
    link.partition("both")
    conn = a.connect(timeout=30)
    try:
        conn.send(b"".join(b"MSG 5\r\nx%04d\r\n" % i for i in range(count)))
        return [conn.line() for _ in range(count)]
    finally:
        conn.close()


def test_follower_with_unacknowledged_records_truncates_and_matches(start_server) -> None:  # type: ignore[no-untyped-def]
    # Each acknowledged batch needs both followers to sync within the timeout: 1 s lost to a
    # slow disk on a loaded machine; only the partitioned burst waits it out.
    a = start_server("--min-replicas", "2", "--replica-timeout", "3", "--segment-bytes", "4KiB")
    with Proxy(a.host, a.port) as to_b, Proxy(a.host, a.port) as to_c:
        b = start_server("--replica-of", to_b.address, "--segment-bytes", "4KiB")
        c = start_server("--replica-of", to_c.address, "--segment-bytes", "4KiB")
        wait_for(lambda: stats(a)["replicas_in_sync"] == "2", what="both replicas in sync")
        for k in range(0, 300, 10):  # MSGs of 10: a batch never spans segments
            acked = send_msgs(a, [b"acked-%04d" % i for i in range(k, k + 10)])
        wait_for(lambda: head(c) == acked, what="C holds every acknowledged message")
        # C is cut off; B gets more, which only one replica ever holds: never acknowledged.
        replies = _partitioned_burst(a, to_c, 200)
        assert all(r.startswith(b"ERR UNAVAILABLE") for r in replies), replies[:3]
        wait_for(lambda: int(stats(b)["log_head"]) == acked + 200, what="B holds the unacknowledged burst")
        a.kill()
        to_c.drop()  # what the partition held back never reaches C
        to_c.heal()
        # C is promoted (exactly the one checked), B is re-pointed at it.
        c_next = int(stats(c)["log_head"]) + 1
        assert c_next == acked + 1
        # C would keep A's --min-replicas 2, which B (not yet following C) and nobody else can meet:
        # the operator lowers it, to write to C before B comes back.
        assert logd_cli("promote", "--next-id", str(c_next), "--min-replicas", "0", addr(c)).returncode == 0
        for k in range(0, 200, 10):
            assert send_msgs(c, [b"new-%d" % i for i in range(k, k + 10)]) == acked + k + 10
        to_b.retarget(c.host, c.port)
        to_b.drop()
        wait_for(lambda: int(stats(b)["log_head"]) == acked + 200 and stats(b)["epoch"] == "1",
                 what="B cut its log and follows C")
        dropped = b.data_dir / f"dropped-e0-{acked + 1:020d}.dropped"
        assert dropped.exists() and dropped.read_bytes() == b"".join(
            encode_record(acked + 1 + i, b"x%04d" % i) for i in range(200)
        )
        assert stats(b)["dropped_records"] == "200" and "count=200" in b.stderr()
        assert read_all(b, acked + 1, 2) == [(acked + 1, b"new-0"), (acked + 2, b"new-1")]
        for srv in (b, c):
            assert srv.terminate() == 0
    assert closed_segments_identical([c.data_dir, b.data_dir]) >= 3


def test_cutting_acknowledged_records_stops_the_follower(start_server) -> None:  # type: ignore[no-untyped-def]
    a = start_server("--min-replicas", "1", "--replica-timeout", "10")  # nothing here waits it out
    b = start_server("--replica-of", addr(a))
    with Proxy(a.host, a.port) as to_c:
        c = start_server("--replica-of", to_c.address)
        wait_for(lambda: stats(a)["replicas_in_sync"] == "2", what="both replicas in sync")
        assert send_msgs(a, [b"m-%d" % i for i in range(10)]) == 10
        wait_for(lambda: head(c) == 10, what="C holds 10")
        to_c.partition("both")
        assert send_msgs(a, [b"only-b-%d" % i for i in range(10)]) == 20  # acknowledged: B holds them
        wait_for(lambda: head(b) == 20, what="B's readers see 20")
        # B keeps what it knows was acknowledged across a restart.
        saved = b.data_dir / "HIGH_WATERMARK"
        wait_for(lambda: saved.exists() and saved.read_bytes() == b"20\n", what="B saved the acknowledged id")
        a.kill()
        # The operator promotes the replica that lacks acknowledged messages ...
        assert logd_cli("promote", "--next-id", "11", addr(c)).returncode == 0
        b.kill()
        # ... and B, pointed at it, would have to drop them: it stops instead (exit 4).
        b2 = ServerProcess(b.data_dir, ["--replica-of", addr(c)]).start()
        try:
            assert b2.proc is not None and b2.proc.wait(timeout=30) == 4
        finally:
            b2.kill()
        assert "acknowledged under --min-replicas" in b2.stderr()
        assert not list(b.data_dir.glob("dropped-*"))
        assert logd_cli("check", str(b.data_dir)).returncode == 0


def test_follower_resumes_after_its_retention_ran_past_a_lone_seg_marker(start_server) -> None:  # type: ignore[no-untyped-def]
    """The issue's scripted leader: records 1..50, then ``+SEG 51`` alone, then the link drops."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)
    port = listener.getsockname()[1]
    bodies = [b"r%03d-" % i + b"x" * 250 for i in range(1, 52)]
    follower = start_server("--replica-of", f"127.0.0.1:{port}", "--fsync", "interval:20",
                            "--retention-bytes", "10KiB")
    try:
        sock, _ = listener.accept()
        sock.settimeout(30)
        f = sock.makefile("rb")
        assert f.readline() == b"REPLICATE 1 00000000 0 0 127.0.0.1:%d\r\n" % follower.port
        sock.sendall(b"OK 0 0 51 0\r\n+HEAD 50 50\r\n+SEG 1\r\n"
                     + b"".join(encode_record(i + 1, body) for i, body in enumerate(bodies[:50])))
        while f.readline() != b"ACK 50\r\n":
            pass
        sock.sendall(b"+SEG 51\r\n")
        wait_for(lambda: stats(follower)["segments"] == "2", what="the follower started segment 51")
        passes = int(stats(follower)["retention_passes"])
        wait_for(lambda: int(stats(follower)["retention_passes"]) >= passes + 2, what="retention ran")
        sock.shutdown(socket.SHUT_RDWR)  # the link drops (the file object keeps the socket open)
        sock.close()
        sock, _ = listener.accept()
        sock.settimeout(30)
        f = sock.makefile("rb")
        crc50 = encode_record(50, bodies[49]).split(b" ")[2][:8]
        assert f.readline() == b"REPLICATE 51 %s 0 0 127.0.0.1:%d\r\n" % (crc50, follower.port)
        sock.sendall(b"OK 0 0 52 0\r\n+HEAD 51 51\r\n+SEG 51\r\n" + encode_record(51, bodies[50]))
        while f.readline() != b"ACK 51\r\n":
            pass
        assert follower.proc is not None and follower.proc.poll() is None
        assert stats(follower)["log_head"] == "51"
        # Once segment 51 holds a record, segment 1 may go.
        wait_for(lambda: stats(follower)["first"] == "51", what="retention deletes segment 1")
        sock.close()
    finally:
        listener.close()
    assert follower.terminate() == 0
