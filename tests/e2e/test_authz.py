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

import logd
from logd.client import Client

from .conftest import SECRETS, RawConn, ServerProcess, new_token, wait_for
from .helpers import addr, send_msgs, stats_of
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


# --- finding 3: cursors have owners ----------------------------------------------------------


def ask_as(srv: ServerProcess, token: str | None, *lines: bytes) -> list[bytes]:
    """On a new connection (authenticated with ``token`` if given): the first reply line of each command."""
    conn = authed(srv, token) if token is not None else srv.connect(timeout=30)
    try:
        conn.send(b"".join(line + b"\r\n" for line in lines))
        return [conn.line() for _ in lines]
    finally:
        conn.close()


def cursors_on(srv: ServerProcess, token: str | None = None) -> dict[str, int]:
    """CURSORS: name -> id."""
    conn = authed(srv, token) if token is not None else srv.connect(timeout=30)
    try:
        conn.send(b"CURSORS\r\n")
        first = conn.line()
        assert first.startswith(b"OK "), first
        lines = [conn.line().decode().split(" ") for _ in range(int(first.split()[1]))]
        return {name: int(id) for name, id in lines}
    finally:
        conn.close()


def stats_as(srv: ServerProcess, token: str) -> dict[str, str]:
    conn = authed(srv, token)
    try:
        return stats_of(conn)
    finally:
        conn.close()


def first_after_a_pass(srv: ServerProcess, token: str) -> int:
    """The first retained id once a whole retention pass ran after this call (as helpers.py's, with a token)."""
    passes = int(stats_as(srv, token)["retention_passes"])

    def after_it() -> dict[str, str] | None:
        now = stats_as(srv, token)
        return now if int(now["retention_passes"]) > passes else None

    return int(wait_for(after_it, what="a retention pass")["first"])


def fill(srv: ServerProcess, token: str, segments: int) -> int:
    """Append ``segments`` MSGs of 8 x 100 bytes (one 1 KiB segment each); return the last id."""
    conn = authed(srv, token)
    try:
        last = 0
        for _ in range(segments):
            conn.send(b"MSG " + b" ".join([b"100"] * 8) + b"\r\n" + (b"r" * 100 + b"\r\n") * 8)
            reply = conn.line()
            assert reply.startswith(b"OK "), reply
            last = int(reply.split()[1])
        return last
    finally:
        conn.close()


RETAIN = ("--segment-bytes", "1KiB", "--retention-bytes", "2KiB", "--retention-keep-cursors",
          "--retention-cap-bytes", "1MiB")


def test_a_read_token_moves_and_pins_only_the_cursors_it_owns(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Review finding 3: with --retention-keep-cursors, token `intruder` sent COMMIT billing 200: OK,
    # and retention deleted what `billing` had not read yet; it could pin retention for ever with a
    # cursor of its own choosing (COMMIT zz-pin 0), and no command dropped a cursor.
    path = tmp_path / "tokens.auth"
    app, billing = new_token(path, "app", "write"), new_token(path, "billing", "read")
    intruder, admin = new_token(path, "intruder", "read"), new_token(path, "ops", "admin")
    srv = start_server("--auth-file", str(path), *RETAIN)
    assert ask_as(srv, billing, b"COMMIT billing 0") == [b"OK"]  # billing has read nothing yet
    top = fill(srv, app, 12)
    assert ask_as(srv, intruder, b"COMMIT billing %d" % top, b"DROP billing", b"COMMIT zz-pin 0") == [
        b"ERR DENIED token intruder may not move cursor billing (its cursors: intruder, intruder.*)",
        b"ERR DENIED token intruder may not drop cursor billing (its cursors: intruder, intruder.*)",
        b"ERR DENIED token intruder may not move cursor zz-pin (its cursors: intruder, intruder.*)",
    ]
    # Reading cursors stays open to every read role; nothing above changed one.
    assert ask_as(srv, intruder, b"CURSOR billing", b"CURSORS") == [b"OK 0", b"OK 1"]
    assert first_after_a_pass(srv, app) == 1  # billing, at 0, still keeps the whole log
    conn = authed(srv, billing)
    conn.send(b"READ 1 1\r\n")
    assert conn.line() == b"OK"
    assert conn.record() == (1, b"r" * 100)
    conn.close()
    # Its own cursors it may make, move and drop; one at 0 pins retention until it moves or is dropped.
    assert ask_as(srv, intruder, b"COMMIT intruder 0", b"COMMIT intruder.sub %d" % top,
                  b"DROP intruder.sub") == [b"OK", b"OK", b"OK"]
    assert ask_as(srv, billing, b"COMMIT billing %d" % top) == [b"OK"]
    assert first_after_a_pass(srv, app) == 1  # now `intruder` (at 0) holds it all
    assert ask_as(srv, admin, b"DROP intruder") == [b"OK"]  # admin may drop any cursor
    wait_for(lambda: int(stats_as(srv, app)["first"]) > 1 and int(stats_as(srv, app)["bytes"]) <= 2048, 60,
             "retention once the pinning cursor was dropped")
    assert ask_as(srv, intruder, b"CURSORS") == [b"OK 1"]


def test_a_grant_names_the_cursors_a_token_may_move(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "tokens.auth"
    cli = [sys.executable, "-m", "logd.cli", "token"]
    added = subprocess.run([*cli, "add", "etl", "--role", "read", "--cursors", "billing,sink.*", "--auth-file",
                            str(path)], capture_output=True, text=True, timeout=60, check=True)
    etl = added.stdout.strip()
    SECRETS.append(etl)
    none = subprocess.run([*cli, "add", "dash", "--role", "read", "--cursors", "", "--auth-file", str(path)],
                          capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    SECRETS.append(none)
    bad = subprocess.run([*cli, "add", "x", "--role", "read", "--cursors", "a*b", "--auth-file", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "bad cursor pattern 'a*b'" in bad.stderr
    boss = subprocess.run([*cli, "add", "boss", "--role", "admin", "--cursors", "a", "--auth-file", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert boss.returncode == 1 and "admin token may move and drop every cursor" in boss.stderr
    listed = subprocess.run([*cli, "list", "--auth-file", str(path)], capture_output=True, text=True, timeout=60)
    assert listed.stdout == "etl\tread\tcursors=billing,sink.*\ndash\tread\tcursors=\n"
    assert "etl read sha256:" in path.read_text() and " cursors=billing,sink.*\n" in path.read_text()
    srv = start_server("--auth-file", str(path))
    assert ask_as(srv, etl, b"COMMIT billing 0", b"COMMIT sink.pg 0", b"COMMIT sink.pg.b 0") == [b"OK"] * 3
    denied = ask_as(srv, etl, b"COMMIT etl 0", b"COMMIT billing2 0", b"COMMIT sink 0", b"DROP sink")
    grant = b"(its cursors: billing, sink.*)"
    assert denied == [b"ERR DENIED token etl may not move cursor %s %s" % (n, grant)
                      for n in (b"etl", b"billing2", b"sink")] + [
        b"ERR DENIED token etl may not drop cursor sink %s" % grant]
    assert ask_as(srv, none, b"COMMIT dash 0", b"CURSORS") == [
        b"ERR DENIED token dash may not move cursor dash (its cursors: none)", b"OK 3"]


def test_logd_cursors_drop(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "tokens.auth"
    billing, other, admin = (new_token(path, n, r) for n, r in (("billing", "read"), ("other", "read"),
                                                                ("ops", "admin")))
    srv = start_server("--auth-file", str(path))
    assert ask_as(srv, billing, b"COMMIT billing 0", b"COMMIT billing.eu 0") == [b"OK", b"OK"]
    env = {k: v for k, v in os.environ.items() if k != "LOGD_TOKEN"}
    url = f"logd://{srv.host}:{srv.port}"

    def drop(name: str, token: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "logd.cli", "cursors", "--url", url, "--drop", name],
                              capture_output=True, text=True, timeout=60, env={**env, "LOGD_TOKEN": token})

    refused = drop("billing", other)
    assert refused.returncode == 1
    assert refused.stderr == ("logd: DENIED token other may not drop cursor billing "
                              "(its cursors: other, other.*)\n")
    done = drop("billing.eu", billing)  # its owner
    assert done.returncode == 0 and done.stderr == "logd: cursor 'billing.eu' dropped\n"
    assert drop("billing", admin).returncode == 0  # admin: any
    again = drop("billing", admin)
    assert again.returncode == 1 and again.stderr == "logd: NOT_FOUND no cursor named billing\n"
    bad = drop("no/slash", admin)
    assert bad.returncode == 2 and "bad cursor name" in bad.stderr
    assert ask_as(srv, other, b"CURSORS") == [b"OK 0"]
    for result in (refused, done, again):
        assert all(t not in result.stdout + result.stderr for t in (billing, other, admin))


def test_without_authentication_any_connection_moves_and_drops_any_cursor(server: ServerProcess) -> None:
    send_msgs(server, [b"a", b"b"])
    assert ask_as(server, None, b"COMMIT anyone 2", b"DROP anyone", b"DROP anyone", b"CURSOR anyone") == [
        b"OK", b"OK", b"ERR NOT_FOUND no cursor named anyone", b"OK 0"]
    assert ask_as(server, None, b"DROP b@d", b"DROP", b"DROP a b") == [
        b"ERR BAD_FORMAT bad cursor name 'b@d': 1 to 64 of A-Z a-z 0-9 . _ -",
        b"ERR BAD_FORMAT DROP takes <name>", b"ERR BAD_FORMAT DROP takes <name>"]
    # A dropped name is free: made again, it starts wherever its new consumer says.
    assert ask_as(server, None, b"COMMIT again 2", b"DROP again", b"COMMIT again 1", b"CURSOR again") == [
        b"OK", b"OK", b"OK", b"OK 1"]
    with Client(server.host, server.port) as client:
        client.drop_cursor("again")
        with pytest.raises(logd.NotFoundError):
            client.drop_cursor("again")


@pytest.mark.parametrize("fsync", ["always", "interval:50"])
def test_an_acknowledged_drop_survives_kill_9(start_server, fsync: str) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--fsync", fsync)
    send_msgs(srv, [b"x"] * 5)
    assert ask_as(srv, None, b"COMMIT gone 5", b"COMMIT kept 3", b"COMMIT back 4", b"DROP gone", b"DROP back",
                  b"COMMIT back 1") == [b"OK"] * 6
    srv.kill()  # under interval: written to the OS before OK, which a crash of the process alone keeps
    again = start_server(data_dir=srv.data_dir)
    assert cursors_on(again) == {"kept": 3, "back": 1}


def test_drops_reach_followers_also_those_away_at_the_time(start_server) -> None:  # type: ignore[no-untyped-def]
    leader = start_server("--segment-bytes", "4KiB")
    send_msgs(leader, [b"m%d" % i for i in range(100)])
    assert ask_as(leader, None, b"COMMIT live 10", b"COMMIT away 90", b"COMMIT stays 50") == [b"OK"] * 3
    near = start_server("--replica-of", addr(leader))
    far = start_server("--replica-of", addr(leader))
    for f in (near, far):
        wait_for(lambda f=f: cursors_on(f) == {"live": 10, "away": 90, "stays": 50}, 30, "the cursors on a follower")
    far.terminate()
    # While `far` is down: `away` is dropped and made again lower (its old value is not the new cursor's).
    assert ask_as(leader, None, b"DROP live", b"DROP away", b"COMMIT away 20") == [b"OK"] * 3
    wait_for(lambda: cursors_on(near) == {"away": 20, "stays": 50}, 30, "the drops on the follower that was there")
    assert ask_as(near, None, b"DROP stays")[0].startswith(b"ERR READONLY")
    far = start_server("--replica-of", addr(leader), data_dir=far.data_dir)
    wait_for(lambda: cursors_on(far) == {"away": 20, "stays": 50}, 30, "the drops on the follower that was away")
    # On its disk too: promoted and restarted, it keeps what it was told.
    leader.terminate()
    assert ask_as(far, None, b"ACCEPT") == [b"OK"]
    far.terminate()
    again = start_server(data_dir=far.data_dir)
    assert cursors_on(again) == {"away": 20, "stays": 50}


def test_max_cursors_refuses_the_one_too_many(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--max-cursors", "3")
    send_msgs(srv, [b"x"])
    assert ask_as(srv, None, b"COMMIT a 0", b"COMMIT b 0", b"COMMIT c 1") == [b"OK"] * 3
    assert ask_as(srv, None, b"COMMIT d 0", b"COMMIT a 1", b"CURSORS") == [
        b"ERR TOO_LARGE cursor d would be cursor 4, over --max-cursors 3: drop one first "
        b"(DROP <name>, logd cursors --drop NAME)", b"OK", b"OK 3"]
    with Client(srv.host, srv.port) as client, pytest.raises(logd.TooLargeError):
        client.commit("e", 1)
    assert ask_as(srv, None, b"DROP b", b"COMMIT d 0", b"CURSORS") == [b"OK", b"OK", b"OK 3"]
    # Restarted with more cursors on disk than it allows: they stay and move; no new one is made.
    srv.terminate()
    fewer = start_server("--max-cursors", "1", data_dir=srv.data_dir)
    assert ask_as(fewer, None, b"COMMIT a 1", b"COMMIT new 1", b"CURSORS")[::2] == [b"OK", b"OK 3"]
    bad = serve(tmp_path, "--max-cursors", "-1")
    assert bad.returncode == 2 and b"max-cursors must be 0 or more" in bad.stderr


def test_a_grant_changed_on_sighup_applies_to_the_open_connection(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "tokens.auth"
    token = new_token(path, "etl", "read")
    srv = start_server("--auth-file", str(path))
    conn = authed(srv, token)
    conn.send(b"COMMIT etl 0\r\nCOMMIT billing 0\r\n")
    assert conn.line() == b"OK"
    assert conn.line().startswith(b"ERR DENIED token etl may not move cursor billing")
    path.write_text(path.read_text().replace("\n", " cursors=billing\n").replace("# logd auth file: one token per "
                                                                                "line", "#"))
    reload_auth(srv)
    conn.send(b"COMMIT billing 0\r\nCOMMIT etl 0\r\nDROP etl\r\n")
    assert conn.line() == b"OK"
    assert conn.line() == b"ERR DENIED token etl may not move cursor etl (its cursors: billing)"
    assert conn.line() == b"ERR DENIED token etl may not drop cursor etl (its cursors: billing)"
