"""The sans-IO server session, with no sockets: the order contract, every chunking, the byte counts.

A `ModelBackend` stands in for the server: an in-memory log that commits when
the test says so, and streams that send the records they may. `drive` plays
the asyncio adapter's part. The reference is `expected`: the same commands
acted on one after the other, as protocol.md 3.1 ("Order") describes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from logd import protocol
from logd.errors import DeniedError, ProtocolError, ReadOnlyError, ServerError
from logd.protocol import CommandParser
from logd.protocol.session import AppendReply, ServerSession


@dataclass
class ModelBackend:
    """The server, as far as one session can tell: a list log, a read-only flag, one stream."""

    log: list[bytes] = field(default_factory=list)
    pending: list[tuple[list[bytes], AppendReply]] = field(default_factory=list)
    read_only: bool = False
    stream_next: int = 0
    stream_left: int = 0
    acks: list[int] = field(default_factory=list)
    sent: int = 0
    commits: int = 0
    fast_count: int = 0  # a connection's lane (logd/lane.py) is not part of the session
    output_full: bool = False  # the server-wide output budget is exceeded: STATS and CURSORS wait

    def refusal(self) -> ServerError | None:
        return ReadOnlyError("- this server does not accept writes") if self.read_only else None

    def submit(self, bodies: list[bytes], nbytes: int, reply: AppendReply) -> None:
        self.pending.append((bodies, reply))

    def commit(self, session: ServerSession | None = None) -> bytes:
        """Commit what is pending. With ``session``, every other reply goes through
        `ServerSession.acknowledged`, as the server's append queue does it (the bytes it
        hands over are returned, to send before anything else)."""
        now = []
        for bodies, reply in self.pending:
            self.log += bodies
            self.commits += 1
            if session is not None and self.commits % 2:
                data = session.acknowledged(reply, len(self.log))
                if data is not None:
                    now.append(data)
            else:
                reply.resolve(protocol.ok(len(self.log)))
        self.pending.clear()
        return b"".join(now)

    def head(self) -> int:
        return len(self.log)

    def stats(self) -> dict[str, object]:
        return {"head": len(self.log)}

    def output_room(self, pending: int) -> bool:
        return not self.output_full

    def start_stream(self, cmd: protocol.Read | protocol.Replicate) -> bytes | None:
        self.stream_next = cmd.start
        self.stream_left = cmd.limit if isinstance(cmd, protocol.Read) else 0
        self.sent = cmd.start - 1
        return None

    def ack(self, id: int) -> None:
        if id > self.sent:
            raise ProtocolError(f"ACK {id} is above {self.sent}")
        self.acks.append(id)

    def refuse(self) -> None:
        self.read_only = True

    def accept(self, next_id: int | None, min_replicas: int | None) -> None:
        self.read_only = False

    def shutdown(self) -> ServerError | None:
        return DeniedError("server was not started with --allow-shutdown")

    def records(self) -> tuple[bytes, bool]:
        """What the running stream sends now, and whether its limit is reached (-1 once it is)."""
        out = []
        while self.stream_next <= len(self.log) and self.stream_left != -1:
            body = self.log[self.stream_next - 1]
            out.append(b"+%d %d\r\n%s\r\n" % (self.stream_next, len(body), body))
            self.sent = self.stream_next
            self.stream_next += 1
            if self.stream_left:
                self.stream_left -= 1
                if self.stream_left == 0:
                    self.stream_left = -1
        return b"".join(out), self.stream_left == -1


def new_session(backend: ModelBackend) -> ServerSession:
    return ServerSession(backend, CommandParser(max_line_bytes=4096, max_message_bytes=1024, max_batch=10))


def drive(session: ServerSession, backend: ModelBackend) -> bytes:
    """What the adapter does after each chunk: commit, write replies, run the stream as far as it goes."""
    out = []
    while True:
        out.append(backend.commit(session))
        out.append(session.data_to_send())
        if session.stream is None:
            if backend.pending:  # acting on waiting commands submitted more MSGs
                continue
            break
        data, done = backend.records()
        out.append(data)
        if done or session.closing:  # CLOSE: a stream ends at what is committed
            out.append(protocol.EOF)
            session.stream_over()
            continue
        break
    return b"".join(out)


def expected(wire: bytes) -> bytes:
    """The reference: each command acted on after the previous one has finished (protocol.md 3.1)."""
    items = CommandParser(max_line_bytes=4096, max_message_bytes=1024, max_batch=10).feed(wire)
    log: list[bytes] = []
    read_only = False
    out = []
    for i, item in enumerate(items):
        if isinstance(item, protocol.Msg):
            if read_only:
                out.append(protocol.error_reply(ReadOnlyError("- this server does not accept writes")))
            else:
                log += item.bodies
                out.append(protocol.ok(len(log)))
        elif isinstance(item, protocol.Ping):
            out.append(protocol.PONG)
        elif isinstance(item, protocol.Head):
            out.append(protocol.ok(len(log)))
        elif isinstance(item, protocol.Stats):
            out.append(protocol.stats_reply({"head": len(log)}))
        elif isinstance(item, protocol.Refuse):
            read_only = True
            out.append(protocol.ok())
        elif isinstance(item, protocol.Accept):
            read_only = False
            out.append(protocol.ok())
        elif isinstance(item, protocol.Shutdown):
            out.append(protocol.error_reply(DeniedError("server was not started with --allow-shutdown")))
        elif isinstance(item, protocol.Read):
            out.append(protocol.ok())
            last = len(log) if not item.limit else min(len(log), item.start + item.limit - 1)
            for id in range(item.start, last + 1):
                out.append(b"+%d %d\r\n%s\r\n" % (id, len(log[id - 1]), log[id - 1]))
            finished = item.limit and last == item.start + item.limit - 1
            if not finished:
                if not any(isinstance(later, protocol.Close) for later in items[i + 1 :]):
                    break  # waits for ever: nothing after it acts
            out.append(protocol.EOF)
        elif isinstance(item, protocol.Close):
            out.append(protocol.ok())
            break
        elif isinstance(item, ProtocolError):
            out.append(protocol.error_reply(item))
            if item.fatal:
                break
        else:
            raise AssertionError(f"unexpected {item!r}")
    return b"".join(out)


bodies = st.binary(max_size=12)
commands = st.one_of(
    st.lists(bodies, min_size=1, max_size=3).map(protocol.encode_msg),
    st.sampled_from([b"PING\r\n", b"HEAD\r\n", b"STATS\r\n", b"REFUSE\r\n", b"ACCEPT\r\n", b"BOGUS\r\n",
                     b"SHUTDOWN\r\n", b"READ x\r\n", b"PING\n"]),
    st.tuples(st.integers(1, 6), st.integers(0, 3)).map(lambda t: b"READ %d %d\r\n" % t),
)
scripts = st.lists(commands, max_size=12).flatmap(
    lambda cmds: st.tuples(st.just(cmds), st.one_of(st.just(False), st.booleans()))
).map(lambda t: b"".join(t[0]) + (b"CLOSE\r\nMSG 7\r\nphantom\r\n" if t[1] else b""))


def run(wire: bytes, cuts: list[int]) -> tuple[bytes, ServerSession, ModelBackend]:
    backend = ModelBackend()
    session = new_session(backend)
    out = []
    prev = 0
    for cut in sorted(set(cuts)) + [len(wire)]:
        if cut > prev:
            session.receive(wire[prev:cut])
            out.append(drive(session, backend))
            prev = cut
    return b"".join(out), session, backend


@settings(max_examples=300, deadline=None)
@given(scripts, st.data())
def test_any_chunking_acts_as_the_reference(wire: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=8))
    whole, _s, _b = run(wire, [])
    chunked, session, backend = run(wire, cuts)
    assert whole == expected(wire)
    assert chunked == whole
    # Nothing is left counted once everything before a waiting stream is answered.
    assert session.inflight_bytes == 0
    assert backend.pending == []


def test_every_split_of_a_mixed_script_gives_the_same_bytes() -> None:
    wire = b"MSG 1 2\r\na\r\nbc\r\nHEAD\r\nREAD 1 2\r\nREFUSE\r\nMSG 1\r\nx\r\nACCEPT\r\nSTATS\r\nCLOSE\r\n"
    want = expected(wire)
    for cut in range(len(wire) + 1):
        assert run(wire, [cut])[0] == want
    one_by_one = run(wire, list(range(len(wire))))[0]
    assert one_by_one == want


def test_read_then_close_in_one_packet_ends_the_tail() -> None:
    out, session, _ = run(b"READ 1\r\nCLOSE\r\n", [])
    assert out == b"OK\r\n+EOF\r\nOK\r\n"
    assert session.closed


def test_close_arriving_while_a_read_is_queued_ends_it() -> None:
    backend = ModelBackend()
    session = new_session(backend)
    session.receive(b"MSG 1\r\nx\r\nREAD 1\r\n")
    assert session.stream is None  # queued behind the MSG: nothing acted yet but the MSG
    session.receive(b"CLOSE\r\n")
    assert drive(session, backend) == b"OK 1\r\nOK\r\n+1 1\r\nx\r\n+EOF\r\nOK\r\n"
    assert session.closed


def test_nothing_after_close_acts() -> None:
    out, session, backend = run(b"CLOSE\r\nMSG 7\r\nphantom\r\n", [])
    assert out == b"OK\r\n"
    assert backend.log == [] and session.closed
    session.receive(b"MSG 1\r\nz\r\n")  # later packets are not even parsed
    assert drive(session, backend) == b"" and backend.log == []


def test_refuse_takes_effect_at_its_turn_behind_a_waiting_read() -> None:
    backend = ModelBackend()
    session = new_session(backend)
    session.receive(b"READ 1 1\r\nMSG 1\r\na\r\nREFUSE\r\nMSG 1\r\nb\r\n")
    assert drive(session, backend) == b"OK\r\n"
    assert not backend.read_only  # REFUSE waits its turn behind the READ and the MSG
    backend.log.append(b"w")  # another client's message lets the READ finish
    assert drive(session, backend) == (
        b"+1 1\r\nw\r\n+EOF\r\nOK 2\r\nOK\r\nERR READONLY - this server does not accept writes\r\n"
    )


def test_head_waits_for_the_msgs_before_it() -> None:
    backend = ModelBackend()
    session = new_session(backend)
    session.receive(b"MSG 1\r\na\r\nHEAD\r\nMSG 1\r\nb\r\n")
    assert len(backend.pending) == 1  # the MSG after HEAD waits behind it
    assert session.data_to_send() == b""
    assert drive(session, backend) == b"OK 1\r\nOK 1\r\nOK 2\r\n"


def test_acks_act_at_once_on_a_running_replicate_and_are_checked() -> None:
    backend = ModelBackend(log=[b"a", b"b"])
    session = new_session(backend)
    session.receive(b"REPLICATE 2\r\nACK 1\r\n")
    assert backend.acks == [1]
    session.data_to_send()
    session.receive(b"ACK 5\r\n")  # never sent: a lie
    assert session.data_to_send() == b"ERR BAD_FORMAT ACK 5 is above 1\r\n"
    assert session.closed


def test_an_ack_outside_a_replicate_stream_closes() -> None:
    out, session, backend = run(b"PING\r\nACK 3\r\nPING\r\n", [])
    assert out == b"PONG\r\nERR BAD_FORMAT ACK is only valid on a running REPLICATE stream\r\n"
    assert session.closed and backend.acks == []


def test_eof_answers_what_was_asked_then_closes() -> None:
    backend = ModelBackend()
    session = new_session(backend)
    session.receive(b"MSG 1\r\na\r\nPING\r\n")
    session.receive_eof()
    assert not session.closed
    assert drive(session, backend) == b"OK 1\r\nPONG\r\n"
    assert session.closed


def test_byte_counts_follow_the_commands() -> None:
    backend = ModelBackend()
    session = new_session(backend)
    session.receive(b"MSG 3\r\nabc\r\n")
    assert session.inflight_bytes == 3 and session.waiting_bytes == 0
    session.receive(b"READ 5\r\nMSG 2 2\r\nde\r\nfg\r\n")
    assert session.waiting_bytes == 4  # behind the READ, which waits behind the first MSG
    session.receive(b"MSG 100\r\n0123456789")
    assert session.declared_bytes == 100 and session.partial_bytes == 10
    drive(session, backend)
    assert session.inflight_bytes == 0 and session.waiting_bytes == 4  # the tail runs; they still wait


def test_a_fatal_error_is_answered_in_its_turn_and_closes() -> None:
    backend = ModelBackend()
    session = new_session(backend)
    session.receive(b"MSG 1\r\na\r\nMSG x\r\n")
    assert drive(session, backend).startswith(b"OK 1\r\nERR BAD_FORMAT")
    assert session.closed


def test_one_chunk_of_pipelined_commands_makes_bounded_output_at_a_time() -> None:
    backend = ModelBackend()
    session = ServerSession(backend, CommandParser(), output_limit=100)
    session.receive(b"PING\r\n" * 1000)
    assert session.backlog  # most of them wait until the first replies are taken
    first = session.data_to_send(act=False)
    assert 100 < len(first) <= 106 and first == b"PONG\r\n" * (len(first) // 6)
    assert session.data_to_send(act=False) == b""  # a peer that does not read gets nothing more made
    total = len(first)
    while data := session.data_to_send():
        assert len(data) <= 106
        total += len(data)
    assert total == 6000 and not session.backlog


def test_acknowledged_hands_over_the_only_reply_outstanding() -> None:
    backend = ModelBackend()
    session = new_session(backend)
    session.receive(b"MSG 1\r\na\r\n")
    (_bodies, reply), = backend.pending
    assert session.acknowledged(reply, 7) == b"OK 7\r\n"
    assert session.inflight_bytes == 0 and session.idle and session.data_to_send() == b""


def test_acknowledged_keeps_the_order_of_replies() -> None:
    """A reply behind another unanswered one, or with a PONG after it, waits for data_to_send."""
    backend = ModelBackend()
    session = new_session(backend)
    session.receive(b"MSG 1\r\na\r\nMSG 1\r\nb\r\nPING\r\n")
    (_b1, first), (_b2, second) = backend.pending
    assert session.acknowledged(second, 2) is None
    assert session.data_to_send() == b""
    assert session.acknowledged(first, 1) is None
    assert session.data_to_send() == b"OK 1\r\nOK 2\r\nPONG\r\n"
    assert session.inflight_bytes == 0
