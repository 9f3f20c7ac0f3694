"""``--min-replicas`` survives a failover (issue 23, item 6).

A follower started without ``--min-replicas`` (as the runbook's are) keeps
its leader's setting in its data dir and runs with it once promoted, after
any restart too, unless the operator says otherwise (``logd promote
--min-replicas N``, or the flag). Real processes; the replica that
acknowledges is a hand-made REPLICATE connection, so the test decides when
the ACK comes.
"""

from __future__ import annotations

import select

from .conftest import RawConn, ServerProcess, wait_for
from .helpers import addr, head, head_once_leader_gone, logd_cli, read_all, send_msgs, stats, try_msg


def crc_of(srv: ServerProcess, id: int) -> bytes:
    """The CRC field of record ``id`` as the server stores it."""
    conn = srv.connect()
    try:
        conn.send(b"READ %d 1\r\n" % id)
        assert conn.line() == b"OK"
        header = conn.line()
        return header.split(b" ")[2]
    finally:
        conn.close()


def replica_of(srv: ServerProcess, start: int, epoch: int) -> tuple[RawConn, bytes]:
    """A hand-made replica that holds ids up to ``start - 1`` (epoch ``epoch``): streaming, first ACK sent.
    Returns it and the leader's OK line."""
    conn = srv.connect(timeout=30)
    conn.send(b"REPLICATE %d %s %d %d hand-made.example:1\r\n" % (start, crc_of(srv, start - 1), epoch, epoch))
    ok = conn.line()
    assert ok.startswith(b"OK "), ok
    conn.send(b"ACK %d\r\n" % (start - 1))
    return conn, ok


def records_until(conn: RawConn, id: int) -> None:
    """Read the replica stream (markers and records) until record ``id`` has arrived."""
    while True:
        line = conn.line()
        if line.startswith(b"+%d " % id):
            conn.exact(int(line.split(b" ")[1]) + 2)
            return
        assert line[:2] in (b"+H", b"+E", b"+S", b"+C"), line  # +HEAD, +EPOCH, +SEG, +CURSOR


def test_promoted_follower_keeps_min_replicas(start_server) -> None:  # type: ignore[no-untyped-def]
    a = start_server("--min-replicas", "1", "--replica-timeout", "30")
    b = start_server("--replica-of", addr(a), "--replica-timeout", "30")  # no --min-replicas
    wait_for(lambda: stats(a)["replicas_in_sync"] == "1", what="B in sync")
    last = send_msgs(a, [b"a-%d" % i for i in range(1, 11)])
    # B knows what its leader runs with, and keeps it on disk.
    wait_for(lambda: stats(b).get("min_replicas_from") == "leader", what="B told A's setting")
    assert stats(b)["min_replicas"] == "1"
    assert (b.data_dir / "CLUSTER").read_text() == "min_replicas 1 leader\n"
    wait_for(lambda: head(b) == last, what="B holds every acknowledged message")

    writer = b.connect(timeout=30)  # a producer connected to the follower before the failover
    writer.send(b"MSG 1\r\nx\r\n")
    assert writer.line().startswith(b"ERR READONLY")
    a.kill()
    b_next = head_once_leader_gone(b) + 1
    out = logd_cli("promote", "--next-id", str(b_next), addr(b))
    assert out.returncode == 0 and "min_replicas 1 (leader)" in out.stdout, out
    s = stats(b)
    assert s["role"] == "leader" and s["min_replicas"] == "1" and s["min_replicas_from"] == "leader"
    # No replica yet: a MSG is refused before it is written, as on A.
    assert try_msg(b, b"too early").startswith(b"ERR UNAVAILABLE 0 replicas in sync")
    assert stats(b)["log_head"] == str(b_next - 1)

    # A replica comes: the handshake says min_replicas 1, and a MSG's reply waits for its ACK.
    replica, ok = replica_of(b, b_next, 0)
    assert ok == b"OK 1 0 %d 1" % b_next
    wait_for(lambda: stats(b)["replicas_in_sync"] == "1", what="the replica in sync")
    writer.send(b"MSG 5\r\nafter\r\n")
    records_until(replica, b_next)  # committed on B and sent to the replica...
    assert head(b) == b_next - 1  # ...but not acknowledged: readers do not see it,
    assert select.select([writer.sock], [], [], 0.2)[0] == []  # and no reply has come
    replica.send(b"ACK %d\r\n" % b_next)
    assert writer.line() == b"OK %d" % b_next
    assert head(b) == b_next and read_all(b, b_next, 1) == [(b_next, b"after")]
    for conn in (writer, replica):
        conn.close()

    # A restart without any flag keeps it (the runbook: restart B without --replica-of).
    assert b.terminate() == 0
    b = start_server(data_dir=b.data_dir)
    s = stats(b)
    assert (s["min_replicas"], s["min_replicas_from"]) == ("1", "leader")
    assert try_msg(b, b"alone").startswith(b"ERR UNAVAILABLE 0 replicas in sync")


def test_operator_overrides_and_precedence(start_server) -> None:  # type: ignore[no-untyped-def]
    leader = start_server("--min-replicas", "2")
    follower = start_server("--replica-of", addr(leader), "--min-replicas", "0")
    wait_for(lambda: stats(leader)["replicas"] == "1", what="the follower connected")
    wait_for(lambda: (follower.data_dir / "CLUSTER").exists(), what="the leader's setting kept")
    # Configured here, the follower's own flag wins over its leader's (which it still keeps).
    s = stats(follower)
    assert (s["min_replicas"], s["min_replicas_from"]) == ("0", "config")
    assert (follower.data_dir / "CLUSTER").read_text() == "min_replicas 2 leader\n"
    assert leader.terminate() == 0
    # `logd promote --min-replicas` wins over both, and is kept.
    assert logd_cli("promote", "--min-replicas", "1", addr(follower)).returncode == 0
    s = stats(follower)
    assert (s["role"], s["min_replicas"], s["min_replicas_from"]) == ("leader", "1", "promote")
    assert (follower.data_dir / "CLUSTER").read_text() == "min_replicas 1 promote\n"
    # A writable leader is not changed under its writers: demote it first.
    out = logd_cli("promote", "--min-replicas", "3", addr(follower))
    assert out.returncode != 0 and "demote it first" in out.stderr, out
    assert stats(follower)["min_replicas"] == "1"
    follower.kill()
    again = start_server(data_dir=follower.data_dir)
    assert (stats(again)["min_replicas"], stats(again)["min_replicas_from"]) == ("1", "promote")
    again.kill()
    configured = start_server("--min-replicas", "0", data_dir=follower.data_dir)
    assert (stats(configured)["min_replicas"], stats(configured)["min_replicas_from"]) == ("0", "config")
    assert send_msgs(configured, [b"asynchronous"]) == 1
    configured.kill()
    (follower.data_dir / "CLUSTER").write_text("min_replicas one leader\n")
    out = logd_cli("serve", "--data-dir", str(follower.data_dir), "--port", "0")
    assert out.returncode == 3 and "CLUSTER line 1: cannot parse" in out.stderr, out


def test_a_demoted_leader_promoted_with_another_setting_tells_its_followers(start_server) -> None:  # type: ignore[no-untyped-def]
    leader = start_server("--replica-timeout", "30")
    follower = start_server("--replica-of", addr(leader))
    wait_for(lambda: stats(follower).get("min_replicas_from") == "leader", what="the follower told 0")
    assert stats(follower)["min_replicas"] == "0"
    assert logd_cli("demote", addr(leader)).returncode == 0
    assert logd_cli("promote", "--min-replicas", "1", addr(leader)).returncode == 0
    # The follower's stream ended; it came back and was told the new value, which it keeps.
    wait_for(lambda: stats(follower)["min_replicas"] == "1", what="the follower told 1")
    assert (follower.data_dir / "CLUSTER").read_text() == "min_replicas 1 leader\n"
    wait_for(lambda: stats(leader)["replicas_in_sync"] == "1", what="the follower in sync again")
    assert send_msgs(leader, [b"held for the follower"]) == 1
    assert head(leader) == 1 and stats(leader)["high_watermark"] == "1"
    wait_for(lambda: head(follower) == 1, what="the follower's readers see it")
