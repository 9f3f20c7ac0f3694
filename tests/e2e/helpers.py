"""Helpers the e2e tests share: one-shot commands on a new connection, a pipelining writer, files.

Each opens its own connection to a `ServerProcess` (conftest.py) and closes it.
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import threading
from pathlib import Path

from .conftest import RawConn, ServerProcess, wait_for


def addr(srv: ServerProcess) -> str:
    """``host:port``, as --replica-of takes it."""
    return f"{srv.host}:{srv.port}"


def url_of(srv: ServerProcess) -> str:
    """``logd://host:port``, as clients and the CLI take it."""
    return f"logd://{srv.host}:{srv.port}"


def stats_of(conn: RawConn) -> dict[str, str]:
    """One STATS round trip on an open connection: name -> value."""
    conn.send(b"STATS\r\n")
    first = conn.line()
    assert first.startswith(b"OK "), first
    return dict(conn.line().decode().split(" ", 1) for _ in range(int(first.split()[1])))


def stats(srv: ServerProcess) -> dict[str, str]:
    """STATS on a new connection."""
    conn = srv.connect()
    try:
        return stats_of(conn)
    finally:
        conn.close()


def head(srv: ServerProcess) -> int:
    conn = srv.connect()
    try:
        conn.send(b"HEAD\r\n")
        return int(conn.line().split()[1])
    finally:
        conn.close()


def head_once_leader_gone(srv: ServerProcess) -> int:
    """A follower's log head once it has seen the link to its dead leader end.

    Until then it may still be reading what the leader sent before it died, so
    its head can move on after a first look (a promotion named by that look is
    then refused)."""
    wait_for(lambda: stats(srv)["replication"] != "streaming", what="the follower to see its leader gone")
    return int(stats(srv)["log_head"])


def first_after_a_retention_pass(srv: ServerProcess) -> int:
    """The first retained id once a whole retention pass has run after this call.

    Passes run once a second, each in one go on the server's loop. One that ran
    while the test was still writing may have left segments the next one
    deletes, so ``first`` read after it could still move on."""
    passes = int(stats(srv)["retention_passes"])

    def after_it() -> dict[str, str] | None:
        now = stats(srv)
        return now if int(now["retention_passes"]) > passes else None

    return int(wait_for(after_it, what="a retention pass after the writes")["first"])


def read_all(srv: ServerProcess, start: int, count: int) -> list[tuple[int, bytes]]:
    conn = srv.connect(timeout=30)
    try:
        conn.send(b"READ %d %d\r\n" % (start, count))
        assert conn.line() == b"OK"
        out = []
        while (rec := conn.record()) is not None:
            out.append(rec)
        return out
    finally:
        conn.close()


def send_msgs(srv: ServerProcess, bodies: list[bytes]) -> int:
    """One MSG with ``bodies``; return the id of the last one."""
    conn = srv.connect(timeout=30)
    try:
        conn.send(b"MSG " + b" ".join(b"%d" % len(b) for b in bodies) + b"\r\n")
        conn.send(b"".join(b + b"\r\n" for b in bodies))
        reply = conn.line()
        assert reply.startswith(b"OK "), reply
        return int(reply.split()[1])
    finally:
        conn.close()


class Writer(threading.Thread):
    """Writes one-message MSGs, pipelined, until stopped; remembers the body of every acked id."""

    def __init__(self, srv: ServerProcess, prefix: bytes, window: int = 64, limit: int = 0) -> None:
        super().__init__(daemon=True)
        self.conn = srv.connect(timeout=30)
        self.prefix = prefix
        self.window = window
        self.limit = limit
        self.acked: dict[int, bytes] = {}
        self.errors: list[bytes] = []
        self.stop_event = threading.Event()
        self.failure: BaseException | None = None

    def run(self) -> None:
        sent: list[bytes] = []
        k = 0
        try:
            while not self.stop_event.is_set() and (not self.limit or k < self.limit):
                while len(sent) - len(self.acked) - len(self.errors) < self.window:
                    body = b"%s-%08d" % (self.prefix, k)
                    k += 1
                    sent.append(body)
                    self.conn.send(b"MSG %d\r\n%s\r\n" % (len(body), body))
                self._take_reply(sent)
            while len(self.acked) + len(self.errors) < len(sent):
                self._take_reply(sent)
        except (OSError, ConnectionError) as exc:
            self.failure = exc
        finally:
            self.conn.close()

    def _take_reply(self, sent: list[bytes]) -> None:
        reply = self.conn.line()
        body = sent[len(self.acked) + len(self.errors)]
        if reply.startswith(b"OK "):
            self.acked[int(reply.split()[1])] = body
        else:
            self.errors.append(reply)

    def finish(self, timeout: float = 30) -> None:
        self.stop_event.set()
        self.join(timeout)
        assert not self.is_alive(), "writer did not finish"


def closed_segments_identical(dirs: list[Path]) -> int:
    """Assert every closed segment (and index) of dirs[0] is byte-identical in the others."""
    names = sorted(n for n in os.listdir(dirs[0]) if n.endswith(".log"))
    for d in dirs[1:]:
        assert sorted(n for n in os.listdir(d) if n.endswith(".log")) == names, f"segment names differ in {d}"
    for name in names[:-1]:
        for ext in (".log", ".idx"):
            f = name[:-4] + ext
            for d in dirs[1:]:
                assert filecmp.cmp(dirs[0] / f, d / f, shallow=False), f"{f} differs in {d}"
    return len(names) - 1


def logd_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "logd.cli", *args], capture_output=True, text=True, timeout=30)


def try_msg(srv: ServerProcess, body: bytes) -> bytes:
    """One MSG; the reply line, whatever it is."""
    conn = srv.connect(timeout=30)
    try:
        conn.send(b"MSG %d\r\n%s\r\n" % (len(body), body))
        return conn.line()
    finally:
        conn.close()
