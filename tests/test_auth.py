"""Tokens, roles and the per-connection auth state, with no server: logd/auth.py and logd/access.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from logd import protocol
from logd.access import AuthGate, ConnectionAuth, LogLimiter
from logd.auth import (
    AuthFileError,
    AuthTable,
    add_token,
    is_loopback,
    load_table,
    parse_table,
    remove_token,
    token_hash,
)
from logd.protocol import CommandParser
from logd.protocol.session import ServerSession

from .test_session import ModelBackend


def test_add_creates_a_0600_file_holding_only_the_hash(tmp_path: Path) -> None:
    path = tmp_path / "a.auth"
    old = os.umask(0)  # even a permissive umask gives 0600
    try:
        token = add_token(str(path), "app", "write")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert token not in text and token_hash(token) in text
    table = load_table(str(path))
    entry = table.lookup(token)
    assert entry is not None and (entry.name, entry.role) == ("app", "write")
    assert table.lookup(token + "x") is None and table.lookup("") is None


def test_rewriting_a_loose_file_makes_it_0600_and_remove_works(tmp_path: Path) -> None:
    path = tmp_path / "a.auth"
    first = add_token(str(path), "one", "read")
    path.chmod(0o644)
    second = add_token(str(path), "two", "admin")
    assert path.stat().st_mode & 0o777 == 0o600
    remove_token(str(path), "one")
    table = load_table(str(path))
    assert table.lookup(first) is None and table.lookup(second) is not None
    with pytest.raises(AuthFileError, match="no token named"):
        remove_token(str(path), "one")
    with pytest.raises(AuthFileError, match="already exists"):
        add_token(str(path), "two", "read")
    with pytest.raises(AuthFileError, match="unknown role"):
        add_token(str(path), "three", "root")
    with pytest.raises(AuthFileError, match="bad token name"):
        add_token(str(path), "has space", "read")


GOOD = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("app write\n", "line 1: expected"),
        (f"# c\n\napp root {GOOD}\n", "line 3: unknown role"),
        ("app read sha256:xyz\n", "the hash must be"),
        (f"app read md5:{'ab' * 32}\n", "the hash must be"),
        (f"a/b read {GOOD}\n", "bad token name"),
        (f"app read {GOOD}\napp write {GOOD}\n", "appears twice"),
    ],
)
def test_bad_auth_files_name_the_line(text: str, complaint: str) -> None:
    with pytest.raises(AuthFileError, match=complaint):
        parse_table(text)


def test_comments_and_blank_lines_are_ignored() -> None:
    table = parse_table(f"# header\n\n  app read {GOOD}  # trailing\n")
    assert list(table.entries) == ["app"]
    assert parse_table(table.render()).entries == table.entries


def test_a_missing_file_is_an_auth_file_error(tmp_path: Path) -> None:
    with pytest.raises(AuthFileError, match="cannot read auth file"):
        load_table(str(tmp_path / "nope"))


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("", False), ("10.1.2.3", False), ("no-such-host.invalid", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_log_limiter_allows_a_burst_per_window_and_counts_the_rest() -> None:
    now = [0.0]
    limiter = LogLimiter(burst=3, window=10.0, clock=lambda: now[0])
    assert [limiter.allow() for _ in range(5)] == [(True, 0)] * 3 + [(False, 0)] * 2
    now[0] = 10.5
    assert limiter.allow() == (True, 2)  # the next window says how many were held back
    assert limiter.allow() == (True, 0)


def table_with(**roles: str) -> tuple[AuthTable, dict[str, str]]:
    """A table with one token per role, named after it; the tokens are their own names reversed."""
    from logd.auth import TokenEntry

    tokens = {name: name[::-1] + "-secret" for name in roles}
    return AuthTable([TokenEntry(n, r, token_hash(tokens[n])) for n, r in roles.items()]), tokens


def test_connection_auth_counts_failures_and_closes_at_five() -> None:
    table, tokens = table_with(reader="read")
    auth = ConnectionAuth(AuthGate(table), "10.0.0.9:4242")
    for i in range(1, 5):
        assert auth.check(protocol.Auth(b"bad")) == b"ERR DENIED invalid token\r\n"
        assert auth.failures == i and not auth.closing
    assert auth.check(protocol.Auth(b"bad")).startswith(b"ERR DENIED invalid token; 5 failed")
    assert auth.closing


def test_connection_auth_roles_and_rebind() -> None:
    table, tokens = table_with(reader="read", app="write")
    auth = ConnectionAuth(AuthGate(table))
    assert protocol.Head not in auth.allowed and protocol.Ping in auth.allowed
    assert auth.check(protocol.Head()) == b"ERR DENIED authentication required\r\n"
    assert auth.check(protocol.Auth(tokens["app"].encode())) == b"OK\r\n"
    assert protocol.Msg in auth.allowed and protocol.Replicate not in auth.allowed
    assert auth.check(protocol.Refuse()) == b"ERR DENIED role write may not send REFUSE\r\n"
    # The file is reread: the token keeps its entry, then is removed.
    new, _ = table_with(app="read")
    new.entries["app"] = type(new.entries["app"])("app", "read", token_hash(tokens["app"]))
    assert auth.rebind(new) and auth.role == "read" and protocol.Msg not in auth.allowed
    assert not auth.rebind(AuthTable())


def test_session_with_auth_answers_in_order_and_closes_after_five_failures() -> None:
    table, tokens = table_with(app="write")
    auth = ConnectionAuth(AuthGate(table))
    backend = ModelBackend()
    session = ServerSession(backend, CommandParser(), auth=auth)
    session.receive(b"MSG 1\r\na\r\nAUTH %s\r\nMSG 1\r\nb\r\nHEAD\r\n" % tokens["app"].encode())
    # The refused MSG and the AUTH are answered at once; HEAD waits for the MSG after AUTH.
    assert session.data_to_send() == b"ERR DENIED authentication required\r\nOK\r\n"
    backend.commit()
    assert session.data_to_send() == b"OK 1\r\nOK 1\r\n"
    assert backend.log == [b"b"]
    other = ServerSession(ModelBackend(), CommandParser(), auth=ConnectionAuth(AuthGate(table)))
    other.receive(b"AUTH x\r\n" * 5 + b"PING\r\n")
    out = other.data_to_send()
    assert out.count(b"ERR DENIED invalid token") == 5 and b"PONG" not in out
    assert other.closed


def test_session_without_a_gate_accepts_auth() -> None:
    session = ServerSession(ModelBackend(), CommandParser())
    session.receive(b"AUTH whatever\r\nPING\r\n")
    assert session.data_to_send() == b"OK\r\nPONG\r\n"


def test_auth_behind_an_unanswered_msg_waits_and_counts_its_failure_once() -> None:
    table, tokens = table_with(app="write")
    auth = ConnectionAuth(AuthGate(table))
    backend = ModelBackend()
    session = ServerSession(backend, CommandParser(), auth=auth)
    session.receive(b"AUTH %s\r\nMSG 1\r\na\r\nAUTH wrong\r\nPING\r\n" % tokens["app"].encode())
    assert session.data_to_send() == b"OK\r\n"
    for _ in range(3):  # the adapter may ask many times before the commit
        assert session.data_to_send() == b""
        assert auth.failures == 0
    backend.commit()
    assert session.data_to_send() == b"OK 1\r\nERR DENIED invalid token\r\nPONG\r\n"
    assert auth.failures == 1 and auth.role == "write"


# --- issue 22, finding 6: nothing unauthenticated is held ------------------------------------------


def run_split(chunks: list[bytes], auth: ConnectionAuth) -> tuple[bytes, ModelBackend, list[int]]:
    """Feed ``chunks`` to a session with ``auth``, committing as the adapter would; return every reply,
    the backend, and the most input the session held (partial and declared) after any chunk."""
    backend = ModelBackend()
    session = ServerSession(backend, CommandParser(max_message_bytes=1 << 20), auth=auth)
    out, held = [], []
    for chunk in chunks:
        session.receive(chunk)
        out.append(session.data_to_send())
        held.append(session.partial_bytes + session.declared_bytes)
        backend.commit()
        out.append(session.data_to_send())
    return b"".join(out), backend, held


def test_a_msg_before_auth_is_refused_at_its_line_and_its_bodies_are_never_held() -> None:
    table, tokens = table_with(app="write", reader="read")
    body = b"x" * 300_000
    stream = b"PING\r\nMSG 1048576 1048576\r\n" + body  # 2 MiB declared, 300 kB of it sent
    out, backend, held = run_split([stream[:20], stream[20:100_000], stream[100_000:]], ConnectionAuth(AuthGate(table)))
    assert out == b"PONG\r\nERR DENIED authentication required\r\n"
    assert max(held) < 1024, held  # neither the bodies nor their declared size: the MSG reserves nothing
    # A read token's MSG is refused the same way, with the role's reason.
    auth = ConnectionAuth(AuthGate(table))
    rest = b"x" * 9 + b"\r\n" + b"y" * 5 + b"\r\nPING\r\n"
    out, backend, held = run_split([b"AUTH %s\r\nMSG 9 5\r\n" % tokens["reader"].encode(), rest], auth)
    assert out == b"OK\r\nERR DENIED role read may not send MSG\r\nPONG\r\n" and backend.log == []
    assert max(held) < 64


def test_a_msg_pipelined_behind_an_auth_acts_as_the_auth_allows_at_every_split() -> None:
    table, tokens = table_with(app="write")
    good = tokens["app"].encode()
    stream = (b"MSG 1\r\na\r\nAUTH wrong\r\nMSG 2\r\nbb\r\nAUTH %s\r\nMSG 3\r\nccc\r\nPING\r\n" % good)
    want = (b"ERR DENIED authentication required\r\nERR DENIED invalid token\r\n"
            b"ERR DENIED authentication required\r\nOK\r\nOK 1\r\nPONG\r\n")
    for cut in range(len(stream) + 1):
        for cut2 in (cut, min(len(stream), cut + 7)):
            out, backend, _ = run_split([stream[:cut], stream[cut:cut2], stream[cut2:]],
                                        ConnectionAuth(AuthGate(table)))
            assert (out, backend.log) == (want, [b"ccc"]), (cut, cut2, out)


def test_eof_while_input_waits_behind_an_auth_comes_after_it() -> None:
    table, tokens = table_with(app="write", reader="read")
    backend = ModelBackend()
    session = ServerSession(backend, CommandParser(), auth=ConnectionAuth(AuthGate(table)))
    session.receive(b"AUTH %s\r\n" % tokens["reader"].encode())
    assert session.data_to_send() == b"OK\r\n"
    # A read token may not send MSG: the AUTH behind a running tail waits, what follows it is held unparsed.
    session.receive(b"READ 1\r\nAUTH %s\r\nMSG 1\r\nz\r\nPING\r\n" % tokens["app"].encode())
    assert session.data_to_send() == b"OK\r\n" and session.stream is not None
    session.receive_eof()  # the tail goes on; the hangup must come after the MSG and PING
    session.stream_over()
    assert session.data_to_send() == b"OK\r\n"  # the AUTH
    backend.commit()
    assert session.data_to_send() == b"OK 1\r\nPONG\r\n" and session.closed and backend.log == [b"z"]


def test_lines_before_auth_are_short() -> None:
    table, tokens = table_with(app="write")
    session = ServerSession(ModelBackend(), CommandParser(), auth=ConnectionAuth(AuthGate(table)))
    session.receive(b"PING\r\n" + b"P" * 1500)  # a line of 1500 bytes before AUTH
    assert session.data_to_send() == b"PONG\r\nERR TOO_LARGE command line over 1024 bytes before AUTH\r\n"
    assert session.closed
    # Once authenticated, lines up to --max-line-bytes are taken as before.
    session = ServerSession(ModelBackend(), CommandParser(), auth=ConnectionAuth(AuthGate(table)))
    session.receive(b"AUTH %s\r\n" % tokens["app"].encode() + b"P" * 1500)
    assert session.data_to_send() == b"OK\r\n" and session.partial_bytes == 1500 and not session.closing
    session.receive(b"\r\n")
    assert session.data_to_send().startswith(b"ERR UNKNOWN_COMMAND")
