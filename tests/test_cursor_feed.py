"""What a COMMIT costs with many cursors (issue 22, finding 9), and the +CURSOR markers a replica gets.

A COMMIT must cost O(1) in the number of cursors: the store keeps its live
size as a counter and the order of its changes, so a replica stream's feed
looks only at what changed since it last looked. Speed is measured in
bench/cursors_bench.py; these tests check what the feed sends.
"""

from __future__ import annotations

from pathlib import Path

from logd.cursor_commands import CursorFeed
from logd.protocol.replica import cursor_marker
from logd.storage.cursors import CursorStore


def test_changed_since_gives_only_the_names_changed_newest_first(tmp_path: Path) -> None:
    store = CursorStore(str(tmp_path))
    for i in range(20_000):
        store.set(f"c{i}", 1)
    mark = store.version
    store.set("c7", 2)
    store.set("new", 1)
    store.set("c7", 3)
    assert store.changed_since(mark) == ["c7", "new"]  # each name once, at its last change
    assert store.changed_since(store.version) == []
    store.close()


def test_a_feed_sends_every_cursor_then_only_what_moved(tmp_path: Path) -> None:
    store = CursorStore(str(tmp_path))
    for i in range(20_000):
        store.set(f"c{i:05d}", 5)
    feed = CursorFeed(store)
    first = feed.markers(10)
    assert first.count(b"+CURSOR ") == 20_000 and cursor_marker("c00042", 5) in first
    assert feed.markers(10) == b""  # nothing moved
    store.set("c00042", 9)
    assert feed.markers(10) == cursor_marker("c00042", 9)
    store.set("c00042", 9)  # the same value again: nothing to tell
    assert feed.markers(10) == b""
    store.close()


def test_a_cursor_past_the_stream_is_held_until_the_stream_carries_its_id(tmp_path: Path) -> None:
    store = CursorStore(str(tmp_path))
    store.set("a", 3)
    store.set("b", 8)
    feed = CursorFeed(store)
    assert feed.markers(5) == cursor_marker("a", 3)  # b is past what the stream sent
    store.set("b", 12)  # moved on while held
    assert feed.markers(9) == b""
    assert feed.markers(12) == cursor_marker("b", 12)
    assert feed.markers(20) == b""  # sent once
    store.set("c", 30)
    assert feed.markers(20) == b""
    store.cut_back(25)  # the log was cut: c comes back to 25, and is due once the stream has 25
    assert feed.markers(24) == b""
    assert feed.markers(25) == cursor_marker("c", 25)
    store.close()
