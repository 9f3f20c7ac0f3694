"""A connection's MSG lane (logd/lane.py; in C, logd/_lane.c: tests/test_hot_lane.py holds the two to each other).

What the lane takes and writes, then the lane in a real server (in this
process, on a real socket and data dir): the order contract holds when a
chunk the lane takes is followed by one it does not. Those tests feed a
connection's ``data_received`` directly, as the event loop does, so that two
chunks arrive before the round that commits the first: the case a socket
cannot produce on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from logd import lane as lane_module
from logd.config import Config
from logd.connection import Connection
from logd.server import LogServer

WAIT_S = 30.0  # bounds a failure only: every reply waits for an fsync of a shared disk
LIMITS = (64, 50, 4, 120)  # max_line, max_message, max_batch, max_batch_bytes


# --- the lane alone -----------------------------------------------------------------------


def recording_lane(base: type, hub_type: Any) -> tuple[Any, Any, list[Any]]:
    """A lane of ``base`` on a hub of ``hub_type`` whose every outward call lands in one list."""
    calls: list[Any] = []

    class Recorded(base):  # type: ignore[misc, valid-type]
        def slow_received(self, data: bytes) -> None:
            calls.append(("slow", data))

        def flush(self) -> None:
            calls.append(("flush", self.fast_count, self.fast_bytes))

    hub = hub_type(lambda batch: calls.append(("append", batch[0], batch[1], batch[3])), lambda: calls.append("kick"),
                   300, 200)
    lane = Recorded()
    lane.lane_setup(hub, *LIMITS)
    lane.lane_write = lambda data: calls.append(("write", data))
    lane.lane_buffer_size = lambda: len([c for c in calls if c[0] == "write"]) % 3  # changes now and then
    return lane, hub, calls


def msg(*bodies: bytes, lf: bool = False) -> bytes:
    end = b"\n" if lf else b"\r\n"
    return b"MSG " + b" ".join(b"%d" % len(b) for b in bodies) + end + b"".join(b + end for b in bodies)


IMPLEMENTATIONS = {(lane_module.Lane, lane_module.Hub), (lane_module.LanePy, lane_module.HubPy)}  # C and twin


def test_the_lane_takes_whole_msgs_only_while_everything_lets_it() -> None:
    for base, hub_type in IMPLEMENTATIONS:
        lane, hub, calls = recording_lane(base, hub_type)
        lane.data_received(msg(b"a"))
        assert calls == [("slow", msg(b"a"))]  # shut until the connection opens it
        lane.lane_open = True
        calls.clear()
        lane.data_received(msg(b"ab") + msg(b"c", b"d"))
        assert calls == [("append", [b"ab"], 2, None), ("append", [b"c", b"d"], 2, None), "kick"]
        assert (lane.fast_count, lane.fast_bytes, hub.pending_bytes) == (2, 4, 4)
        hub.armed = True  # a round is on its way: no second kick
        calls.clear()
        lane.data_received(msg(b"e") + b"PING\r\n")
        assert calls == [("slow", msg(b"e") + b"PING\r\n")]  # not only MSGs: all of it goes the slow way
        calls.clear()
        lane.data_received(msg(b"x" * 50) + msg(b"y" * 50) + msg(b"z" * 50) + msg(b"w" * 50))
        assert calls[-1] == ("flush", 6, 204)  # past conn_input (200): the connection's flush pauses reading
        assert "kick" not in calls  # armed, and not past the backlog (300)
        hub.accepting = False
        calls.clear()
        lane.data_received(msg(b"f"))
        assert calls == [("slow", msg(b"f"))]
        lane.lane_ack(2, 7)
        assert lane.lane_send() is True  # the buffer size (1) is not the counted 0: flush
        assert calls[-1] == ("write", b"OK 7\r\n")


def test_acks_go_out_in_one_write_and_ask_for_a_flush_only_when_needed() -> None:
    for base, hub_type in IMPLEMENTATIONS:
        lane, _hub, calls = recording_lane(base, hub_type)
        lane.lane_buffer_size = lambda: 0
        lane.lane_open = True
        lane.data_received(msg(b"ab") + msg(b"cde"))
        lane.lane_ack(2, 41)
        lane.lane_ack(3, 42)
        assert (lane.fast_count, lane.fast_bytes) == (2, 5)  # not answered until sent
        assert lane.lane_send() is False  # written, nothing held: nothing more to do
        assert calls[-1] == ("write", b"OK 41\r\nOK 42\r\n")
        assert (lane.fast_count, lane.fast_bytes) == (0, 0)
        assert lane.lane_send() is False and calls[-1] == ("write", b"OK 41\r\nOK 42\r\n")  # nothing to send
        lane.data_received(msg(b"fg"))
        lane.lane_open = False  # the session holds a reply behind it
        lane.lane_ack(2, 43)
        assert lane.lane_send() is True
        lane.lane_write = None
        lane.data_received(msg(b"ef"))  # lost: the lane is shut, the slow path says so
        assert calls[-1] == ("slow", msg(b"ef"))
        assert (lane.fast_count, lane.fast_bytes) == (0, 0)


async def test_a_pipelining_client_gets_its_oks_in_one_packet(served) -> None:  # type: ignore[no-untyped-def]
    srv, reader, _writer, conn = served
    writes: list[bytes] = []
    write = conn.lane_write
    conn.lane_write = lambda data: (writes.append(data), write(data))  # the transport's, counted
    conn.data_received(b"".join(msg(b"m%d" % i) for i in range(100)))
    assert conn.fast_count == 100
    assert await replies(reader, 100) == [b"OK %d\r\n" % i for i in range(1, 101)]
    assert writes == [b"".join(b"OK %d\r\n" % i for i in range(1, 101))]


# --- the lane in a real server ---------------------------------------------------------------


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[LogServer, Any, Any, Connection]]:
    async for item in serve(tmp_path):
        yield item


async def serve(tmp_path: Path, **config: Any) -> AsyncIterator[tuple[LogServer, Any, Any, Connection]]:
    srv = LogServer(Config(data_dir=str(tmp_path / "d"), port=0, shutdown_timeout=2.0, **config))
    host, port = await srv.start()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"PING\r\n")  # the connection is made, and its lane open, once this is answered
    assert await asyncio.wait_for(reader.readline(), WAIT_S) == b"PONG\r\n"
    (conn,) = srv.connections
    try:
        yield srv, reader, writer, conn
    finally:
        writer.close()
        await srv.shutdown()


async def replies(reader: asyncio.StreamReader, count: int) -> list[bytes]:
    return [await asyncio.wait_for(reader.readline(), WAIT_S) for _ in range(count)]


async def test_a_command_behind_a_lane_msg_is_answered_after_its_ok(served) -> None:  # type: ignore[no-untyped-def]
    srv, reader, _writer, conn = served
    assert conn.lane_open
    conn.data_received(msg(b"a"))
    assert conn.fast_count == 1  # the lane took it
    conn.data_received(b"PING\r\nHEAD\r\n")  # before the round that commits it
    conn.data_received(msg(b"b"))  # the session holds replies: this one goes its way too
    assert conn.fast_count == 1
    assert await replies(reader, 4) == [b"OK 1\r\n", b"PONG\r\n", b"OK 1\r\n", b"OK 2\r\n"]
    await srv.queue.drain()
    assert conn.lane_open and conn.fast_count == 0 and conn.fast_bytes == 0


async def test_close_behind_a_lane_msg_waits_for_its_ok(served) -> None:  # type: ignore[no-untyped-def]
    srv, reader, _writer, conn = served
    conn.data_received(msg(b"a") + msg(b"b"))
    conn.data_received(b"CLOSE\r\n" + msg(b"phantom"))
    assert await replies(reader, 3) == [b"OK 1\r\n", b"OK 2\r\n", b"OK\r\n"]
    assert await asyncio.wait_for(reader.read(), WAIT_S) == b""
    assert srv.log.head == 2  # nothing after CLOSE acted


async def test_a_failed_lane_batch_is_answered_in_its_turn(served) -> None:  # type: ignore[no-untyped-def]
    srv, reader, _writer, conn = served

    def disk_gone(*args: object) -> int:
        raise OSError(5, "Input/output error")

    conn.data_received(msg(b"a"))
    srv.log.append = disk_gone  # the round that takes it fails, as a write would
    conn.data_received(b"PING\r\n")
    first, second = await replies(reader, 2)
    assert first.startswith(b"ERR UNAVAILABLE storage error") and second == b"PONG\r\n"
    assert conn.fast_count == 0 and conn.fast_bytes == 0


async def test_no_lane_msg_is_taken_while_writes_are_refused(served) -> None:  # type: ignore[no-untyped-def]
    srv, reader, _writer, conn = served
    conn.data_received(b"REFUSE\r\n")
    assert await replies(reader, 1) == [b"OK\r\n"]
    assert not srv.queue.hub.accepting
    conn.data_received(msg(b"a"))
    assert conn.fast_count == 0
    (refused,) = await replies(reader, 1)
    assert refused.startswith(b"ERR READONLY")
    conn.data_received(b"ACCEPT\r\n")
    assert await replies(reader, 1) == [b"OK\r\n"]
    assert srv.queue.hub.accepting
    conn.data_received(msg(b"b"))
    assert conn.fast_count == 1
    assert await replies(reader, 1) == [b"OK 1\r\n"]


async def test_a_lane_past_its_input_budget_stops_being_read_until_answered(tmp_path: Path) -> None:
    async for srv, reader, _writer, conn in serve(tmp_path, conn_input_bytes=1000):
        conn.data_received(msg(b"x" * 600) + msg(b"y" * 600))
        assert conn.fast_bytes == 1200 and conn.read_paused and not conn.lane_open
        assert await replies(reader, 2) == [b"OK 1\r\n", b"OK 2\r\n"]
        await srv.queue.drain()
        assert not conn.read_paused and conn.lane_open


# The pieces the order test builds its scripts from: MSGs (one of two bodies, one LF-ended), PING, HEAD.
SCRIPT_PARTS = [msg(b"a"), msg(b"bc", b"d"), b"PING\r\n", b"HEAD\r\n", msg(b"e", lf=True)]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(range(len(SCRIPT_PARTS))), min_size=1, max_size=12), st.data())
def test_every_chunking_and_every_commit_timing_keeps_the_order(parts: list[int], data: st.DataObject) -> None:
    """Cut a script anywhere, commit rounds between any chunks: the replies are those of the script."""
    script = b"".join(SCRIPT_PARTS[i] for i in parts)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(script) - 1)), max_size=6)))
    pieces = [script[a:b] for a, b in zip([0, *cuts], [*cuts, len(script)], strict=True)]
    rounds = data.draw(st.lists(st.booleans(), min_size=len(pieces), max_size=len(pieces)))
    expected, head = [], 0
    for i in parts:
        if i in (0, 1, 4):
            head += 2 if i == 1 else 1
            expected.append(b"OK %d\r\n" % head)
        else:
            expected.append(b"PONG\r\n" if i == 2 else b"OK %d\r\n" % head)

    async def scenario() -> list[bytes]:
        # aclosing: the server stops here, before its directory goes (a return out of
        # the loop would leave it to stop at the loop's end, after).
        with tempfile.TemporaryDirectory() as tmp:
            async with contextlib.aclosing(serve(Path(tmp))) as served:
                async for srv, reader, _writer, conn in served:
                    for piece, commit in zip(pieces, rounds, strict=True):
                        conn.data_received(piece)
                        if commit:
                            await srv.queue.drain()
                    return await replies(reader, len(expected))
        raise AssertionError("not served")

    assert uvloop.run(scenario()) == expected
