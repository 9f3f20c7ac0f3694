"""Fault injection on a real three-server cluster, then a checker that reads every data dir.

Leader A (``--min-replicas 1``) with followers B and C behind fault-injecting
proxies; a writer keeps writing while the links are delayed, cut in the middle
of a record and partitioned one way or both, while C is killed (-9) and
restarted, and then A itself is killed. The most advanced follower is promoted
(``logd promote --next-id``), the other is re-pointed at it through its proxy,
A comes back first as a stale leader (fenced) and then as a follower.
Before that, A is also killed and restarted in place once (same epoch). Every
step waits for a condition (writes acknowledged, a reconnection), so the test
bounds itself.

The checker, on the stopped servers' directories: every message acknowledged
by any leader is on the surviving leader with its body; ids are continuous
and every record verifies; the servers end in the same epochs with identical
closed segments; the stale leader acknowledged nothing after the promotion.
"""

from __future__ import annotations

import threading
from pathlib import Path

from logd.storage import Log
from logd.storage.epochs import Epochs

from .conftest import ServerProcess, wait_for
from .helpers import Writer, addr, closed_segments_identical, head, head_once_leader_gone, logd_cli, stats, try_msg
from .proxy import Proxy

SEGMENT = "16KiB"
STEP = 300  # acknowledged writes between faults


def read_dir(path: Path) -> list[tuple[int, bytes]]:
    """Every record of a stopped server's data dir, CRC and id continuity checked by `Log.read`."""
    out: list[tuple[int, bytes]] = []
    with Log(str(path)) as lg:
        nxt = lg.first
        while nxt <= lg.head:
            recs = lg.read(nxt, 5000)
            out += [(r.id, r.body) for r in recs]
            nxt = recs[-1].id + 1
    return out


def check_cluster(leader: Path, others: list[Path], acked: dict[int, bytes]) -> int:
    """The checker (see the module docstring); returns the number of records on the leader."""
    records = read_dir(leader)
    ids = [i for i, _ in records]
    assert ids == list(range(1, len(ids) + 1)), "ids are not continuous from 1"
    have = dict(records)
    missing = [i for i in acked if have.get(i) != acked[i]]
    assert not missing, f"acknowledged ids missing or different on the leader: {missing[:10]}"
    want_epochs = Epochs.load(str(leader)).entries
    for d in others:
        assert read_dir(d) == records, f"{d} does not hold the leader's records"
        assert Epochs.load(str(d)).entries == want_epochs, f"{d} has other epochs"
        assert logd_cli("check", str(d)).returncode == 0
    assert closed_segments_identical([leader, *others]) >= 3
    return len(records)


def test_faults_kills_and_failover_lose_nothing_acknowledged(start_server) -> None:  # type: ignore[no-untyped-def]
    a = start_server("--min-replicas", "1", "--replica-timeout", "2", "--segment-bytes", SEGMENT)
    acked: dict[int, bytes] = {}
    with Proxy(a.host, a.port) as to_b, Proxy(a.host, a.port) as to_c:
        b = start_server("--replica-of", to_b.address)
        c = start_server("--replica-of", to_c.address)
        wait_for(lambda: stats(a)["replicas_in_sync"] == "2", what="both replicas in sync")
        writers = [Writer(a, b"w", window=16)]
        writers[0].start()

        def progress(what: str) -> None:
            writer = writers[-1]
            target = len(writer.acked) + STEP
            wait_for(lambda: len(writer.acked) >= target or not writer.is_alive(), what=what)
            assert writer.is_alive(), f"writer stopped during: {what}: {writer.failure}"

        try:
            progress("writes")
            to_b.delay(0.02)
            progress("writes with B's link delayed")
            to_b.delay(0)
            links = to_c.connections
            to_c.cut_next("down")
            wait_for(lambda: to_c.connections > links, what="C reconnects after a record was cut")
            progress("writes after C's link was cut mid-record")
            to_b.partition("up")  # B's ACKs are held back; C keeps acknowledging
            progress("writes with B -> A partitioned")
            to_b.heal()
            to_c.partition("both")
            progress("writes with C partitioned both ways")
            to_c.heal()
            to_b.partition("down")
            progress("writes with A -> B partitioned")
            to_b.heal()
            c.kill()
            progress("writes with C killed")
            c.start()
            progress("writes after C restarted")
            a.kill()  # the leader dies with writes in flight, and restarts in place
            writers[-1].finish()
            a.start()
            wait_for(lambda: stats(a)["replicas_in_sync"] == "2", what="followers back on the restarted leader")
            assert stats(a)["epoch"] == "0"  # a restart is not a new leader
            writers.append(Writer(a, b"r", window=16))
            writers[-1].start()
            progress("writes after the leader restarted")
            a.kill()  # and dies again: this time the followers take over
        finally:
            for writer in writers:
                writer.finish()
                acked.update(writer.acked)
        assert len(acked) >= 9 * STEP

        # Fail over to the follower that holds the most (it holds every acknowledged id).
        b_head, c_head = (head_once_leader_gone(srv) for srv in (b, c))
        new, other = (b, c) if b_head >= c_head else (c, b)
        other_link = to_c if other is c else to_b
        promoted_at = max(b_head, c_head) + 1
        assert logd_cli("promote", "--next-id", str(promoted_at), addr(new)).returncode == 0

        other_link.retarget(new.host, new.port)
        other_link.drop()
        wait_for(lambda: stats(other)["epoch_seen"] == "1", what="the other follower follows the new leader")

        # A comes back as a leader by itself and the other follower is mis-pointed at it.
        stale = start_server("--min-replicas", "1", "--segment-bytes", SEGMENT, data_dir=a.data_dir)
        replies: list[bytes] = []
        stop = threading.Event()

        def write_stale() -> None:
            while not stop.is_set():
                replies.append(try_msg(stale, b"stale"))

        t = threading.Thread(target=write_stale, daemon=True)
        t.start()
        try:
            other_link.retarget(stale.host, stale.port)
            other_link.drop()
            wait_for(lambda: stats(stale)["role"] == "readonly", what="the stale leader steps down")
            wait_for(lambda: len(replies) > 3, what="MSGs to the stale leader")
        finally:
            stop.set()
            t.join(30)
        stale_ok = [r for r in replies if r.startswith(b"OK")]
        stale.kill()
        other_link.retarget(new.host, new.port)
        other_link.drop()

        # A rejoins as a follower; writes go on at the new leader.
        a2 = start_server("--replica-of", addr(new), data_dir=a.data_dir)
        # The new leader kept A's --min-replicas 1: it takes writes once a replica is in sync.
        assert stats(new)["min_replicas"] == "1"
        wait_for(lambda: stats(new)["replicas_in_sync"] == "2", what="both followers in sync with the new leader")
        writer2 = Writer(new, b"n", window=16, limit=2 * STEP)
        writer2.start()
        writer2.join(60)  # to its limit (finish() would stop it at once)
        assert not writer2.is_alive(), "writer did not reach its limit"
        assert writer2.failure is None and not writer2.errors
        assert min(writer2.acked) >= promoted_at
        acked.update(writer2.acked)
        last = max(writer2.acked)
        for srv in (other, a2):
            wait_for(lambda srv=srv: int(stats(srv)["log_head"]) == last, what="followers caught up")
        for srv in (new, other, a2):
            assert srv.terminate() == 0

    # No message the stale leader acknowledged after the promotion (none at all, here).
    assert not stale_ok, stale_ok
    check_cluster(new.data_dir, [other.data_dir, a.data_dir], acked)


def test_checker_notices_a_missing_acknowledged_message(tmp_path: Path) -> None:
    """The checker itself can fail: a leader without an acknowledged id, a follower that differs."""
    leader, follower = tmp_path / "l", tmp_path / "f"
    for d, bodies in ((leader, [b"a", b"b"]), (follower, [b"a", b"x"])):
        with Log(str(d)) as lg:
            lg.append(bodies)
            lg.sync()
    try:
        check_cluster(leader, [], {3: b"c"})
    except AssertionError as exc:
        assert "missing" in str(exc)
    else:
        raise AssertionError("the checker missed an acknowledged id")
    try:
        check_cluster(leader, [follower], {1: b"a"})
    except AssertionError as exc:
        assert "does not hold" in str(exc)
    else:
        raise AssertionError("the checker missed a differing follower")


def test_proxy_partition_holds_bytes_until_healed(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server()
    with Proxy(srv.host, srv.port) as px:
        via = ServerProcess(srv.data_dir, [], host="127.0.0.1", port=px.port)
        conn = via.connect()
        px.partition("up")
        conn.send(b"PING\r\n")
        wait_for(lambda: px.received["up"] == 6, what="the proxy to hold the PING")
        assert px.forwarded["up"] == 0
        px.heal()
        assert conn.line() == b"PONG"
        px.drop()
        assert conn.closed_by_peer()
        conn.close()
    assert head(srv) == 0
