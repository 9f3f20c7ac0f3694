"""Every number from the wire is range-checked where it is parsed (issue 22, finding 5).

A peer must not make the server write a value it later refuses to read: a
REPLICATE claiming epoch 2^63-1 fenced the leader, and the admin's ACCEPT
then wrote epoch 2^63 to EPOCHS, which no follower could send back.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from logd.client.commands import cursors_of
from logd.errors import ProtocolError, StorageError
from logd.protocol import StatsReply
from logd.protocol.commands import MAX_ID
from logd.protocol.replica import EpochStart, ReplicaStreamParser, StreamOk
from logd.storage.epochs import FILE, Epochs
from tests.e2e.conftest import ServerProcess
from tests.e2e.helpers import stats

MAX_EPOCH = MAX_ID  # epochs are numbers of the wire too: 0 .. 2^63-1
TOP = b"%d" % MAX_ID


@pytest.mark.parametrize("line", [
    b"OK 9223372036854775808 0 1 0",  # leader epoch 2^63
    b"OK 1 0 1 9223372036854775808",
    b"OK 1 0 1 " + b"9" * 5000,  # int() would refuse it with a ValueError, not a ProtocolError
], ids=["epoch", "min_replicas", "5000 digits"])
def test_the_leaders_ok_takes_numbers_in_range_only(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        ReplicaStreamParser(1).feed(line + b"\r\n")


@pytest.mark.parametrize("line", [
    b"+SEG 9223372036854775808", b"+HEAD 1 " + b"1" * 20, b"+EPOCH 9223372036854775808 1",
    b"+CURSOR app 9223372036854775808", b"+EPOCH 1 " + b"7" * 5000,
], ids=["SEG", "HEAD", "EPOCH", "CURSOR", "5000 digits"])
def test_markers_take_numbers_in_range_only(line: bytes) -> None:
    parser = ReplicaStreamParser(1)
    assert parser.feed(b"OK 0 0 1 0\r\n") == [StreamOk(0, 0, 1, 0)]
    with pytest.raises(ProtocolError):
        parser.feed(line + b"\r\n")


def test_the_largest_numbers_are_taken() -> None:
    parser = ReplicaStreamParser(1)
    events = parser.feed(b"OK " + TOP + b" 0 1 0\r\n+EPOCH " + TOP + b" 1\r\n")
    assert events == [StreamOk(MAX_ID, 0, 1, 0), EpochStart(MAX_ID, 1)]


def test_epochs_past_the_range_are_never_written(tmp_path: Path) -> None:
    e = Epochs.load(str(tmp_path))
    e.see(MAX_EPOCH)
    assert e.next_epoch is None  # no promotion is left
    with pytest.raises(ValueError):
        e.start(MAX_EPOCH + 1, 1)
    with pytest.raises(ValueError):
        e.see(MAX_EPOCH + 1)
    assert Epochs.load(str(tmp_path)).seen == MAX_EPOCH  # the file holds only what it can read back


def test_an_epochs_file_with_a_number_past_the_range_is_refused(tmp_path: Path) -> None:
    (tmp_path / FILE).write_bytes(b"0 1\nseen 9223372036854775808\n")
    with pytest.raises(StorageError, match="out of range"):
        Epochs.load(str(tmp_path))


def test_accept_after_a_replica_claimed_the_largest_epoch_is_refused_not_written(start_server) -> None:  # type: ignore[no-untyped-def]
    srv: ServerProcess = start_server()
    conn = srv.connect()
    conn.send(b"REPLICATE 3 0 " + TOP + b" " + TOP + b"\r\n")
    assert conn.line().startswith(b"ERR FENCED ")  # the leader steps down, as it should
    conn.close()
    conn = srv.connect()
    conn.send(b"ACCEPT\r\n")
    reply = conn.line()
    assert reply.startswith(b"ERR DENIED ") and b"largest" in reply, reply  # was OK, writing epoch 2^63
    conn.close()
    assert Epochs.load(str(srv.data_dir)).seen == MAX_EPOCH
    srv.terminate()
    again = start_server(data_dir=srv.data_dir)  # what it wrote, it reads back
    figures = stats(again)
    assert figures["epoch_seen"] == TOP.decode() and figures["role"] == "readonly"


@pytest.mark.parametrize("value", ["\u00b2", "9" * 5000, "-1"], ids=["superscript two", "5000 digits", "signed"])
def test_a_client_takes_cursor_ids_in_range_only(value: str) -> None:
    assert cursors_of([StatsReply({"app": "7"})]) == {"app": 7}
    with pytest.raises(ProtocolError):
        cursors_of([StatsReply({"app": value})])
