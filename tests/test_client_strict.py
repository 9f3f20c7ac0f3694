"""Strict reply decoding in the client library (issue 13, findings 7 and 8), against a scripted server.

The scripted server is a real TCP server on 127.0.0.1 that answers each
command line with exactly the bytes a test gives it, so replies no logd
server would send (wrong ids, foreign digits, extra records, damaged
segments) can be tried.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from logd.client import AsyncClient, Client, Retry
from logd.errors import CorruptRecordError, LogdError, ProtocolError
from logd.storage.record import encode_record

Answer = Callable[[bytes], bytes]
NO_RETRY = Retry(attempts=1)


class ScriptedServer:
    """Answers every command line (MSG bodies are read and dropped) with ``answer(line)``."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        rfile = conn.makefile("rb")
        try:
            while line := rfile.readline():
                line = line.rstrip(b"\r\n")
                if line.startswith(b"MSG "):
                    for n in line.split()[1:]:
                        rfile.read(int(n) + 2)
                reply = self.answer(line)
                if reply:
                    conn.sendall(reply)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


@pytest.fixture
def scripted() -> Iterator[Callable[[Answer], ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(answer: Answer) -> ScriptedServer:
        servers.append(ScriptedServer(answer))
        return servers[-1]

    yield start
    for srv in servers:
        srv.close()


def client_of(srv: ScriptedServer) -> Client:
    return Client("127.0.0.1", srv.port, timeout=5.0, retry=NO_RETRY)


def always(reply: bytes) -> Answer:
    return lambda line: reply


# --- finding 7: decoding -----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["١٢", "²", "12x", "", "99999999999999999999"])
def test_an_id_must_be_ascii_digits(scripted, value: str) -> None:  # type: ignore[no-untyped-def]
    srv = scripted(always(b"OK %s\r\n" % value.encode()))
    with client_of(srv) as client, pytest.raises(ProtocolError):
        client.head()  # before: 12 for "١٢", ValueError for "²"


def test_a_msg_gets_as_many_ids_as_messages(scripted) -> None:  # type: ignore[no-untyped-def]
    srv = scripted(always(b"OK 1\r\n"))
    with client_of(srv) as client:
        assert client.append(b"a") == [1]
        with pytest.raises(ProtocolError, match="OK 1 cannot be the last id of 3 messages"):
            client.append(b"a", b"b", b"c")  # before: ids [-1, 0, 1]


async def test_a_msg_gets_as_many_ids_as_messages_async(scripted) -> None:  # type: ignore[no-untyped-def]
    srv = scripted(always(b"OK 2\r\n"))
    client = AsyncClient("127.0.0.1", srv.port, timeout=5.0, retry=NO_RETRY)
    try:
        with pytest.raises(ProtocolError):
            await client.append(b"a", b"b", b"c")
    finally:
        await client.close()


def test_a_read_gets_exactly_limit_records(scripted) -> None:  # type: ignore[no-untyped-def]
    two = b"OK\r\n" + encode_record(1, b"x") + encode_record(2, b"y") + b"+EOF\r\n"
    srv = scripted(always(two))
    with client_of(srv) as client, pytest.raises(ProtocolError, match="READ 1 1 got 2 records"):
        client.read(1, 1, wait=True)  # before: both records


@pytest.mark.parametrize(
    "stream",
    [b"garbage\n", b"garbage\r\n", b"\x00" * 100 + b"\n", b"z" * 70_000, b"+1 1 00000000\r\nx\r\n"],
    ids=["no CR", "a line", "zeros", "no line end", "bad CRC"],
)
def test_a_damaged_segment_is_a_corrupt_record_with_its_id(scripted, stream: bytes) -> None:  # type: ignore[no-untyped-def]
    srv = scripted(always(b"OK\r\n" + stream))
    with client_of(srv) as client, pytest.raises(CorruptRecordError) as caught:
        client.read(1, 1, wait=True)  # before: ProtocolError (BAD_FORMAT) for the first four
    assert caught.value.id == 1


# --- finding 8: getting past a corrupt record -----------------------------------------------------

BODIES = {i: b"body-%d" % i for i in range(1, 6)}
BAD = 3


def stored(id: int) -> bytes:
    """Record ``id`` as the server stores it; record BAD has a flipped body byte."""
    rec = encode_record(id, BODIES[id])
    if id == BAD:
        rec = rec.replace(BODIES[id], b"bodx-%d" % id)
    return rec


def log_server(line: bytes) -> bytes:
    """A logd server over records 1..5, record 3 damaged; READ s 0 tails (sends what there is)."""
    verb, *args = line.split()
    if verb == b"HEAD":
        return b"OK 5\r\n"
    if verb == b"READ":
        start, limit = int(args[0]), int(args[1]) if len(args) > 1 else 0
        last = 5 if not limit else start + limit - 1
        records = b"".join(stored(i) for i in range(start, last + 1))
        return b"OK\r\n" + records + (b"+EOF\r\n" if limit else b"")
    return b"ERR UNKNOWN_COMMAND\r\n"


def test_read_raises_on_a_corrupt_record_unless_told_to_skip_it(scripted) -> None:  # type: ignore[no-untyped-def]
    srv = scripted(log_server)
    with client_of(srv) as client:
        with pytest.raises(CorruptRecordError) as caught:
            client.read(1, 5)
        assert caught.value.id == BAD
        got = client.read(1, 5, skip_corrupt=True)
        assert [(r.id, r.body) for r in got] == [(i, BODIES[i]) for i in (1, 2, 4, 5)]


def test_tail_skips_a_corrupt_record_only_when_told(scripted) -> None:  # type: ignore[no-untyped-def]
    srv = scripted(log_server)
    with client_of(srv) as client:
        with client.tail(1) as tail, pytest.raises(CorruptRecordError) as caught:
            for _ in range(4):
                next(tail)
        assert caught.value.id == BAD
        with client.tail(1, skip_corrupt=True) as tail:
            assert [next(tail).id for _ in range(4)] == [1, 2, 4, 5]


def test_rows_come_as_id_body_tuples_with_the_same_checks(scripted) -> None:  # type: ignore[no-untyped-def]
    srv = scripted(log_server)
    with client_of(srv) as client:
        assert client.read_rows(1, 2) == [(1, BODIES[1]), (2, BODIES[2])]
        with pytest.raises(CorruptRecordError) as caught:
            client.read_rows(1, 5)
        assert caught.value.id == BAD
        with client.tail(1, rows=True) as tail, pytest.raises(CorruptRecordError):
            for _ in range(4):
                next(tail)
        with client.tail(1, skip_corrupt=True, rows=True) as tail:
            got = [next(tail) for _ in range(4)]
            assert tail.position == 6
        assert got == [(i, BODIES[i]) for i in (1, 2, 4, 5)]
        assert all(type(row) is tuple for row in got)


async def test_async_read_and_tail_skip_a_corrupt_record(scripted) -> None:  # type: ignore[no-untyped-def]
    srv = scripted(log_server)
    client = AsyncClient("127.0.0.1", srv.port, timeout=5.0, retry=NO_RETRY)
    try:
        with pytest.raises(CorruptRecordError):
            await client.read(1, 5)
        assert [r.id for r in await client.read(1, 5, skip_corrupt=True)] == [1, 2, 4, 5]
        tail = client.tail(1, skip_corrupt=True)
        try:
            assert [(await tail.__anext__()).id for _ in range(4)] == [1, 2, 4, 5]
        finally:
            await tail.aclose()
    finally:
        await client.close()


def test_only_logd_errors_escape(scripted) -> None:  # type: ignore[no-untyped-def]
    replies = [b"OK \xff\xfe\r\n", b"PONG\r\n", b"OK 3 4\r\n", b"+EOF\r\n", b"OK -1\r\n"]
    for reply in replies:
        srv = scripted(always(reply))
        with client_of(srv) as client:
            with pytest.raises(LogdError):
                client.head()
