"""Authorization that follows the token at every step (issue 22, findings 2 and 3) on real servers:
a role change on SIGHUP reaches the open connections' MSG lanes, and cursors have owners."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from .conftest import RawConn, ServerProcess, new_token, wait_for
from .test_metrics import metrics_url


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


# --- finding 4: protected mode covers the metrics port ----------------------------------------


def serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    """``logd serve`` that is expected to refuse to start (it would run for ever otherwise)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOGD_")}
    argv = [sys.executable, "-m", "logd.cli", "serve", "--port", "0", "--data-dir", str(tmp_path / "d"), *args]
    return subprocess.run(argv, capture_output=True, env=env, timeout=60)


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
@pytest.mark.parametrize("main_port", [["--insecure"], ["--auth-file", "AUTH"], []])
def test_metrics_off_loopback_needs_metrics_public(tmp_path: Path, host: str, main_port: list[str]) -> None:
    # Review finding 4: `--metrics-host 0.0.0.0` started with neither --auth-file nor --insecure.
    # The endpoint has no authentication, so neither an auth file nor --insecure (which is about
    # the log's port) lets it off loopback: only --metrics-public does.
    if main_port == ["--auth-file", "AUTH"]:
        new_token(tmp_path / "a.auth", "x", "read")
        main_port = ["--auth-file", str(tmp_path / "a.auth")]
    result = serve(tmp_path, *main_port, "--metrics-port", "0", "--metrics-host", host)
    assert result.returncode == 3, result
    assert f"refusing to serve metrics on {host!r}".encode() in result.stderr
    assert b"--metrics-public" in result.stderr
    assert b"Traceback" not in result.stderr and result.stdout == b""
    assert not (tmp_path / "d").exists()  # refused before touching anything


def test_both_ports_refused_say_so_both(tmp_path: Path) -> None:
    result = serve(tmp_path, "--host", "0.0.0.0", "--metrics-port", "0", "--metrics-host", "0.0.0.0")
    assert result.returncode == 3
    assert b"refusing to listen on '0.0.0.0'" in result.stderr
    assert b"refusing to serve metrics on '0.0.0.0'" in result.stderr


def test_metrics_public_serves_off_loopback_and_loopback_needs_nothing(start_server) -> None:  # type: ignore[no-untyped-def]
    public = start_server("--metrics-port", "0", "--metrics-host", "0.0.0.0", "--metrics-public")
    url = metrics_url(public)
    assert url.startswith("http://0.0.0.0:")
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        assert resp.status == 200 and b"logd_head_id" in resp.read()
    local = start_server("--metrics-port", "0", "--metrics-host", "127.0.0.2")  # loopback too: no opt-in
    assert metrics_url(local).startswith("http://127.0.0.2:")
