"""The server's side of one connection, sans-IO: bytes in, commands acted on in order, reply bytes out.

The asyncio adapter (``logd/connection.py``) feeds what it receives to
`ServerSession.receive` and writes what `ServerSession.data_to_send` returns;
the session never touches a socket or an event loop. What a command does to
the server (append, read the head, start a stream, ...) goes through the
`Backend` it is given, so the tests drive a session with an in-memory backend.

**The order contract** (protocol.md 3.1): every command is acted on in the
order received. A command *acts* when every earlier one has acted:

- MSG acts when it is handed to the append queue; later commands may act
  before its reply is known, except those that observe what it did;
- HEAD, STATS, READ, REPLICATE, CLOSE and a fatal error act only once every
  earlier reply is known (so HEAD after MSG sees that MSG);
- READ and REPLICATE act until their stream ends; nothing after them acts
  meanwhile, except the replica's ACKs on its own REPLICATE stream;
- CLOSE, once received, makes every stream before it end as soon as it has
  sent what is committed (``+EOF``) instead of waiting for more; then it is
  answered ``OK`` and the connection closes. Nothing after it acts: the
  parser is not fed again.

Replies leave in command order: `AppendReply` is the one reply kind that is
not known when its command acts; every other reply is bytes at once.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from logd.errors import (
    DeniedError,
    DivergedError,
    FencedError,
    HandshakeAnswer,
    ProtocolError,
    ServerError,
    TooLargeError,
    UnknownCommandError,
)

from .commands import (
    Accept,
    Ack,
    Auth,
    Close,
    Command,
    Commit,
    Cursor,
    Cursors,
    Drop,
    Head,
    Msg,
    Ping,
    Read,
    Refuse,
    RefusedMsg,
    Replicate,
    Shutdown,
    Stats,
    _new,
)
from .parser import CommandParser
from .replies import PONG, error_reply, ok, ok_id, stats_reply

OK_EMPTY = ok()


class AppendReply:
    """The reply to a MSG handed to the append queue, unknown until its batch is committed.

    The queue (and, with ``--min-replicas``, the replica bookkeeping) calls
    `resolve` once; the session sends it when every earlier reply has gone.
    """

    __slots__ = ("nbytes", "reply")

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.reply: bytes | None = None

    def resolve(self, reply: bytes) -> None:
        """Set the reply bytes (``OK <id>`` or an ``ERR`` line)."""
        self.reply = reply

    def acknowledge(self, last_id: int) -> None:
        """Resolve as ``OK <last_id>``: the MSG's messages are committed, the last with this id."""
        self.reply = ok_id(last_id)


class Hangup:
    """The peer finished sending (EOF): close once everything before it is answered."""

    __slots__ = ()


HANGUP = Hangup()
Item = Command | RefusedMsg | ProtocolError | Hangup
_MSG = _new(Msg)  # stands for a refused MSG when the gate is asked why (it looks at the type only)
# The parser's errors are items too; they are answered whatever the role.
PARSE_ERRORS: frozenset[type] = frozenset({ProtocolError, UnknownCommandError, TooLargeError})


class Gate(Protocol):
    """Who may send what on this connection (``logd/access.py`` has the real one)."""

    allowed: frozenset[type]  # item types that act with no call to `check`
    closing: bool  # set by `check`: reply, then close (too many failed AUTHs)

    @property
    def authenticated(self) -> bool:
        """A successful AUTH is in force, or none is needed: lines of any length are taken
        (else short ones only: `CommandParser.restrict`)."""

    def check(self, item: object) -> bytes | None:
        """The reply to AUTH, or the refusal of a command; None: it acts as usual."""


class OpenGate:
    """No authentication: everything acts; AUTH is answered OK."""

    allowed: frozenset[type] = frozenset(
        {Msg, Read, Replicate, Head, Ping, Stats, Close, Shutdown, Ack, Refuse, Accept, Commit, Cursor, Cursors, Drop,
         Hangup}
        | PARSE_ERRORS
    )
    closing = False
    authenticated = True

    def check(self, item: object) -> bytes | None:
        return OK_EMPTY if type(item) is Auth else None


class Backend(Protocol):
    """What the commands of one session do to the server."""

    # MSGs the connection's lane (logd/lane.py) handed to the append queue itself, whose
    # OK is not yet sent: they come before every reply here, so none is sent until it is 0.
    fast_count: int

    def refusal(self) -> ServerError | None:
        """Why a MSG must be refused right now (read-only, too few replicas), or None."""

    def submit(self, bodies: list[bytes], nbytes: int, reply: AppendReply) -> None:
        """Hand a MSG's bodies to the append queue; ``reply`` is resolved when they are committed."""

    def head(self) -> int:
        """The id HEAD reports."""

    def stats(self) -> dict[str, object]:
        """The STATS figures."""

    def output_room(self, pending: int) -> bool:
        """Whether a reply whose size grows with the server's state (STATS, CURSORS) may be made now,
        with ``pending`` bytes of this session's replies not yet written: always when this
        connection has nothing unsent, else not while they and the server's unsent output fill
        the server-wide output budget (protocol.md 3.6)."""

    def start_stream(self, cmd: Read | Replicate) -> bytes | None:
        """Start a READ/REPLICATE stream after its ``OK`` line (returned when it is not a bare ``OK``);
        or raise the `ServerError` to answer, or `HandshakeAnswer` (its reply, then close)."""

    def ack(self, id: int) -> None:
        """A replica's ACK on this connection's REPLICATE stream; raise `ProtocolError` if it is not honest."""

    def refuse(self) -> None:
        """REFUSE: stop accepting MSG, or raise the `ServerError` to answer."""

    def accept(self, next_id: int | None, min_replicas: int | None) -> None:
        """ACCEPT [next_id] [min_replicas=n]: accept MSG (a follower stops following), or raise the
        `ServerError` to answer."""

    def shutdown(self) -> ServerError | None:
        """SHUTDOWN: ask the server to stop, or say why not."""

    def cursor_command(self, cmd: Commit | Cursor | Cursors | Drop, reply: AppendReply) -> bytes | None:
        """COMMIT/CURSOR/CURSORS/DROP: the reply now, or None when ``reply`` is resolved later (after a sync).

        Raises the `ServerError` to answer (a refused COMMIT or DROP).
        """


class ServerSession:
    """One connection's commands, in order, and their replies, in order."""

    __slots__ = (
        "_backend",
        "_parser",
        "auth",
        "_waiting",
        "_replies",
        "_out",
        "waiting_bytes",
        "inflight_bytes",
        "stream",
        "closing",
        "closed",
        "partial_bytes",
        "_out_bytes",
        "_out_limit",
        "_eof_at_auth",
    )

    def __init__(
        self, backend: Backend, parser: CommandParser, output_limit: int = 1 << 20, auth: Gate | None = None
    ) -> None:
        self._backend = backend
        self._parser = parser
        self.auth: Gate = auth if auth is not None else OpenGate()
        self._waiting: deque[Item] = deque()  # received, not yet acted on
        self._replies: deque[bytes | AppendReply] = deque()  # acted on; the first is not yet known
        self._out: list[bytes] = []  # known replies, in order, not yet taken by data_to_send
        self.waiting_bytes = 0  # MSG body bytes among _waiting
        self.inflight_bytes = 0  # MSG body bytes submitted, reply not yet sent
        self.stream: Read | Replicate | None = None  # the READ/REPLICATE acting now
        self.closing = False  # CLOSE (or a fatal error) received: read nothing more
        self.closed = False  # the last reply is in the output: close once it is written
        self.partial_bytes = 0  # input the parser holds until more arrives (a partial line or MSG)
        # Replies made and not yet taken: past the limit, later commands wait (act on the next
        # data_to_send), so one chunk of pipelined commands cannot make unbounded output at once.
        self._out_bytes = 0
        self._out_limit = output_limit
        self._eof_at_auth = False  # EOF came while the parser held input after an AUTH

    # --- input ------------------------------------------------------------------

    @property
    def declared_bytes(self) -> int:
        """The body bytes a MSG in progress has declared, received or not (0 when none)."""
        return self._parser.declared

    def receive(self, data: bytes) -> bool:
        """Act on the commands ``data`` completes, as far as the order allows.

        Returns False in the common case where the caller has nothing to do
        (MSGs now wait for their commit, no other reply is ready, no input is
        held back); True when it should call `data_to_send` and look at the
        byte counts.
        """
        if self.closing:
            return True
        parser = self._parser
        if not self._waiting and self.stream is None and Msg in self.auth.allowed:
            batches = parser.whole_msgs(data)
            if batches is not None:  # the hot path: nothing but complete MSGs, nothing held
                self.partial_bytes = 0
                self._submit(batches)
                return bool(self._out)
        parser.restrict(Msg in self.auth.allowed, not self.auth.authenticated)
        items: list[Item] = parser.feed(data)  # type: ignore[assignment]
        self.partial_bytes = partial = parser.buffered
        if self._waiting or self.stream is not None:
            self._hold(items, 0)
            return True
        backend = self._backend
        auth = self.auth
        for i, item in enumerate(items):
            if type(item) is Msg and Msg in auth.allowed:
                # The hot path (one MSG per chunk from each of many clients): inline.
                bodies = item.bodies
                refusal = backend.refusal()
                if refusal is not None:
                    self._reply(error_reply(refusal))
                else:
                    nbytes = sum(map(len, bodies)) if len(bodies) > 1 else len(bodies[0])
                    reply = AppendReply(nbytes)
                    self.inflight_bytes += nbytes
                    self._replies.append(reply)
                    backend.submit(bodies, nbytes, reply)
            elif not self._act(item):
                self._hold(items, i)
                return True
            elif self.closing:
                return True  # CLOSE or a fatal error acted: nothing after it does
            elif self.stream is not None or self._out_bytes > self._out_limit:
                self._hold(items, i + 1)
                return True
        return bool(self._out) or partial > 0

    def _submit(self, batches: list[list[bytes]]) -> None:
        """Hand MSGs whose turn it is to the append queue (or answer the refusal of each)."""
        backend = self._backend
        refusal = backend.refusal()  # nothing a submit does changes it
        if refusal is not None:
            for _ in batches:
                self._reply(error_reply(refusal))
            return
        replies = self._replies
        for bodies in batches:
            nbytes = len(bodies[0]) if len(bodies) == 1 else sum(map(len, bodies))
            reply = AppendReply(nbytes)
            self.inflight_bytes += nbytes
            replies.append(reply)
            backend.submit(bodies, nbytes, reply)

    def receive_eof(self) -> None:
        """The peer will send nothing more: answer what it asked, then close (a tail goes on)."""
        if not self.closing:
            self.closing = True
            if self._parser.at_auth:
                self._eof_at_auth = True  # the hangup comes after what the parser still holds
            else:
                self._waiting.append(HANGUP)
            self._run_waiting()

    def _hold(self, items: list[Item], i: int) -> None:
        """Queue ``items[i:]`` behind what is acting; ACKs of a running REPLICATE act at once."""
        waiting = self._waiting
        for item in items[i:] if i else items:
            kind = type(item)
            if kind is Ack and type(self.stream) is Replicate:
                self._act(item)
                continue
            if isinstance(item, Msg):
                self.waiting_bytes += sum(map(len, item.bodies))
            waiting.append(item)
            if kind is Close or (isinstance(item, ProtocolError) and item.fatal):
                self.closing = True  # nothing after it will act
                break

    # --- acting -------------------------------------------------------------------

    def _act(self, item: Item) -> bool:
        """Act on one command whose turn it is; False if it must wait for earlier replies."""
        kind = type(item)
        backend = self._backend
        auth = self.auth
        if kind is RefusedMsg:  # refused at its line, its bodies skipped (CommandParser.restrict)
            self._reply(auth.check(_MSG) or error_reply(DeniedError("MSG was refused when it arrived")))
            return True
        if kind not in auth.allowed:  # AUTH, a command this role may not send, an audited one
            if kind is Auth:
                # AUTH waits for earlier replies: acting twice would count a failure twice.
                if not self._settled():
                    return False
                self._emit(auth.check(item) or OK_EMPTY)
                if auth.closing:  # too many failures: nothing after it acts
                    self.closing = self.closed = True
                elif self._parser.at_auth:
                    self._after_auth()
                return True
            denial = auth.check(item)
            if denial is not None:
                self._reply(denial)
                return True
        if kind is Msg:
            refusal = backend.refusal()
            if refusal is not None:
                self._reply(error_reply(refusal))
                return True
            bodies = item.bodies  # type: ignore[union-attr]
            nbytes = sum(map(len, bodies))
            reply = AppendReply(nbytes)
            self.inflight_bytes += nbytes
            self._replies.append(reply)
            backend.submit(bodies, nbytes, reply)
            return True
        if kind is Ping:
            self._reply(PONG)
            return True
        if kind is Ack and type(self.stream) is Replicate:
            try:
                backend.ack(item.id)  # type: ignore[union-attr]
            except ProtocolError as exc:
                exc.fatal = True
                self.stream = None  # the stream is over: the error closes the connection
                self._emit(error_reply(exc))
                self.closing = self.closed = True
            return True
        if kind is Refuse or kind is Accept:
            try:
                if kind is Refuse:
                    backend.refuse()
                else:
                    backend.accept(item.next_id, item.min_replicas)  # type: ignore[union-attr]
            except ServerError as exc:
                self._reply(error_reply(exc))
            else:
                self._reply(OK_EMPTY)
            return True
        if kind is Shutdown:
            refusal = backend.shutdown()
            self._reply(OK_EMPTY if refusal is None else error_reply(refusal))
            return True
        # Everything below observes the effect of earlier commands: their replies come first.
        if not self._settled():
            return False
        if (kind is Stats or kind is Cursors) and not backend.output_room(self._out_bytes):
            return False  # waits, unread, as a stream does, until the output budget has room
        if kind is Head:
            self._emit(ok(backend.head()))
        elif kind is Stats:
            self._emit(stats_reply(backend.stats()))
        elif kind is Commit or kind is Cursor or kind is Cursors or kind is Drop:
            self._cursor(item)  # type: ignore[arg-type]
        elif kind is Read or kind is Replicate:
            self._start(item)  # type: ignore[arg-type]
        elif kind is Close:
            self._emit(OK_EMPTY)
            self.closing = self.closed = True
        elif kind is Hangup:
            self.closed = True
        elif kind is Ack:  # not on a REPLICATE stream: a peer that cannot be trusted to frame either
            self._emit(error_reply(ProtocolError("ACK is only valid on a running REPLICATE stream")))
            self.closing = self.closed = True
        else:  # a ProtocolError from the parser
            err: ProtocolError = item  # type: ignore[assignment]
            self._emit(error_reply(err))
            if err.fatal:
                self.closing = self.closed = True
        return True

    def _start(self, cmd: Read | Replicate) -> None:
        try:
            answer = self._backend.start_stream(cmd)
        except HandshakeAnswer as exc:  # protocol.md 3.4: the replica must cut its log first
            self._emit(exc.reply)
            self.closing = self.closed = True
            return
        except ServerError as exc:
            self._emit(error_reply(exc))
            if isinstance(exc, DivergedError | FencedError):  # protocol.md 3.3: DIVERGED and FENCED close
                self.closing = self.closed = True
            return
        # The backend writes the stream after this OK (and after every reply before it).
        self._emit(answer or OK_EMPTY)
        self.stream = cmd

    def _after_auth(self) -> None:
        """An AUTH the parser stopped at has acted: parse what followed it, as its outcome allows;
        it acts after the AUTH (AUTH is the last command received, so those go last in line)."""
        parser = self._parser
        parser.restrict(Msg in self.auth.allowed, not self.auth.authenticated)
        items: list[Item] = parser.resume()  # type: ignore[assignment]
        self.partial_bytes = parser.buffered
        if self._eof_at_auth and not parser.at_auth:
            self._eof_at_auth = False
            items.append(HANGUP)
        if items:
            self._hold(items, 0)

    def _cursor(self, cmd: Commit | Cursor | Cursors | Drop) -> None:
        """A cursor command, after every earlier reply (so COMMIT sees the MSG before it committed)."""
        reply = AppendReply(0)
        try:
            now = self._backend.cursor_command(cmd, reply)
        except ServerError as exc:
            self._emit(error_reply(exc))
            return
        if now is None:
            self._replies.append(reply)  # answered once the sync covers it; later replies wait
        else:
            self._emit(now)

    def _reply(self, data: bytes) -> None:
        if self._replies or self._backend.fast_count:
            self._replies.append(data)
        else:
            self._emit(data)

    def _emit(self, data: bytes) -> None:
        self._out.append(data)
        self._out_bytes += len(data)

    def _settled(self) -> bool:
        """Move the replies now known to the output; True if none is still unknown."""
        if self._backend.fast_count:
            return False  # the lane's OKs come first
        replies = self._replies
        out = self._out
        while replies:
            first = replies[0]
            if type(first) is bytes:
                out.append(first)
            else:
                reply = first.reply  # type: ignore[union-attr]
                if reply is None:
                    return False
                out.append(reply)
                self.inflight_bytes -= first.nbytes  # type: ignore[union-attr]
            replies.popleft()
        return True

    def _run_waiting(self) -> None:
        """Act on waiting commands in order until one must wait (or a stream starts)."""
        waiting = self._waiting
        while waiting and self.stream is None and not self.closed and self._out_bytes <= self._out_limit:
            item = waiting[0]
            if not self._act(item):
                return
            waiting.popleft()
            if isinstance(item, Msg):
                self.waiting_bytes -= sum(map(len, item.bodies))

    # --- output -------------------------------------------------------------------

    def data_to_send(self, act: bool = True) -> bytes:
        """Every reply now known, in order, as one bytes object (b"" when none).

        With ``act``, commands that waited for earlier replies (or for output
        to be taken) act first, up to the output limit; the caller passes
        False while its peer is not reading what it was sent.
        """
        if self._replies:
            self._settled()
        if act and self._waiting and self.stream is None:
            self._run_waiting()
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_bytes = 0
        return data

    def acknowledged(self, reply: AppendReply, last_id: int) -> bytes | None:
        """Resolve ``reply`` as ``OK <last_id>``. When it is the one reply outstanding and nothing
        waits, it is taken at once: returns its bytes, for the caller to send now. Otherwise
        None, and `data_to_send` sends it in its turn.

        The append queue's hot path: one MSG in flight on each of many connections.
        """
        reply.reply = data = ok_id(last_id)
        replies = self._replies
        if (
            len(replies) == 1
            and replies[0] is reply
            and not self._out
            and not self._waiting
            and not self._backend.fast_count
        ):
            replies.clear()
            self.inflight_bytes -= reply.nbytes
            return data
        return None

    @property
    def backlog(self) -> bool:
        """Commands wait their turn with no stream running: read no more until they have acted."""
        return bool(self._waiting) and self.stream is None

    @property
    def idle(self) -> bool:
        """Nothing acting, waiting or unanswered (the idle timeout may close it)."""
        return not (self._replies or self._waiting or self._out or self.stream is not None or self._backend.fast_count)

    @property
    def quiet(self) -> bool:
        """Nothing held at all (no reply, command, stream or partial input; not closing): the
        connection's lane may take whole MSGs past the session (logd/lane.py)."""
        return not (self._replies or self._waiting or self._out or self.stream is not None or self.closing) and (
            self._parser.clean
        )

    def stream_over(self) -> None:
        """The stream ended (limit reached, CLOSE, an error); what waited behind it acts now."""
        self.stream = None
        self._run_waiting()

    def end_for_stop(self) -> None:
        """Graceful stop: drop what has not acted (never acknowledged), close after what has."""
        self.waiting_bytes = 0
        self._waiting.clear()
        self.closing = True
        self._waiting.append(HANGUP)
        if self.stream is None:
            self._run_waiting()
