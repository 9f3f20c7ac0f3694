"""Authentication and roles (issue 14) on real `logd serve` processes: AUTH, the role x command
matrix, wrong and revoked tokens, the 5-failure close, SIGHUP reload, protected mode, checked ACKs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from crc32c import crc32c

from logd import errors
from logd.client import Client

from .conftest import RawConn, ServerProcess, new_token, wait_for
from .helpers import url_of

ROLES = ("read", "write", "replicate", "admin")
_READ = {"PING", "CLOSE", "HEAD", "STATS", "READ", "COMMIT", "CURSOR", "CURSORS", "DROP"}
# protocol.md 3.5, the roles table.
ALLOWED: dict[str | None, set[str]] = {
    None: {"PING", "CLOSE"},
    "read": _READ,
    "write": _READ | {"MSG"},
    "replicate": _READ | {"REPLICATE", "ACK"},
    "admin": _READ | {"MSG", "REPLICATE", "ACK", "REFUSE", "ACCEPT", "SHUTDOWN"},
}
# Each command, and the first reply line it gets when it is let through (the log holds one
# message; the server has no --allow-shutdown). REFUSE comes just before ACCEPT, which undoes it.
# {token} is the token's name: the cursor each token owns without a grant (protocol.md 3.7).
COMMANDS: list[tuple[str, bytes, Callable[[bytes], bool]]] = [
    ("PING", b"PING\r\n", lambda r: r == b"PONG"),
    ("HEAD", b"HEAD\r\n", lambda r: r.startswith(b"OK ")),
    ("STATS", b"STATS\r\n", lambda r: r.startswith(b"OK ")),
    ("READ", b"READ 1 1\r\n", lambda r: r == b"OK"),
    ("COMMIT", b"COMMIT {token} 1\r\n", lambda r: r == b"OK"),
    ("CURSOR", b"CURSOR app\r\n", lambda r: r.startswith(b"OK ")),
    ("CURSORS", b"CURSORS\r\n", lambda r: r.startswith(b"OK ")),
    ("DROP", b"DROP {token}\r\n", lambda r: r == b"OK"),
    ("MSG", b"MSG 1\r\nx\r\n", lambda r: r.startswith(b"OK ")),
    ("REPLICATE", b"REPLICATE 1\r\n", lambda r: r == b"OK"),
    # Let through, an ACK outside a REPLICATE stream is a protocol error (and closes).
    ("ACK", b"ACK 0\r\n", lambda r: r.startswith(b"ERR BAD_FORMAT")),
    ("REFUSE", b"REFUSE\r\n", lambda r: r == b"OK"),
    ("ACCEPT", b"ACCEPT\r\n", lambda r: r == b"OK"),
    ("SHUTDOWN", b"SHUTDOWN\r\n", lambda r: r == b"ERR DENIED server was not started with --allow-shutdown"),
    ("CLOSE", b"CLOSE\r\n", lambda r: r == b"OK"),
]


def authed(srv: ServerProcess, token: str | None) -> RawConn:
    c = srv.connect(timeout=10)
    if token is not None:
        c.send(b"AUTH %s\r\n" % token.encode())
        assert c.line() == b"OK"
    return c


@pytest.fixture
def tokens(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """An auth file with one token per role."""
    path = tmp_path / "tokens.auth"
    return path, {role: new_token(path, f"t-{role}", role) for role in ROLES}


def test_role_by_command_matrix(start_server, tokens) -> None:  # type: ignore[no-untyped-def]
    path, by_role = tokens
    srv = start_server("--auth-file", str(path))
    c = authed(srv, by_role["write"])
    c.send(b"MSG 5\r\nfirst\r\n")
    assert c.line() == b"OK 1"
    seen: dict[tuple[str | None, str], bytes] = {}
    for role in (None, *ROLES):
        for verb, command, let_through in COMMANDS:
            conn = authed(srv, by_role[role] if role else None)
            conn.send(command.replace(b"{token}", b"t-%s" % (role or "none").encode()))
            reply = conn.line()
            seen[(role, verb)] = reply
            if verb in ALLOWED[role]:
                assert let_through(reply), (role, verb, reply)
            elif role is None:
                assert reply == b"ERR DENIED authentication required", (role, verb, reply)
            else:
                assert reply == b"ERR DENIED role %s may not send %s" % (role.encode(), verb.encode()), reply
            conn.close()
    # The server is still a writable leader: ACCEPT undid REFUSE, SHUTDOWN was refused.
    assert srv.proc.poll() is None
    assert Client(srv.host, srv.port, token=by_role["write"]).append("after") == [2 + sum(
        1 for (role, verb) in seen if verb == "MSG" and verb in ALLOWED[role])]


def test_denied_commands_change_nothing_and_keep_the_connection(start_server, tokens) -> None:  # type: ignore[no-untyped-def]
    path, by_role = tokens
    srv = start_server("--auth-file", str(path))
    c = srv.connect()
    # Pipelined: the MSG and REFUSE before AUTH are refused, those after it are run.
    c.send(b"MSG 1\r\na\r\nREFUSE\r\nAUTH %s\r\nMSG 1\r\nb\r\nREFUSE\r\nHEAD\r\n" % by_role["write"].encode())
    assert c.line() == b"ERR DENIED authentication required"
    assert c.line() == b"ERR DENIED authentication required"
    assert c.line() == b"OK"
    assert c.line() == b"OK 1"
    assert c.line() == b"ERR DENIED role write may not send REFUSE"
    assert c.line() == b"OK 1"
    assert Client(srv.host, srv.port, token=by_role["read"]).stats()["role"] == "leader"


def test_wrong_token_is_denied_and_a_later_good_one_works(start_server, tokens) -> None:  # type: ignore[no-untyped-def]
    path, by_role = tokens
    srv = start_server("--auth-file", str(path))
    c = srv.connect()
    c.send(b"AUTH not-a-token\r\nHEAD\r\nPING\r\n")
    assert c.line() == b"ERR DENIED invalid token"
    assert c.line() == b"ERR DENIED authentication required"
    assert c.line() == b"PONG"
    c.send(b"AUTH %s\r\nHEAD\r\n" % by_role["read"].encode())
    assert c.line() == b"OK"
    assert c.line() == b"OK 0"
    # A failed AUTH later leaves the earlier one in force.
    c.send(b"AUTH wrong\r\nHEAD\r\n")
    assert c.line() == b"ERR DENIED invalid token"
    assert c.line() == b"OK 0"
    with pytest.raises(errors.DeniedError):
        Client(srv.host, srv.port, token="x" + by_role["admin"]).head()
    with pytest.raises(errors.DeniedError, match="authentication required"):
        Client(srv.host, srv.port).head()
    assert Client.from_url(f"logd://:{by_role['read']}@{srv.host}:{srv.port}").head() == 0


def test_five_failures_close_the_connection_and_are_logged(start_server, tokens) -> None:  # type: ignore[no-untyped-def]
    path, _ = tokens
    srv = start_server("--auth-file", str(path))
    c = srv.connect()
    for i in range(4):
        c.send(b"AUTH guess-%d\r\n" % i)
        assert c.line() == b"ERR DENIED invalid token"
    c.send(b"PING\r\n")
    assert c.line() == b"PONG"
    c.send(b"AUTH guess-4\r\nPING\r\n")
    assert c.line() == b"ERR DENIED invalid token; 5 failed attempts, closing"
    assert c.closed_by_peer() and c.buf == b""  # the PING after it was not answered
    port = c.sock.getsockname()[1]
    log = wait_for(lambda: srv.stderr() if "failures=5" in srv.stderr() else None, what="failure logged")
    assert f"peer=127.0.0.1:{port}" in log and "guess-" not in log
    # Rate-limited: 25 more failures on 5 connections do not each get a line.
    for _ in range(5):
        c = srv.connect()
        c.send(b"AUTH nope\r\n" * 5)
        assert c.closed_by_peer()
    wait_for(lambda: srv.stderr().count("auth_failed") >= 10, what="failures logged")
    assert srv.stderr().count("auth_failed") < 30


def test_sighup_reload_adds_and_revokes_tokens(start_server, tokens) -> None:  # type: ignore[no-untyped-def]
    path, by_role = tokens
    srv = start_server("--auth-file", str(path))
    reader = authed(srv, by_role["read"])
    tail = authed(srv, by_role["admin"])
    tail.send(b"READ 1\r\n")
    assert tail.line() == b"OK"
    late = new_token(path, "late", "write")
    c = srv.connect()
    c.send(b"AUTH %s\r\n" % late.encode())
    assert c.line() == b"ERR DENIED invalid token"  # not reread yet
    subprocess.run([sys.executable, "-m", "logd.cli", "token", "remove", "t-admin", "--auth-file", str(path)],
                   check=True, capture_output=True, timeout=60)
    os.kill(srv.pid, signal.SIGHUP)

    def late_works() -> bool:
        conn = srv.connect()
        conn.send(b"AUTH %s\r\n" % late.encode())
        return conn.line() == b"OK"

    wait_for(late_works, timeout=20, what="the new token after SIGHUP")
    # The admin token is gone: new AUTHs fail, and its open tail was closed with a reason.
    assert tail.line() == b"ERR DENIED token revoked"
    assert tail.closed_by_peer()
    with pytest.raises(errors.DeniedError, match="invalid token"):
        Client(srv.host, srv.port, token=by_role["admin"]).head()
    # Other connections go on with their role.
    reader.send(b"HEAD\r\nMSG 1\r\nx\r\n")
    assert reader.line() == b"OK 0"
    assert reader.line() == b"ERR DENIED role read may not send MSG"
    assert "auth_reloaded" in srv.stderr()


def test_a_bad_auth_file_on_reload_keeps_the_old_tokens(start_server, tokens) -> None:  # type: ignore[no-untyped-def]
    path, by_role = tokens
    srv = start_server("--auth-file", str(path))
    path.write_text("this is not an auth file\n")
    os.kill(srv.pid, signal.SIGHUP)
    wait_for(lambda: "auth_reload_failed" in srv.stderr(), timeout=20, what="reload failure logged")
    assert Client(srv.host, srv.port, token=by_role["read"]).head() == 0


def test_admin_commands_are_logged_with_peer_and_token_name(start_server, tokens) -> None:  # type: ignore[no-untyped-def]
    path, by_role = tokens
    srv = start_server("--auth-file", str(path), "--allow-shutdown")
    c = authed(srv, by_role["admin"])
    c.send(b"REFUSE\r\nACCEPT\r\nSHUTDOWN\r\n")
    assert [c.line() for _ in range(3)] == [b"OK", b"OK", b"OK"]
    assert srv.proc.wait(timeout=20) == 0
    port = c.sock.getsockname()[1]
    lines = [line for line in srv.stderr().splitlines() if "admin_command" in line]
    assert [line.split("command=")[1].split()[0] for line in lines] == ["REFUSE", "ACCEPT", "SHUTDOWN"]
    assert all(f"peer=127.0.0.1:{port}" in line and "token=t-admin" in line for line in lines)


def test_token_cli_file_mode_list_and_remove(tmp_path: Path) -> None:
    path = tmp_path / "new.auth"
    token = new_token(path, "app", "write")
    assert path.stat().st_mode & 0o777 == 0o600
    assert token not in path.read_text()  # only its hash
    cli = [sys.executable, "-m", "logd.cli", "token"]
    listed = subprocess.run([*cli, "list", "--auth-file", str(path)], capture_output=True, timeout=60)
    assert listed.stdout == b"app\twrite\tcursors=app,app.*\n"
    again = subprocess.run([*cli, "add", "app", "--role", "read", "--auth-file", str(path)], capture_output=True,
                           timeout=60)
    assert again.returncode == 1 and again.stdout == b"" and b"already exists" in again.stderr
    gone = subprocess.run([*cli, "remove", "nobody", "--auth-file", str(path)], capture_output=True, timeout=60)
    assert gone.returncode == 1 and b"no token named 'nobody'" in gone.stderr
    subprocess.run([*cli, "remove", "app", "--auth-file", str(path)], check=True, capture_output=True, timeout=60)
    listed = subprocess.run([*cli, "list", "--auth-file", str(path)], capture_output=True, timeout=60)
    assert listed.returncode == 0 and listed.stdout == b""


def test_cli_takes_the_token_from_the_url_or_logd_token(start_server, tokens) -> None:  # type: ignore[no-untyped-def]
    path, by_role = tokens
    srv = start_server("--auth-file", str(path))
    base = [sys.executable, "-m", "logd.cli"]
    env = {k: v for k, v in os.environ.items() if k != "LOGD_TOKEN"}
    url = url_of(srv)
    denied = subprocess.run([*base, "append", "--url", url, "m"], capture_output=True, env=env, timeout=60)
    assert denied.returncode == 1 and denied.stderr == b"logd: DENIED authentication required\n"
    ok = subprocess.run([*base, "append", "--url", url, "m"], capture_output=True, timeout=60,
                        env={**env, "LOGD_TOKEN": by_role["write"]})
    assert ok.returncode == 0 and ok.stdout == b"1\n"
    head = subprocess.run([*base, "head", "--url", f"logd://:{by_role['read']}@{srv.host}:{srv.port}"],
                          capture_output=True, env=env, timeout=60)
    assert head.stdout == b"1\n"
    demote = subprocess.run([*base, "demote", f"logd://:{by_role['write']}@{srv.host}:{srv.port}"],
                            capture_output=True, env=env, timeout=60)
    assert demote.returncode == 1 and b"may not send REFUSE" in demote.stderr
    for result in (denied, ok, head, demote):
        assert all(t.encode() not in result.stdout + result.stderr for t in by_role.values())


def test_without_auth_file_auth_is_accepted_and_everything_allowed(server: ServerProcess) -> None:
    c = server.connect()
    c.send(b"AUTH anything\r\nMSG 1\r\nx\r\nREFUSE\r\nACCEPT\r\n")
    assert [c.line() for _ in range(4)] == [b"OK", b"OK 1", b"OK", b"OK"]


# --- protected mode -------------------------------------------------------------------


def serve_argv(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "logd.cli", "serve", "--port", "0", "--data-dir", str(tmp_path / "d"), *args]


def test_protected_mode_refuses_a_public_address_without_auth(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOGD_")}
    for host in ("0.0.0.0", "::"):
        result = subprocess.run(serve_argv(tmp_path, "--host", host), capture_output=True, env=env, timeout=60)
        assert result.returncode == 3, result
        assert b"without authentication" in result.stderr and b"--insecure" in result.stderr
        assert b"Traceback" not in result.stderr and result.stdout == b""
        assert not (tmp_path / "d").exists()  # refused before touching anything


@pytest.mark.parametrize("extra", [["--insecure"], ["--auth-file", "AUTH"]])
def test_public_address_starts_with_insecure_or_an_auth_file(start_server, tmp_path: Path, extra) -> None:  # type: ignore[no-untyped-def]
    if "AUTH" in extra:
        new_token(tmp_path / "a.auth", "x", "read")
        extra = ["--auth-file", str(tmp_path / "a.auth")]
    srv = start_server("--host", "0.0.0.0", *extra)
    assert srv.host == "0.0.0.0"
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(b"PING\r\n")
        assert s.recv(16) == b"PONG\r\n"


# --- ACKs are checked (the fake-ACK scenario) ------------------------------------------


def test_a_fake_ack_does_not_make_msg_answer_ok(start_server) -> None:  # type: ignore[no-untyped-def]
    leader = start_server("--min-replicas", "1", "--replica-timeout", "1")
    rogue = leader.connect()
    rogue.send(b"REPLICATE 1\r\n")
    assert rogue.line() == b"OK"
    assert rogue.line() == b"+HEAD 0 0"
    stats = Client(leader.host, leader.port).stats()
    assert stats["replicas_in_sync"] == "0"  # a stream counts only from its first honest ACK
    rogue.send(b"ACK 9223372036854775807\r\n")
    reply = rogue.line()
    if reply == b"+EOF":  # the stream ends first, then the error
        reply = rogue.line()
    assert reply.startswith(b"ERR BAD_FORMAT ACK 9223372036854775807 is above the highest id sent"), reply
    assert rogue.closed_by_peer()
    c = leader.connect()
    c.send(b"MSG 4\r\nfake\r\n")
    reply = c.line()
    assert reply.startswith(b"ERR UNAVAILABLE 0 replicas in sync"), reply
    assert Client(leader.host, leader.port).stats()["replicas_in_sync"] == "0"


def test_ack_outside_a_replicate_stream_closes(server: ServerProcess) -> None:
    c = server.connect()
    c.send(b"ACK 0\r\nPING\r\n")
    assert c.line() == b"ERR BAD_FORMAT ACK is only valid on a running REPLICATE stream"
    assert c.closed_by_peer() and c.buf == b""


def test_an_honest_ack_counts_and_lets_msg_answer_ok(start_server) -> None:  # type: ignore[no-untyped-def]
    leader = start_server("--min-replicas", "1", "--replica-timeout", "5")
    replica = leader.connect()
    replica.send(b"REPLICATE 1\r\n")
    assert replica.line() == b"OK"
    assert replica.line() == b"+HEAD 0 0"
    replica.send(b"ACK 0\r\n")  # what a follower sends once its stream has started
    wait_for(lambda: Client(leader.host, leader.port).stats()["replicas_in_sync"] == "1", what="replica counted")
    writer = leader.connect()
    writer.send(b"MSG 2\r\nhi\r\n")
    while (line := replica.line()) != b"+SEG 1":
        assert line.startswith(b"+HEAD"), line
    assert replica.line() == b"+1 2 %08x" % crc32c(b"hi")
    replica.send(b"ACK 1\r\n")
    assert writer.line() == b"OK 1"
