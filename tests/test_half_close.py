"""A probe for a half-closed peer (`Stream.probe`) never breaks the stream's framing, whatever it waits for.

The stream runs on a real log and a real (not started) `LogServer`; its
bytes go to a list. The server-wide output budget is held over by hand, so
the stream waits inside a record (throttled) as it would behind other
connections' unread output.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from logd.config import Config
from logd.protocol import Read, Replicate
from logd.server import LogServer
from logd.storage.policy import FsyncPolicy
from logd.storage.record import encode_record
from logd.streams import Stream

BODIES = [os.urandom(150_000), b"small", b"", os.urandom(70_000)]


class Collect:
    """A stream's Sink: what a connection would write, in order."""

    def __init__(self, server: LogServer, hold_after_write: bool) -> None:
        self.server = server
        self.hold_after_write = hold_after_write
        self.out = bytearray()
        self.write_paused = False
        self.peer = "test"
        self.ended = False

    def write(self, data: bytes) -> None:
        self.out += data
        if self.hold_after_write:  # other connections' unread output fills the server's budget
            self.server.budgets.output_used = self.server.budgets.server_output + 1

    def closing(self) -> bool:
        return False

    def stream_ended(self) -> None:
        self.ended = True

    def abandon(self) -> None:
        raise AssertionError("the stream gave up")


@pytest.fixture
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    srv = LogServer(Config(data_dir=str(tmp_path / "data"), fsync=FsyncPolicy("never"), conn_output_bytes=64 << 10))
    srv.log.append(BODIES)
    yield srv
    srv.log.close()


def records_skipping_empty_lines(data: bytes) -> tuple[list[bytes], int, bytes]:
    """Parse a READ stream as a reader does: records, the empty lines skipped between them, the rest."""
    out: list[bytes] = []
    empty = 0
    p = 0
    while True:
        if data.startswith(b"\r\n", p):
            empty += 1
            p += 2
            continue
        if not data.startswith(b"+", p) or data.startswith(b"+EOF\r\n", p):
            return out, empty, data[p:]
        eol = data.index(b"\r\n", p)
        rid, length, _crc = data[p + 1 : eol].split(b" ")
        start = eol + 2
        body = data[start : start + int(length)]
        assert int(rid) == len(out) + 1 and data[start + int(length) : start + int(length) + 2] == b"\r\n"
        assert bytes(data[p : start + int(length) + 2]) == encode_record(int(rid), body)
        out.append(bytes(body))
        p = start + int(length) + 2


def test_probes_inside_a_record_and_between_records_keep_the_framing(server: LogServer) -> None:
    sink = Collect(server, hold_after_write=True)
    stream = Stream(server, sink, Read(1, 0))
    server.stream_started(stream)
    stream.pump()
    assert stream.piece is not None and stream in server.budgets.throttled  # waits inside record 1
    for _ in range(100):
        stream.probe()  # inside the record: its next byte each time
    while stream.piece is not None:
        stream.probe()
    assert stream.next == 2 and stream in server.budgets.throttled  # record 1 completed by probes alone
    stream.probe()
    stream.probe()  # between records: empty lines
    sink.hold_after_write = False
    server.budgets.output_used = 0
    stream.pump()
    assert stream.parked == len(BODIES) + 1  # at the head, waiting
    stream.probe()
    records, empty, rest = records_skipping_empty_lines(bytes(sink.out))
    assert records == BODIES and empty == 3 and rest == b""


def test_a_probe_that_completes_a_reads_last_record_ends_it(server: LogServer) -> None:
    sink = Collect(server, hold_after_write=True)
    stream = Stream(server, sink, Read(1, 1))
    server.stream_started(stream)
    stream.pump()
    while stream.piece is not None:
        stream.probe()
    records, empty, rest = records_skipping_empty_lines(bytes(sink.out))
    assert records == BODIES[:1] and empty == 0 and rest == b"+EOF\r\n"
    assert sink.ended and stream not in server.streams


def test_a_replica_is_probed_with_its_head_marker(server: LogServer) -> None:
    sink = Collect(server, hold_after_write=False)
    stream = Stream(server, sink, Replicate(len(BODIES) + 1, None))
    server.stream_started(stream)
    stream.begin()
    stream.pump()
    head = b"+HEAD %d %d\r\n" % (len(BODIES), len(BODIES))
    assert bytes(sink.out) == head and stream.parked
    stream.probe()
    assert bytes(sink.out) == head * 2
