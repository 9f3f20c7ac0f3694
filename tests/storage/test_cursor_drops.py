"""Dropping cursors (DROP): the drop line, what a reopen and a compaction keep, the kept drops, and
the ``+DROP`` marker a replica stream carries."""

from __future__ import annotations

from pathlib import Path

import pytest
from crc32c import crc32c

from logd.cursor_commands import CursorFeed
from logd.protocol.replica import CursorCommit, CursorDrop, ReplicaStreamParser, drop_marker
from logd.storage import cursors
from logd.storage.cursors import FILE, CursorStore, decode_file, encode_drop, encode_line


def test_drop_line_format_and_reading_in_order() -> None:
    assert encode_drop("app") == b"app - %08x\n" % crc32c(b"app -")
    data = (encode_line("a", 9) + encode_line("b", 2) + encode_drop("a") + encode_line("a", 3)
            + encode_drop("b") + encode_drop("gone") + encode_drop("a") + encode_line("a", 1))
    # a: made again after each drop, from a lower id; b: dropped; each name dropped once in the list,
    # at its newest drop.
    assert decode_file(data) == ({"a": 1}, ["b", "gone", "a"], 0)
    bad = bytearray(encode_drop("x"))
    bad[0] ^= 1
    assert decode_file(bytes(bad) + encode_drop("y")[:-1]) == ({}, [], 2)  # a bad CRC, a torn tail


def test_drop_removes_a_cursor_for_good_and_frees_its_name(tmp_path: Path) -> None:
    store = CursorStore(str(tmp_path))
    store.set("a", 7)
    store.set("b", 5)
    before = (tmp_path / FILE).read_bytes()
    assert not store.drop("nobody")  # nothing to drop: nothing written
    assert (tmp_path / FILE).read_bytes() == before and store.drops == 0
    version = store.version
    assert store.drop("a")
    assert store.version > version and store.drops == 1
    assert "a" not in store and store.get("a") == 0 and store.items() == {"b": 5} and store.lowest() == 5
    store.close()
    again = CursorStore(str(tmp_path))
    assert again.items() == {"b": 5} and again.bad_lines_skipped == 0
    again.set("a", 2)  # below its old value: a new cursor
    again.close()
    assert CursorStore(str(tmp_path)).items() == {"a": 2, "b": 5}


def test_the_kept_drops_survive_compaction_and_reopen(tmp_path: Path) -> None:
    store = CursorStore(str(tmp_path))
    for name in ("x", "y", "z"):
        store.set(name, 4)
    assert store.drop("x") and store.drop("y")
    store.set("y", 1)  # made again
    store.compact()
    data = (tmp_path / FILE).read_bytes()
    assert data == encode_drop("x") + encode_drop("y") + encode_line("y", 1) + encode_line("z", 4)
    store.close()
    again = CursorStore(str(tmp_path))
    assert again.items() == {"y": 1, "z": 4}
    assert again.dropped_since(0) == ["x", "y"] and again.dropped_since(1) == ["y"] and again.dropped_since(2) == []


def test_only_the_newest_drops_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cursors, "KEPT_DROPS", 3)
    store = CursorStore(str(tmp_path))
    for i in range(6):
        store.set(f"c{i}", i)
        assert store.drop(f"c{i}")
    assert store.drops == 6 and store.dropped_since(0) == ["c3", "c4", "c5"]
    store.compact()
    assert (tmp_path / FILE).read_bytes() == b"".join(encode_drop(f"c{i}") for i in (3, 4, 5))
    store.close()
    assert CursorStore(str(tmp_path)).dropped_since(0) == ["c3", "c4", "c5"]


def test_a_replica_feed_sends_drops_before_values(tmp_path: Path) -> None:
    store = CursorStore(str(tmp_path))
    store.set("kept", 3)
    store.set("gone", 3)
    store.set("again", 9)
    assert store.drop("gone") and store.drop("again")
    store.set("again", 2)
    feed = CursorFeed(store)
    # A new stream: every kept drop (the follower may have missed them), then every value up to its records.
    assert feed.markers(5) == (drop_marker("gone") + drop_marker("again")
                               + b"+CURSOR again 2\r\n+CURSOR kept 3\r\n")
    assert feed.markers(5) == b""  # nothing moved
    assert store.drop("kept")
    assert feed.markers(5) == drop_marker("kept")
    store.set("kept", 8)  # made again, past what the stream has sent: held until it has
    assert feed.markers(5) == b""
    assert feed.markers(8) == b"+CURSOR kept 8\r\n"
    assert store.drop("kept")
    assert feed.markers(8) == drop_marker("kept")


def test_follower_parser_reads_drop_markers() -> None:
    record = b"+1 1 %08x\r\nx\r\n" % crc32c(b"x")
    data = b"OK\r\n" + drop_marker("app.1") + record + drop_marker("b") + b"+CURSOR b 1\r\n"
    for cut in range(1, len(data)):
        p = ReplicaStreamParser(1)
        got = [e for e in p.feed(data[:cut]) + p.feed(data[cut:]) if isinstance(e, CursorDrop | CursorCommit)]
        assert got == [CursorDrop("app.1"), CursorDrop("b"), CursorCommit("b", 1)], cut
    for line in (b"+DROP b@d", b"+DROP ", b"+DROP a b"):
        with pytest.raises(Exception, match="unexpected line"):
            ReplicaStreamParser(1).feed(b"OK\r\n" + line + b"\r\n")


def test_drops_during_a_background_compaction_are_in_the_new_file(tmp_path: Path) -> None:
    from .test_cursor_compaction import Holder

    holder = Holder()
    store = CursorStore(str(tmp_path), compaction_step=holder.step)
    for name in ("a", "b", "c"):
        store.set(name, 1)
    busy = 0
    while not store.compacting:
        busy += 1
        assert busy < 100_000, "no compaction started"
        store.set("busy", busy)
    assert holder.reached() == "copied"  # the snapshot is written: what follows goes in as lines meanwhile
    assert store.drop("a") and store.drop("b")
    store.set("b", 0)
    holder.go_on()
    assert holder.reached() == "copied"  # the drops copied in
    holder.go_on()
    assert holder.reached() == "renamed"  # nothing more came: renamed in
    holder.go_on()
    store.wait_compacted()
    assert store.compaction_error is None
    assert decode_file((tmp_path / FILE).read_bytes()) == ({"b": 0, "busy": busy, "c": 1}, ["a", "b"], 0)
    store.close()
    again = CursorStore(str(tmp_path))
    assert again.items() == {"b": 0, "busy": busy, "c": 1} and again.dropped_since(0) == ["a", "b"]
