"""Cursor commands in the sans-IO session: they act after earlier replies, and a late COMMIT reply keeps order."""

from __future__ import annotations

from dataclasses import dataclass, field

from logd import protocol
from logd.errors import StaleCursorError
from logd.protocol.session import AppendReply

from .test_session import ModelBackend, new_session


@dataclass
class CursorBackend(ModelBackend):
    """The model server plus cursors whose COMMIT is answered only when the test says the sync is done."""

    cursors: dict[str, int] = field(default_factory=dict)
    seen_head: list[int] = field(default_factory=list)  # the head each COMMIT saw when it acted
    syncing: list[AppendReply] = field(default_factory=list)

    def cursor_command(self, cmd: object, reply: AppendReply) -> bytes | None:
        if isinstance(cmd, protocol.Cursor):
            return protocol.ok(self.cursors.get(cmd.name, 0))
        if isinstance(cmd, protocol.Cursors):
            return protocol.stats_reply(dict(self.cursors))
        assert isinstance(cmd, protocol.Commit)
        self.seen_head.append(len(self.log))
        if cmd.id < self.cursors.get(cmd.name, 0):
            raise StaleCursorError("a cursor only moves forward")
        self.cursors[cmd.name] = cmd.id
        self.syncing.append(reply)
        return None

    def synced(self) -> None:
        for reply in self.syncing:
            reply.resolve(protocol.ok())
        self.syncing.clear()


def test_commit_acts_after_the_msg_before_it_and_its_reply_keeps_its_place() -> None:
    backend = CursorBackend()
    session = new_session(backend)
    session.receive(b"MSG 1\r\na\r\nCOMMIT c 1\r\nPING\r\nCURSOR c\r\n")
    assert session.data_to_send() == b""
    assert backend.seen_head == []  # not before the MSG's reply is known
    backend.commit()
    assert session.data_to_send() == b"OK 1\r\n"
    assert backend.seen_head == [1]
    backend.synced()
    assert session.data_to_send() == b"OK\r\nPONG\r\nOK 1\r\n"


def test_refused_commit_is_an_err_in_its_place() -> None:
    backend = CursorBackend(cursors={"c": 5})
    session = new_session(backend)
    session.receive(b"COMMIT c 2\r\nCURSORS\r\nCOMMIT b@d 1\r\n")
    assert session.data_to_send() == (b"ERR STALE a cursor only moves forward\r\nOK 1\r\nc 5\r\n"
                                      b"ERR BAD_FORMAT bad cursor name 'b@d': 1 to 64 of A-Z a-z 0-9 . _ -\r\n")


def test_stats_and_cursors_wait_while_the_output_budget_is_exceeded() -> None:
    """Issue 22, finding 10: their replies grow with the server's state, so they wait as a stream does."""
    backend = CursorBackend(cursors={"c": 5}, output_full=True)
    session = new_session(backend)
    session.receive(b"PING\r\nSTATS\r\nPING\r\nCURSORS\r\nHEAD\r\n")
    assert session.data_to_send() == b"PONG\r\n" and session.backlog  # in order: nothing passes STATS
    assert session.data_to_send() == b""
    backend.output_full = False
    assert session.data_to_send() == b"OK 1\r\nhead 0\r\nPONG\r\nOK 1\r\nc 5\r\nOK 0\r\n"
