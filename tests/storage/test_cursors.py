"""The CURSORS file: lines, recovery of a torn tail, compaction, syncing with the log; the +CURSOR marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import structlog.testing
from crc32c import crc32c

from logd.protocol.replica import CursorCommit, ReplicaStreamParser, StreamOk, cursor_marker
from logd.storage import Log
from logd.storage.cursors import COMPACT_MIN_BYTES, FILE, CursorStore, decode_lines, encode_line, valid_name


def test_line_format() -> None:
    # crc32c(b"app 7") in 8 lowercase hex digits.
    assert encode_line("app", 7) == b"app 7 %08x\n" % crc32c(b"app 7")
    assert decode_lines(encode_line("app", 7) + encode_line("b", 2) + encode_line("app", 9)) == (
        {"app": 9, "b": 2}, 0)


@pytest.mark.parametrize("name, ok", [("a", True), ("A.b_c-9", True), ("x" * 64, True), ("x" * 65, False),
                                      ("", False), ("a b", False), ("a/b", False), ("café", False),
                                      ("a\n", False)])
def test_names(name: str, ok: bool) -> None:
    assert valid_name(name) is ok


def test_values_survive_reopen(tmp_path: Path) -> None:
    store = CursorStore(str(tmp_path))
    store.set("a", 5)
    store.set("a", 8)
    store.set("b", 1)
    store.close()
    again = CursorStore(str(tmp_path))
    assert again.items() == {"a": 8, "b": 1}
    assert again.get("zzz") == 0 and again.lowest() == 1
    again.close()


@pytest.mark.parametrize("tail", [b"a 9", b"a 9 0000", b"\0\0\0\0", b"a 9 00000000\n", b"garbage\n"])
def test_torn_or_bad_tail_is_skipped_and_the_file_rewritten(tmp_path: Path, tail: bytes) -> None:
    (tmp_path / FILE).write_bytes(encode_line("a", 3) + encode_line("b", 4) + tail)
    store = CursorStore(str(tmp_path))
    assert store.items() == {"a": 3, "b": 4}
    assert store.bad_lines_skipped == 1
    assert (tmp_path / FILE).read_bytes() == encode_line("a", 3) + encode_line("b", 4)
    store.set("a", 10)  # appends after the rewrite go to the new file
    store.close()
    assert CursorStore(str(tmp_path)).items() == {"a": 10, "b": 4}


def test_flipped_byte_in_the_middle_loses_only_that_line(tmp_path: Path) -> None:
    data = bytearray(encode_line("a", 3) + encode_line("a", 5) + encode_line("b", 4))
    data[len(encode_line("a", 3)) + 2] ^= 0x01  # "a 5" -> "a 4": the CRC no longer matches
    (tmp_path / FILE).write_bytes(bytes(data))
    store = CursorStore(str(tmp_path))
    assert store.items() == {"a": 3, "b": 4}


def test_compaction_bounds_the_file(tmp_path: Path) -> None:
    store = CursorStore(str(tmp_path))
    for i in range(1, 20_000):
        store.set("busy", i)
    store.wait_compacted()  # compaction runs on a thread of its own
    store.set("idle", 1)  # compacts again if the lines written during the last one made the file too big
    store.wait_compacted()
    assert os.path.getsize(tmp_path / FILE) <= COMPACT_MIN_BYTES + 64
    store.close()
    assert CursorStore(str(tmp_path)).items() == {"busy": 19_999, "idle": 1}
    assert not (tmp_path / (FILE + ".tmp")).exists()


def test_log_sync_syncs_the_cursor_file(tmp_path: Path) -> None:
    log = Log(str(tmp_path), fsync="always")
    store = CursorStore(str(tmp_path))
    log.attach(store)
    assert not log.needs_sync
    store.set("a", 0)
    assert store.dirty and log.needs_sync  # a cursor write alone makes the log want a sync
    log.sync()
    assert not store.dirty and not log.needs_sync
    log.close()
    store.close()


def test_never_policy_leaves_cursors_to_the_os(tmp_path: Path) -> None:
    log = Log(str(tmp_path), fsync="never")
    store = CursorStore(str(tmp_path))
    log.attach(store)
    store.set("a", 0)
    assert not log.needs_sync
    log.close()
    store.close()


def test_follower_parser_reads_cursor_markers() -> None:
    parser = ReplicaStreamParser(1)
    events = parser.feed(b"OK\r\n+HEAD 0 0\r\n" + cursor_marker("app.1", 0))
    assert events[0] == StreamOk() and events[-1] == CursorCommit("app.1", 0)
    # Split at every byte, after a record.
    record = b"+1 1 %08x\r\nx\r\n" % crc32c(b"x")
    data = b"OK\r\n" + record + cursor_marker("c", 1)
    for cut in range(1, len(data)):
        p = ReplicaStreamParser(1)
        got = p.feed(data[:cut]) + p.feed(data[cut:])
        assert got[-1] == CursorCommit("c", 1), cut
    with pytest.raises(Exception, match="unexpected line"):
        ReplicaStreamParser(1).feed(b"OK\r\n+CURSOR b@d 1\r\n")


def test_a_failed_compaction_is_logged_and_loses_nothing(tmp_path: Path) -> None:
    store = CursorStore(str(tmp_path))
    (tmp_path / (FILE + ".tmp")).mkdir()  # the compacted file cannot be created: EISDIR
    with structlog.testing.capture_logs() as logs:
        i = 0
        while store.compaction_error is None:
            i += 1
            assert i < 100_000, "no compaction failed"
            store.set("busy", i)
            store.wait_compacted()
        size = os.path.getsize(tmp_path / FILE)
        while os.path.getsize(tmp_path / FILE) < 1.9 * size:  # the fault lasts: no retry per COMMIT
            i += 1
            store.set("busy", i)
            store.wait_compacted()
    assert isinstance(store.compaction_error, OSError)
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["cursor_compaction_failed"]
    store.set("after", 1)
    store.close()
    assert CursorStore(str(tmp_path)).items() == {"after": 1, "busy": i}
