"""Cursor owners (protocol.md 3.7), with no server: the grant in the auth file, `TokenEntry.owns`,
and the per-connection check of COMMIT and DROP, judged when the command acts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from logd import protocol
from logd.access import AuthGate, ConnectionAuth
from logd.auth import AuthFileError, AuthTable, TokenEntry, add_token, load_table, parse_table, token_hash
from logd.protocol import CommandParser
from logd.protocol.session import AppendReply, ServerSession

from .test_session_cursors import CursorBackend

GOOD = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


def test_the_grant_field_is_read_and_written_back() -> None:
    table = parse_table(f"etl read {GOOD} cursors=billing,sink.*\ndash read {OTHER} cursors=\n"
                        f"app write {'sha256:' + 'ef' * 32}\n")
    assert table.entries["etl"].grant == ("billing", "sink.*")
    assert table.entries["dash"].grant == ()
    assert table.entries["app"].grant is None
    assert parse_table(table.render()).entries == table.entries
    assert f"etl read {GOOD} cursors=billing,sink.*\n" in table.render()
    assert f"dash read {OTHER} cursors=\n" in table.render()


@pytest.mark.parametrize(("line", "complaint"), [
    (f"etl read {GOOD} billing", "line 1: the fourth field must be cursors="),
    (f"etl read {GOOD} cursors=a b", "line 1: expected"),
    (f"etl read {GOOD} cursors=a*b", "line 1: bad cursor pattern 'a\\*b'"),
    (f"etl read {GOOD} cursors=a,,b", "line 1: bad cursor pattern ''"),
    (f"etl read {GOOD} cursors=b@d", "bad cursor pattern 'b@d'"),
    (f"etl read {GOOD} cursors={'x' * 65}", "bad cursor pattern"),
    (f"boss admin {GOOD} cursors=a", "an admin token may move and drop every cursor"),
])
def test_bad_grants_name_the_line(line: str, complaint: str) -> None:
    with pytest.raises(AuthFileError, match=complaint):
        parse_table(line + "\n")


@pytest.mark.parametrize(("entry", "owned", "not_owned"), [
    (TokenEntry("app", "read", GOOD), ["app", "app.", "app.x", "app.x.y"], ["ap", "apps", "app-x", "x.app"]),
    (TokenEntry("b@d", "write", GOOD), [], ["b", "b.x"]),  # @ is in no cursor name: give it a grant
    (TokenEntry("etl", "read", GOOD, ("billing", "sink.*")), ["billing", "sink.", "sink.pg"],
     ["etl", "etl.x", "billing.x", "billing2", "sink"]),
    (TokenEntry("all", "replicate", GOOD, ("*",)), ["a", "x" * 64], []),
    (TokenEntry("none", "read", GOOD, ()), [], ["none", "a"]),
    (TokenEntry("ops", "admin", GOOD), ["anything", "ops"], []),
])
def test_owns(entry: TokenEntry, owned: list[str], not_owned: list[str]) -> None:
    assert all(entry.owns(name) for name in owned)
    assert not any(entry.owns(name) for name in not_owned)


def test_add_token_with_a_grant(tmp_path: Path) -> None:
    path = str(tmp_path / "a.auth")
    token = add_token(path, "etl", "read", "billing,sink.*")
    entry = load_table(path).lookup(token)
    assert entry is not None and entry.grant == ("billing", "sink.*")
    with pytest.raises(AuthFileError, match="bad cursor pattern"):
        add_token(path, "x", "read", "no/slash")
    with pytest.raises(AuthFileError, match="admin token"):
        add_token(path, "y", "admin", "a")
    assert list(load_table(path).entries) == ["etl"]  # neither was written


def gate(*entries: TokenEntry) -> tuple[AuthGate, dict[str, str]]:
    """A gate over ``entries`` whose tokens are their names reversed (the digests are made to match)."""
    tokens = {e.name: e.name[::-1] + "-secret" for e in entries}
    table = AuthTable([TokenEntry(e.name, e.role, token_hash(tokens[e.name]), e.grant) for e in entries])
    return AuthGate(table), tokens


def test_connection_checks_the_cursor_of_each_commit_and_drop() -> None:
    g, tokens = gate(TokenEntry("etl", "read", GOOD), TokenEntry("ops", "admin", GOOD))
    auth = ConnectionAuth(g)
    assert auth.check(protocol.Commit("etl", 1)) == b"ERR DENIED authentication required\r\n"
    auth.check(protocol.Auth(tokens["etl"].encode()))
    # Not in `allowed`: the session asks `check` for each, with its cursor's name.
    assert protocol.Commit not in auth.allowed and protocol.Drop not in auth.allowed
    assert protocol.Cursor in auth.allowed and protocol.Cursors in auth.allowed
    assert auth.check(protocol.Commit("etl.a", 1)) is None and auth.check(protocol.Drop("etl")) is None
    assert auth.check(protocol.Commit("billing", 1)) == (
        b"ERR DENIED token etl may not move cursor billing (its cursors: etl, etl.*)\r\n")
    assert auth.check(protocol.Drop("billing")) == (
        b"ERR DENIED token etl may not drop cursor billing (its cursors: etl, etl.*)\r\n")
    admin = ConnectionAuth(g)
    admin.check(protocol.Auth(tokens["ops"].encode()))
    assert protocol.Commit in admin.allowed and protocol.Drop in admin.allowed
    off = ConnectionAuth(AuthGate(None))  # no authentication: no owners
    assert protocol.Commit in off.allowed and protocol.Drop in off.allowed
    assert off.check(protocol.Commit("billing", 1)) is None


def test_a_rebind_takes_the_new_grant() -> None:
    g, tokens = gate(TokenEntry("etl", "read", GOOD))
    auth = ConnectionAuth(g)
    auth.check(protocol.Auth(tokens["etl"].encode()))
    assert auth.check(protocol.Commit("billing", 1)) is not None
    digest = token_hash(tokens["etl"])
    assert auth.rebind(AuthTable([TokenEntry("etl", "read", digest, ("billing",))]))
    assert auth.check(protocol.Commit("billing", 1)) is None
    assert auth.check(protocol.Commit("etl", 1)) == (
        b"ERR DENIED token etl may not move cursor etl (its cursors: billing)\r\n")
    assert auth.rebind(AuthTable([TokenEntry("etl", "admin", digest)]))
    assert auth.check(protocol.Drop("anyone")) is None and protocol.Drop in auth.allowed


@dataclass
class DropBackend(CursorBackend):
    """The session's model server, with DROP."""

    def cursor_command(self, cmd: object, reply: AppendReply) -> bytes | None:
        if isinstance(cmd, protocol.Drop):
            self.cursors.pop(cmd.name)
            return protocol.ok()
        return super().cursor_command(cmd, reply)


def test_a_denied_commit_or_drop_never_reaches_the_server_and_keeps_its_place() -> None:
    g, tokens = gate(TokenEntry("etl", "read", GOOD))
    auth = ConnectionAuth(g)
    backend = DropBackend(cursors={"billing": 4, "etl": 0})
    session = ServerSession(backend, CommandParser(), auth=auth)
    session.receive(b"AUTH %s\r\nCOMMIT billing 9\r\nCOMMIT etl 0\r\nDROP billing\r\nDROP etl\r\nCURSORS\r\n"
                    % tokens["etl"].encode())
    first = session.data_to_send()  # the commands after AUTH act once it has (the parser waits for it)
    backend.synced()
    denied = b"ERR DENIED token etl may not %s cursor billing (its cursors: etl, etl.*)\r\n"
    assert first + session.data_to_send() == (b"OK\r\n" + denied % b"move" + b"OK\r\n" + denied % b"drop"
                                              + b"OK\r\nOK 1\r\nbilling 4\r\n")
    assert backend.seen_head == [0]  # one COMMIT acted: etl's


def test_a_commit_waiting_its_turn_is_judged_by_the_grant_in_force_when_it_acts() -> None:
    # A COMMIT received before a SIGHUP and acting after it (it waited for the MSG before it).
    g, tokens = gate(TokenEntry("etl", "write", GOOD))
    auth = ConnectionAuth(g)
    backend = CursorBackend()
    session = ServerSession(backend, CommandParser(), auth=auth)
    session.receive(b"AUTH %s\r\n" % tokens["etl"].encode())
    assert session.data_to_send() == b"OK\r\n"
    session.receive(b"MSG 1\r\na\r\nCOMMIT etl 1\r\n")
    assert session.data_to_send() == b""
    assert auth.rebind(AuthTable([TokenEntry("etl", "write", token_hash(tokens["etl"]), ("other",))]))
    backend.commit()
    assert session.data_to_send() == (
        b"OK 1\r\nERR DENIED token etl may not move cursor etl (its cursors: other)\r\n")
    assert backend.cursors == {}
