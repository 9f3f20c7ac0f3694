"""Authorization that follows the token at every step (issue 22, findings 2 and 3) on real servers:
a role change on SIGHUP reaches the open connections' MSG lanes, and cursors have owners."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from .conftest import RawConn, ServerProcess, new_token, wait_for


def authed(srv: ServerProcess, token: str) -> RawConn:
    c = srv.connect(timeout=30)
    c.send(b"AUTH %s\r\n" % token.encode())
    assert c.line() == b"OK"
    return c


def set_role(path: Path, name: str, role: str) -> None:
    """Give the token ``name`` another role in the auth file, keeping its hash (the same token)."""
    text = path.read_text()
    new, count = re.subn(rf"(?m)^{re.escape(name)} \w+ ", f"{name} {role} ", text)
    assert count == 1, text
    path.write_text(new)


def reload_auth(srv: ServerProcess) -> None:
    """SIGHUP, and wait until the server has reread the auth file (it logs each reload once)."""
    before = srv.stderr().count("auth_reloaded")
    os.kill(srv.pid, signal.SIGHUP)
    wait_for(lambda: srv.stderr().count("auth_reloaded") > before, timeout=30, what="the auth file reread")


# --- finding 2: a role change reaches the open connection's lane ------------------------------


@pytest.fixture(params=["C lane", "pure Python"])
def lane_kind(request, monkeypatch) -> str:  # type: ignore[no-untyped-def]
    """Each test runs with the C lane and with its pure-Python twin (LOGD_NO_EXTENSIONS=1)."""
    if request.param == "pure Python":
        monkeypatch.setenv("LOGD_NO_EXTENSIONS", "1")
    else:
        monkeypatch.delenv("LOGD_NO_EXTENSIONS", raising=False)
    return str(request.param)


def test_write_to_read_on_sighup_denies_the_open_connections_next_msg(start_server, tmp_path: Path,
                                                                       lane_kind: str) -> None:
    # Review finding 2: the open connection went on appending (5 of 5 MSGs OK) after its token
    # became read-only, until it sent some other command: its lane stayed open.
    path = tmp_path / "tokens.auth"
    token = new_token(path, "app", "write")
    srv = start_server("--auth-file", str(path))
    conn = authed(srv, token)
    for i in range(1, 4):  # one MSG a round trip: the way the lane takes them
        conn.send(b"MSG 1\r\nx\r\n")
        assert conn.line() == b"OK %d" % i
    set_role(path, "app", "read")
    reload_auth(srv)
    for _ in range(5):
        conn.send(b"MSG 1\r\ny\r\n")
        assert conn.line() == b"ERR DENIED role read may not send MSG"
    conn.send(b"HEAD\r\n")
    assert conn.line() == b"OK 3"  # nothing after the reload was appended
    # And back: the same open connection may write again once the role allows it.
    set_role(path, "app", "write")
    reload_auth(srv)
    conn.send(b"MSG 1\r\nz\r\n")
    assert conn.line() == b"OK 4"
    conn.send(b"MSG 1\r\nw\r\n")
    assert conn.line() == b"OK 5"


def test_a_revoked_token_closes_a_connection_whose_lane_was_open(start_server, tmp_path: Path,
                                                                  lane_kind: str) -> None:
    path = tmp_path / "tokens.auth"
    token = new_token(path, "app", "write")
    new_token(path, "other", "read")
    srv = start_server("--auth-file", str(path))
    conn = authed(srv, token)
    conn.send(b"MSG 1\r\nx\r\n")
    assert conn.line() == b"OK 1"
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines() if not line.startswith("app ")))
    reload_auth(srv)
    assert conn.line() == b"ERR DENIED token revoked"
    assert conn.closed_by_peer()
    other = srv.connect()
    other.send(b"AUTH %s\r\nHEAD\r\n" % token.encode())
    assert other.line() == b"ERR DENIED invalid token"
    assert other.line() == b"ERR DENIED authentication required"


def test_a_replicate_stream_ends_when_its_token_loses_the_replicate_role(start_server, tmp_path: Path) -> None:
    # Its ACKs would be refused in the middle of the stream: the connection is closed instead.
    path = tmp_path / "tokens.auth"
    token = new_token(path, "follower", "replicate")
    srv = start_server("--auth-file", str(path))
    conn = authed(srv, token)
    conn.send(b"REPLICATE 1\r\n")
    assert conn.line() == b"OK"
    assert conn.line() == b"+HEAD 0 0"
    set_role(path, "follower", "read")
    reload_auth(srv)
    assert conn.line() == b"ERR DENIED role read may not send REPLICATE"
    assert conn.closed_by_peer()
