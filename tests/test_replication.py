"""The follower's stream parser (sans-IO), the leader's replica bookkeeping, the follower's stop."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from logd.config import Config
from logd.errors import CorruptRecordError, ProtocolError
from logd.protocol import Replicate
from logd.protocol.replica import (
    Chunk,
    EpochStart,
    LeaderPosition,
    ReplicaStreamParser,
    SegmentStart,
    StreamEnd,
    StreamError,
    StreamOk,
    epoch_marker,
    handshake_reply,
    position_marker,
    segment_marker,
)
from logd.replication import ReplicaSet
from logd.replication.follower import Follower
from logd.replication.leader import replicate_handshake
from logd.server import LogServer
from logd.storage.epochs import Epochs
from logd.storage.record import encode_record

BODIES = [b"hello", b"", b"with\r\nCRLF", b"x" * 3000, b"+1 2 3\r\n"] + [b"m%d" % i for i in range(5, 15)]


def stream(first: int = 1) -> bytes:
    recs = [encode_record(first + i, b) for i, b in enumerate(BODIES)]
    return (
        b"OK\r\n"
        + position_marker(20, 18)
        + segment_marker(first)
        + b"".join(recs[:6])
        + segment_marker(first + 6)
        + b"".join(recs[6:])
        + b"+EOF\r\n"
    )


def collect(parser: ReplicaStreamParser, pieces: list[bytes]) -> tuple[list[object], bytes, list[int]]:
    """Feed pieces; return the non-chunk events, the concatenated chunk bytes and their first ids."""
    events: list[object] = []
    data = b""
    firsts: list[int] = []
    for piece in pieces:
        for ev in parser.feed(piece):
            if isinstance(ev, Chunk):
                assert len(ev.offsets) == ev.count
                # Offsets point at each record within the chunk.
                for k, off in enumerate(ev.offsets):
                    assert bytes(ev.data[off:]).startswith(b"+%d " % (ev.first_id + k))
                data += ev.data
                firsts.append(ev.first_id)
            else:
                events.append(ev)
    return events, data, firsts


def expected_events(first: int = 1) -> list[object]:
    return [StreamOk(), LeaderPosition(20, 18), SegmentStart(first), SegmentStart(first + 6), StreamEnd()]


def test_whole_stream() -> None:
    events, data, firsts = collect(ReplicaStreamParser(1), [stream()])
    assert events == expected_events()
    assert data == b"".join(encode_record(1 + i, b) for i, b in enumerate(BODIES))
    assert firsts == [1, 7]  # one chunk per segment


def test_byte_by_byte_and_every_split() -> None:
    s = stream(98)  # ids cross 100: the id's digit count grows
    want = b"".join(encode_record(98 + i, b) for i, b in enumerate(BODIES))
    events, data, _ = collect(ReplicaStreamParser(98), [s[i : i + 1] for i in range(len(s))])
    assert events == expected_events(98) and data == want
    for cut in range(1, len(s), 7):
        events, data, _ = collect(ReplicaStreamParser(98), [s[:cut], s[cut:]])
        assert events == expected_events(98) and data == want, cut


def test_crc_mismatch_and_gap_are_corrupt() -> None:
    rec = bytearray(encode_record(1, b"hello"))
    rec[-3] ^= 1
    with pytest.raises(CorruptRecordError, match="record 1"):
        ReplicaStreamParser(1).feed(b"OK\r\n" + bytes(rec))
    with pytest.raises(CorruptRecordError, match="record 1"):
        ReplicaStreamParser(1).feed(b"OK\r\n" + encode_record(2, b"gap") + encode_record(3, b"x"))
    with pytest.raises(CorruptRecordError):
        ReplicaStreamParser(1).feed(b"OK\r\n+1 99999999999 00000000\r\nabc")


def test_errors_and_garbage() -> None:
    assert ReplicaStreamParser(5).feed(b"ERR DIVERGED id 4 differs\r\n") == [StreamError("DIVERGED", "id 4 differs")]
    with pytest.raises(ProtocolError):
        ReplicaStreamParser(1).feed(b"OK\r\nhello\r\n")


def test_replica_set_high_watermark_and_in_sync() -> None:
    rs = ReplicaSet(min_replicas=2, timeout=5.0, head=0)
    a, b = object(), object()
    assert rs.on_commit(10) is False and rs.hw == 0
    assert rs.refusal() is not None
    assert rs.ack(a, 10) is False  # one replica of two
    assert rs.ack(b, 7) is True and rs.hw == 7
    assert rs.in_sync() == 2 and rs.refusal() is None
    del rs.acked[b]
    assert rs.hw == 7 and "1 replicas in sync" in str(rs.refusal())
    asynchronous = ReplicaSet(min_replicas=0, timeout=5.0, head=3)
    assert asynchronous.on_commit(4) is True and asynchronous.hw == 4 and asynchronous.refusal() is None


def test_epoch_handshake_and_markers_parse() -> None:
    data = b"OK 3 2 101 1\r\n" + epoch_marker(3, 7) + encode_record(7, b"x") + b"+EPOCH 4 8\r\n"
    events = ReplicaStreamParser(7).feed(data)
    assert events[0] == StreamOk(3, 2, 101, 1)
    assert events[1] == EpochStart(3, 7)
    assert isinstance(events[2], Chunk) and events[2].count == 1
    assert events[3] == EpochStart(4, 8)
    assert handshake_reply(3, 2, 101, 1) == b"OK 3 2 101 1\r\n"
    with pytest.raises(ProtocolError):
        ReplicaStreamParser(1).feed(b"OK\r\n+EPOCH x 1\r\n")


def test_leader_answers_where_the_replica_epoch_ends(tmp_path) -> None:  # type: ignore[no-untyped-def]
    epochs = Epochs(str(tmp_path), entries=[(0, 1), (2, 101), (4, 201)])
    # The replica's epoch is the leader's and runs past its start: stream.
    assert replicate_handshake(epochs, Replicate(150, 0, 2, 2), 300, 1) == (b"OK 4 2 201 1\r\n", True)
    assert replicate_handshake(epochs, Replicate(201, 0, 2, 4), 300, 0) == (b"OK 4 2 201 0\r\n", True)
    # The replica holds epoch 0 past where the leader's epoch 0 ended: cut at 101 first.
    assert replicate_handshake(epochs, Replicate(120, 0, 0, 0), 300, 0) == (b"OK 4 0 101 0\r\n", False)
    # The leader never had epoch 3: it answers with epoch 2, and the replica cuts where its 3 began.
    assert replicate_handshake(epochs, Replicate(190, 0, 3, 3), 300, 0) == (b"OK 4 2 201 0\r\n", False)
    # Ahead of the leader in its newest epoch (a leader that lost an unsynced tail).
    assert replicate_handshake(epochs, Replicate(310, 0, 4, 4), 300, 0) == (b"OK 4 4 300 0\r\n", False)


async def test_a_cancelled_follower_stops_even_if_the_cancellation_was_swallowed(tmp_path: Path) -> None:
    # Found in CI: a follower stopped while it retried a leader that had just gone
    # kept retrying (Python 3.11's wait_for swallowed the task's cancellation as the
    # connect failed), so its server's stop hung until the watchdog. Here the loop is
    # run again after cancel(), as if the cancellation had been swallowed.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed: connects are refused
    server = LogServer(Config(data_dir=str(tmp_path / "d")))
    try:
        follower = Follower(server, f"127.0.0.1:{port}")
        follower.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(follower._run(), 10)
    finally:
        server.log.close()
