"""A leader names its replicas by the address they listen on, and forgets one that went away at once.

Issue 23, item 5: the replica label was the follower's ephemeral outgoing
address, so two followers on one host could not be told apart and every
reconnect began a new series; a follower that stopped still counted in
``replicas`` / ``replicas_in_sync`` until the next write. Real processes,
the real metrics endpoint; no write happens between a follower going away
and the checks that it no longer counts.
"""

from __future__ import annotations

import socket

import pytest

from .conftest import RawConn, ServerProcess, wait_for
from .helpers import addr, send_msgs, stats, stats_of, try_msg
from .test_metrics import metrics_url, scrape, value


def replica_labels(url: str, seen: set[str]) -> set[str]:
    """The ``replica`` labels of ``logd_replica_acked_id`` now; every label ever seen is added to ``seen``."""
    labels = {dict(labels)["replica"] for name, labels in scrape(url) if name == "logd_replica_acked_id"}
    seen |= labels
    return labels


def test_two_followers_on_one_host_are_two_stable_series(start_server) -> None:  # type: ignore[no-untyped-def]
    leader = start_server("--metrics-port", "0")
    url = metrics_url(leader)
    f1 = start_server("--replica-of", addr(leader))
    f2 = start_server("--replica-of", addr(leader))
    names = {addr(f1), addr(f2)}  # 127.0.0.1:<the port each listens on>
    seen: set[str] = set()
    wait_for(lambda: replica_labels(url, seen) == names, what="both followers under their listening addresses")
    last = send_msgs(leader, [b"m%d" % i for i in range(20)])
    for f in (f1, f2):
        wait_for(lambda f=f: value(scrape(url), "logd_replica_acked_id", replica=addr(f)) == last,
                 what=f"{addr(f)} acknowledges {last}")
    s = stats(leader)
    assert s[f"replica_{addr(f1)}_acked"] == s[f"replica_{addr(f2)}_acked"] == str(last)

    # f1 killed: it stops counting at once (no write comes to reveal the dead connection).
    f1.kill()
    wait_for(lambda: replica_labels(url, seen) == {addr(f2)}, what="the killed follower's series to go")
    samples = scrape(url)
    assert value(samples, "logd_replicas") == 1
    s = stats(leader)
    assert s["replicas"] == "1" and s["replicas_in_sync"] == "1" and f"replica_{addr(f1)}_acked" not in s
    # Restarted on its port, it is the same series again.
    f1 = start_server("--replica-of", addr(leader), data_dir=f1.data_dir, port=f1.port)
    wait_for(lambda: replica_labels(url, seen) == names, what="the restarted follower under its old name")
    last = send_msgs(leader, [b"n%d" % i for i in range(5)])
    wait_for(lambda: value(scrape(url), "logd_replica_acked_id", replica=addr(f1)) == last,
             what="the restarted follower acknowledges under its old name")

    # f2 stopped gracefully: the same.
    assert f2.terminate() == 0
    wait_for(lambda: replica_labels(url, seen) == {addr(f1)}, what="the stopped follower's series to go")
    s = stats(leader)
    assert s["replicas"] == "1" and s["replicas_in_sync"] == "1" and int(s["log_head"]) == last
    # Never any other series: no ephemeral connection address was ever a label.
    assert seen == names, seen


def test_advertise_names_the_follower(start_server) -> None:  # type: ignore[no-untyped-def]
    leader = start_server()
    follower = start_server("--replica-of", addr(leader), "--advertise", "replica-b.example:7001")
    wait_for(lambda: "replica_replica-b.example:7001_acked" in stats(leader), what="the advertised name in STATS")
    assert [k for k in stats(leader) if k.endswith("_acked")] == ["replica_replica-b.example:7001_acked"]
    assert follower.terminate() == 0
    wait_for(lambda: stats(leader)["replicas"] == "0", what="the follower to stop counting")
    assert "replica_replica-b.example:7001_acked" not in stats(leader)


def _replica(srv: ServerProcess, name: bytes) -> RawConn:
    """A hand-made replica of an empty log under ``name``, streaming, with its first ACK sent."""
    conn = srv.connect()
    conn.send(b"REPLICATE 1 0 0 0 " + name + b"\r\n")
    assert conn.line() == b"OK 0 0 1 0"
    assert conn.line() == b"+HEAD 0 0"
    conn.send(b"ACK 0\r\n")
    return conn


def test_a_reconnecting_replica_replaces_its_old_stream(start_server) -> None:  # type: ignore[no-untyped-def]
    leader = start_server()
    first = _replica(leader, b"db-2.example:1774")
    wait_for(lambda: stats(leader).get("replica_db-2.example:1774_acked") == "0", what="the replica counted")
    # The same replica again (its old connection may be dead without the leader knowing): one replica.
    second = _replica(leader, b"db-2.example:1774")
    assert first.line().startswith(b"ERR BUSY replaced by a newer REPLICATE stream from replica db-2.example:1774")
    assert first.closed_by_peer()
    s = stats(leader)
    assert s["replicas"] == "1" and s["replicas_in_sync"] == "1" and s["replica_db-2.example:1774_acked"] == "0"
    # Another name is another replica; a bad name is refused and the connection goes on.
    third = _replica(leader, b"[::1]:1775")
    wait_for(lambda: stats(leader)["replicas_in_sync"] == "2", what="two replicas")
    bad = leader.connect()
    bad.send(b"REPLICATE 1 0 0 0 db_2:1774\r\nREPLICATE 1 0 0 0 db:0\r\nREPLICATE 1 0 0 0 a b\r\nPING\r\n")
    assert bad.line().startswith(b"ERR BAD_FORMAT REPLICATE address must be HOST:PORT")
    assert bad.line().startswith(b"ERR BAD_FORMAT REPLICATE address must be HOST:PORT")
    assert bad.line().startswith(b"ERR BAD_FORMAT REPLICATE takes <start>")
    assert bad.line() == b"PONG"
    # A replica that half-closes is gone: it stops counting without a write.
    third.sock.shutdown(socket.SHUT_WR)
    assert third.closed_by_peer()
    s = stats_of(bad)
    assert s["replicas"] == "1" and "replica_[::1]:1775_acked" not in s
    for conn in (second, third, bad):
        conn.close()


def test_follower_of_a_leader_without_the_address_argument(start_server) -> None:  # type: ignore[no-untyped-def]
    """An older leader answers the REPLICATE with the address BAD_FORMAT (it takes 1, 2 or 4
    arguments): the follower asks again without it, on the same connection, and follows."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)
    try:
        follower = start_server("--replica-of", f"127.0.0.1:{listener.getsockname()[1]}")
        sock, _ = listener.accept()
        sock.settimeout(30)
        f = sock.makefile("rb")
        assert f.readline() == b"REPLICATE 1 00000000 0 0 127.0.0.1:%d\r\n" % follower.port
        sock.sendall(b"ERR BAD_FORMAT REPLICATE takes <start> [<prev_crc> [<epoch> <seen>]]\r\n")
        assert f.readline() == b"REPLICATE 1 00000000 0 0\r\n"
        sock.sendall(b"OK 0 0 1 0\r\n+HEAD 1 1\r\n+SEG 1\r\n+1 5 9a71bb4c\r\nhello\r\n")
        assert f.readline() == b"ACK 0\r\n"
        assert f.readline() == b"ACK 1\r\n"
        s = stats(follower)
        assert s["replication"] == "streaming" and s["log_head"] == "1"
        sock.close()
    finally:
        listener.close()


@pytest.mark.parametrize("how", ["terminate", "kill"])
def test_a_follower_that_goes_away_stops_counting_at_once(start_server, how: str) -> None:  # type: ignore[no-untyped-def]
    leader = start_server("--min-replicas", "1", "--replica-timeout", "30")
    follower = start_server("--replica-of", addr(leader))
    wait_for(lambda: stats(leader)["replicas_in_sync"] == "1", what="the follower in sync")
    assert send_msgs(leader, [b"held by two"]) == 1
    if how == "terminate":
        assert follower.terminate() == 0
    else:
        follower.kill()
    # Nothing is written: the leader notices the closed connection by itself.
    wait_for(lambda: stats(leader)["replicas"] == "0", what="the follower to stop counting")
    assert stats(leader)["replicas_in_sync"] == "0"
    # So a MSG is refused up front, not appended and then held for --replica-timeout.
    assert try_msg(leader, b"x").startswith(b"ERR UNAVAILABLE 0 replicas in sync")
    assert stats(leader)["log_head"] == "1"
