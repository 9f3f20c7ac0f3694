"""The blocking client: `Client`, its `Tail`, and `connect`."""

from __future__ import annotations

import socket
import ssl
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from .. import defaults, errors
from ..protocol import (
    ClientProtocol,
    Command,
    EndOfStream,
    ErrorReply,
    Head,
    Msg,
    OkReply,
    Read,
    ReadRows,
    Record,
    RecordRow,
    Reply,
)
from .commands import (
    CLOSING_CODES,
    CURSORS,
    DEFAULT_PORT,
    DEFAULT_URL,
    FIRST,
    HEAD,
    PING,
    RECV_BYTES,
    REFUSE,
    SHUTDOWN,
    STATS,
    Body,
    Call,
    Retry,
    accept_call,
    as_bytes,
    auth_call,
    checked,
    clamp,
    commit_call,
    corrupt_id_in,
    cursor_call,
    cursors_page_call,
    deadline_after,
    drop_call,
    id_of,
    last_id_of,
    msg_call,
    next_page,
    read_call,
    readable_now,
    remaining,
    retriable,
    stream_step,
    tune,
    where,
    why,
    with_retry,
)
from .endpoint import Endpoint, endpoint

__all__ = ["Client", "Tail", "connect"]

T = TypeVar("T")


_RECORD_TYPES = (Record, tuple)  # a record, or a RecordRow


def _reason(exc: Exception) -> str:
    """Why a TLS handshake failed; "timed out" for a timeout, not ssl's "_ssl.c:989: The handshake ..."."""
    if isinstance(exc, TimeoutError | errors.TimeoutError):
        return "timed out"
    return why(exc) if isinstance(exc, OSError) else str(exc)


class Connection:
    """A blocking socket (TLS for ``logds://``) and its ClientProtocol; any failure closes it for good.

    With a token, the connection authenticates (AUTH) before it is handed out.
    """

    def __init__(self, endpoint: Endpoint, timeout: float | None) -> None:
        address = endpoint.address
        # One deadline for connecting, the TLS handshake and AUTH together, as
        # AsyncConnection.open: a fresh timeout per step made it N x ``timeout``.
        deadline = deadline_after(timeout)
        try:
            sock = socket.create_connection(address, timeout=timeout)
        except TimeoutError:
            raise errors.ConnectionError(f"cannot connect to {where(address)}: timed out") from None
        except OSError as exc:
            raise errors.ConnectionError(f"cannot connect to {where(address)}: {why(exc)}") from None
        if endpoint.tls is not None:
            try:
                # One timeout suffices: CPython's do_handshake takes the socket
                # timeout as a total for the whole handshake (a deadline it
                # recomputes between reads), so a peer that trickles the bytes
                # cannot stretch it (test_client_deadline.py).
                sock.settimeout(remaining(deadline))
                sock = endpoint.tls.wrap_socket(sock, server_hostname=endpoint.host)
            except (OSError, ValueError, errors.TimeoutError) as exc:  # ssl.SSLError is an OSError
                sock.close()
                raise errors.ConnectionError(f"TLS handshake with {where(address)} failed: {_reason(exc)}") from None
        self.sock = sock
        tune(self.sock)
        self.address = address
        self.proto = ClientProtocol()
        self.replies: deque[Reply] = deque()
        if endpoint.token is not None:
            try:
                call = auth_call(endpoint.token)
                self.send(call.command, deadline)
                call.result([self.reply(deadline)])
            except BaseException:
                self.close()
                raise

    def stale(self) -> bool:
        """Whether the server closed, or spoke unprompted (BUSY, TIMEOUT), while we were idle."""
        pending = self.sock.pending() if isinstance(self.sock, ssl.SSLSocket) else 0
        return bool(self.replies) or bool(pending) or readable_now(self.sock.fileno())

    def _io(self, fn: Callable[[Any], T], arg: Any, deadline: float | None) -> T:
        try:
            self.sock.settimeout(remaining(deadline))
            return fn(arg)
        except TimeoutError:
            raise errors.TimeoutError(f"no reply from {where(self.address)} in time") from None
        except OSError as exc:
            raise errors.ConnectionError(f"connection to {where(self.address)} lost: {why(exc)}") from None

    def send(self, command: Command, deadline: float | None) -> None:
        self._io(self.sock.sendall, self.proto.send(command), deadline)

    def receive(self, deadline: float | None) -> list[Reply]:
        """Every complete reply received so far, waiting (until ``deadline``) for at least one."""
        while not self.replies:
            chunk = self._io(self.sock.recv, RECV_BYTES, deadline)
            self.replies.extend(self.proto.receive_data(chunk))  # b"" raises if replies are due
            if not chunk:
                raise errors.ConnectionError(f"connection closed by {where(self.address)}")
        out = list(self.replies)
        self.replies.clear()
        return out

    def reply(self, deadline: float | None) -> Reply:
        while not self.replies:
            self.replies.extend(self.receive(deadline))
        return self.replies.popleft()

    def collect(self, stream: bool, deadline: float | None) -> list[Reply]:
        """The whole reply to one command: one line, or OK + records + ``+EOF``."""
        first = self.reply(deadline)
        if not stream or not isinstance(first, OkReply):
            return [first]
        out: list[Reply] = [first]
        while True:
            # Whole chunks of replies at a time: a catch-up READ of 10,000 records
            # costs a list extend, not 10,000 calls (about a third of a sink's time).
            replies = self.receive(deadline)
            if type(replies[-1]) in _RECORD_TYPES:
                out.extend(replies)
                continue
            for i, reply in enumerate(replies):
                if isinstance(reply, EndOfStream | ErrorReply):
                    out.extend(replies[: i + 1])
                    self.replies.extend(replies[i + 1 :])  # not ours: the next command's
                    return out
            out.extend(replies)

    def close(self) -> None:
        self.sock.close()


class Client:
    """A blocking logd client on one connection; calls from several threads take turns.

    ``timeout`` (seconds, None: no limit) is the default deadline of a call,
    ``connect_timeout`` bounds each connection attempt, ``retry`` says how
    lost connections are retried (see `logd.client`).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        timeout: float | None = defaults.CLIENT_TIMEOUT,
        connect_timeout: float = defaults.CLIENT_CONNECT_TIMEOUT,
        retry: Retry = Retry(),  # noqa: B008 - frozen
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.endpoint = Endpoint(host, port, ssl_context, token)
        self.address = (host, port)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.retry = retry
        self._conn: Connection | None = None
        self._lock = threading.RLock()

    @classmethod
    def from_url(cls, url: str = DEFAULT_URL, **kwargs: Any) -> Client:
        """A client for ``logd://[:TOKEN@]host:port`` or ``logds://...`` (TLS); keywords as for
        the constructor (``token=`` wins over the URL's)."""
        ep = endpoint(url, token=kwargs.pop("token", None), ssl_context=kwargs.pop("ssl_context", None))
        return cls(ep.host, ep.port, token=ep.token, ssl_context=ep.tls, **kwargs)

    def __repr__(self) -> str:
        return f"<Client {self.endpoint.url}>"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (the next call opens a new one)."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self, deadline: float | None) -> Connection:
        conn = self._conn
        if conn is not None and conn.stale():
            self._drop()
            conn = None
        if conn is None:
            conn = self._conn = Connection(self.endpoint, remaining(deadline, self.connect_timeout))
        return conn

    def _execute(self, call: Call[T], timeout: float | None) -> T:
        """Run one command: connect if needed, send, read its whole reply, retry per policy."""
        limit = self.timeout if timeout is None else timeout
        deadline = deadline_after(limit)
        sent = [False]
        policy = self.retry.policy(lambda e: retriable(e, call.idempotent or not sent[0]), limit)
        return with_retry(policy, self._attempt, call, deadline, sent)

    def _attempt(self, call: Call[T], deadline: float | None, sent: list[bool]) -> T:
        sent[0] = False
        return call.result(self._once(call, deadline, sent))

    def _once(self, call: Call[Any], deadline: float | None, sent: list[bool]) -> list[Reply]:
        with self._lock:
            conn = self._connection(deadline)
            try:
                sent[0] = True
                conn.send(call.command, deadline)
                replies = conn.collect(call.stream, deadline)
            except BaseException:
                self._drop()  # mid-reply: the stream can no longer be trusted to be in step
                raise
            last = replies[-1]
            if isinstance(last, ErrorReply) and last.code in CLOSING_CODES:
                self._drop()
            return replies

    # --- commands ---------------------------------------------------------------

    def append(self, *bodies: Body, timeout: float | None = None) -> list[int]:
        """Append the messages atomically (one MSG); return their ids. ``str`` is sent as UTF-8."""
        return self._execute(msg_call(bodies), timeout)

    def head(self, *, timeout: float | None = None) -> int:
        """The id of the last committed message (0: the log is empty)."""
        return self._execute(HEAD, timeout)

    def ping(self, *, timeout: float | None = None) -> bool:
        """True when the server answers PONG."""
        return self._execute(PING, timeout)

    def stats(self, *, timeout: float | None = None) -> dict[str, str]:
        """The server's figures, name -> value (see protocol.md, STATS)."""
        return self._execute(STATS, timeout)

    def first(self, *, timeout: float | None = None) -> int:
        """The oldest id still retained (where reading "from the beginning" starts; 1 for an empty log)."""
        return self._execute(FIRST, timeout)

    def commit(self, name: str, id: int, *, timeout: float | None = None) -> None:
        """Move the named cursor forward to ``id`` (StaleCursorError if it is past that already)."""
        self._execute(commit_call(name, id), timeout)

    def cursor(self, name: str, *, timeout: float | None = None) -> int:
        """The named cursor's id (0 if it was never committed)."""
        return self._execute(cursor_call(name), timeout)

    def cursors(self, *, timeout: float | None = None) -> dict[str, int]:
        """Every cursor on the server, name -> id (a page at a time when a bare CURSORS is TOO_LARGE)."""
        try:
            return self._execute(CURSORS, timeout)
        except errors.TooLargeError:
            pass
        found: dict[str, int] = {}
        after: str | None = None
        while True:
            page = self._execute(cursors_page_call(after), timeout)
            found.update(page)
            after = next_page(after, page)
            if after is None:
                return found

    def drop_cursor(self, name: str, *, timeout: float | None = None) -> None:
        """Delete the named cursor (NotFoundError if there is none); with authentication, the
        token must own it (its cursor grant) or be admin. Not resent after a lost connection."""
        self._execute(drop_call(name), timeout)

    def read(
        self,
        start: int,
        limit: int = 1000,
        *,
        wait: bool = False,
        timeout: float | None = None,
        skip_corrupt: bool = False,
    ) -> list[Record]:
        """Up to ``limit`` records from id ``start``, those committed now.

        With ``wait``, exactly ``limit`` records, waiting for ones not yet
        written (until the timeout). Raises NotFoundError if ``start`` is
        older than the oldest retained id, and `CorruptRecordError` (with the
        record's id) for a record whose CRC or framing is wrong; with
        ``skip_corrupt`` such a record is left out (and logged) instead.
        """
        if not wait:
            limit = clamp(start, limit, self.head(timeout=timeout))
            if not limit:
                return []
        end = start + limit
        out: list[Record] = []
        while start < end:
            try:
                out.extend(self._read_exact(start, end - start, timeout))
                break
            except errors.CorruptRecordError as exc:
                if not skip_corrupt:
                    raise
                bad = corrupt_id_in(exc, start, end)
                if bad > start:  # the good records before it, cut short by the error
                    out.extend(self._read_exact(start, bad - start, timeout))
                start = bad + 1
        return out

    def _read_exact(self, start: int, limit: int, timeout: float | None) -> list[Record]:
        return self._execute(read_call(start, limit), timeout)

    def read_rows(self, start: int, limit: int, *, timeout: float | None = None) -> list[RecordRow]:
        """Exactly ``limit`` records from id ``start`` (waiting for ones not yet written), as
        ``(id, body)`` tuples built in C: what a database driver binds as it is (``executemany``, COPY).

        Checked as `read` checks records (`CorruptRecordError`, NotFoundError); nothing is skipped.
        """
        return self._execute(read_call(start, limit, rows=True), timeout)  # type: ignore[arg-type]

    def tail(self, start: int | None = None, *, skip_corrupt: bool = False, rows: bool = False) -> Tail:
        """Records from id ``start`` (None: only new ones) as they are committed, forever.

        A corrupt record raises `CorruptRecordError`; with ``skip_corrupt`` it
        is logged and skipped. With ``rows`` the records are `RecordRow` tuples
        (as `read_rows` gives).
        """
        return Tail(self, start, skip_corrupt=skip_corrupt, rows=rows)

    def append_batches(
        self, batches: Iterable[Sequence[Body]], *, max_in_flight: int = 16, timeout: float | None = None
    ) -> Iterator[range]:
        """Append each batch as one MSG, pipelined; yield each batch's ids, in order.

        Up to ``max_in_flight`` MSGs are on the wire at once; ``timeout``
        bounds each wait for an acknowledgement. Nothing is retried once sent:
        after an error, batches acknowledged so far have been yielded and the
        fate of those still in flight is unknown. Holds the connection until
        exhausted or closed.
        """
        with self._lock:
            limit = self.timeout if timeout is None else timeout
            conn: Connection | None = None
            sizes: deque[int] = deque()
            try:
                for bodies in batches:
                    if not bodies:
                        continue
                    if conn is None:  # connect lazily, with retries: nothing is sent yet
                        policy = self.retry.policy(lambda e: retriable(e, True), limit)
                        conn = with_retry(policy, self._connection, deadline_after(limit))
                    while len(sizes) >= max_in_flight:
                        yield self._acked(conn, sizes.popleft(), deadline_after(limit))
                    conn.send(Msg([as_bytes(b) for b in bodies]), deadline_after(limit))
                    sizes.append(len(bodies))
                while sizes:
                    assert conn is not None
                    yield self._acked(conn, sizes.popleft(), deadline_after(limit))
            except BaseException:
                self._drop()
                raise

    @staticmethod
    def _acked(conn: Connection, n: int, deadline: float | None) -> range:
        last = last_id_of([conn.reply(deadline)], n)
        return range(last - n + 1, last + 1)

    def shutdown(self, *, timeout: float | None = None) -> None:
        """Ask the server to stop gracefully (DeniedError unless it allows SHUTDOWN)."""
        self._execute(SHUTDOWN, timeout)

    def refuse_writes(self, *, timeout: float | None = None) -> None:
        """REFUSE: make the server read-only (failover: the old leader steps down)."""
        self._execute(REFUSE, timeout)

    def accept_writes(
        self, *, next_id: int | None = None, min_replicas: int | None = None, timeout: float | None = None
    ) -> None:
        """ACCEPT: the server stops following (if it was) and accepts MSG; with ``next_id``,
        only if that is its next id; with ``min_replicas``, it runs with that instead of the
        --min-replicas it kept (protocol.md 3.4)."""
        self._execute(accept_call(next_id, min_replicas), timeout)


class Tail:
    """Records from ``start`` on, as they are committed; iterate it, or take `batch`es.

    It holds its own connection (a tailing connection takes no other
    command). When the connection is lost, or the server ends the stream
    because it is stopping, it reconnects with the client's retry policy and
    resumes at the last id received + 1, like a NATS ordered consumer.
    """

    def __init__(self, client: Client, start: int | None, *, skip_corrupt: bool = False, rows: bool = False) -> None:
        if start is not None and start < 1:
            raise ValueError("a tail starts at an id >= 1")
        self._client = client
        self._skip_corrupt = skip_corrupt
        self._rows = rows
        self._want = start  # the next id to ask the server for; None: after the head
        self._conn: Connection | None = None
        self._records: deque[Any] = deque()  # Records, or RecordRows with ``rows``

    @property
    def position(self) -> int | None:
        """The id of the next record this tail will hand out (None: not connected yet)."""
        if not self._records:
            return self._want
        first = self._records[0]
        return first[0] if self._rows else first.id

    def __iter__(self) -> Tail:
        return self

    def __next__(self) -> Record:
        while not self._records:
            self._fill(None)
        return self._records.popleft()

    def batch(self, max_records: int = 1000, timeout: float | None = None) -> list[Record]:
        """Up to ``max_records`` records: all that can be had now, waiting up to ``timeout`` s
        (None: forever) for the first one."""
        if not self._records:
            self._fill(deadline_after(timeout))
        # Top up with what has arrived meanwhile, without waiting.
        while len(self._records) < max_records and self._conn is not None and self._conn.stale():
            self._step(None)
        take = self._records.popleft
        return [take() for _ in range(min(max_records, len(self._records)))]

    def __enter__(self) -> Tail:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the tail's connection (iterating again reconnects)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _fill(self, deadline: float | None) -> None:
        while not self._records:
            if not self._step(deadline):
                return

    def _step(self, deadline: float | None) -> bool:
        """Receive once (reconnecting if the connection is lost); False if nothing came in time."""
        if self._conn is None:
            try:
                self._open()
            except errors.CorruptRecordError as exc:  # in the chunk that came with the OK
                return self._corrupt(exc)
        assert self._conn is not None
        try:
            replies = self._conn.receive(deadline)
        except errors.TimeoutError:
            return False  # nothing new in time; no byte was lost, the stream stays in step
        except errors.ConnectionError:
            self.close()
            return True
        except errors.CorruptRecordError as exc:
            return self._corrupt(exc)
        except BaseException:
            self.close()
            raise
        try:
            nxt, ended = stream_step(replies, self._records)
        except BaseException:
            self.close()
            raise
        if nxt:
            self._want = nxt
        if ended:
            self.close()
        return True

    def _corrupt(self, exc: errors.CorruptRecordError) -> bool:
        """A corrupt record: raise it, or (``skip_corrupt``) skip it and go on."""
        self.close()
        if not self._skip_corrupt or self._want is None:
            raise exc
        self._skip(exc)
        return True

    def _skip(self, exc: errors.CorruptRecordError) -> None:
        """Go on after a corrupt record: fetch the good ones before it (their chunk was lost), resume after it."""
        assert self._want is not None
        bad = corrupt_id_in(exc, self._want, exc.id + 1)
        if bad > self._want:
            good = self._client.read(self._want, bad - self._want, wait=True, skip_corrupt=True)
            if self._rows:
                self._records.extend((r.id, r.body) for r in good)
            else:
                self._records.extend(good)
        self._want = bad + 1

    def _open(self) -> None:
        client = self._client
        policy = client.retry.policy(lambda e: retriable(e, True), None)
        self._conn = with_retry(policy, self._connect)

    def _connect(self) -> Connection:
        client = self._client
        deadline = deadline_after(client.timeout)
        conn = Connection(client.endpoint, remaining(deadline, client.connect_timeout))
        try:
            if self._want is None:
                conn.send(Head(), deadline)
                self._want = id_of([conn.reply(deadline)]) + 1
            conn.send(ReadRows(self._want, 0) if self._rows else Read(self._want, 0), deadline)
            checked(conn.reply(deadline))
        except BaseException:
            conn.close()
            raise
        return conn


def connect(url: str = DEFAULT_URL, **kwargs: Any) -> Client:
    """A blocking `Client` for ``logd://host:port`` (connects on first use)."""
    return Client.from_url(url, **kwargs)
