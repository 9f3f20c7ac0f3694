"""The CURSORS compaction on its own thread, held at each of its steps while `set` and `sync` go on.

A `Holder` is the store's ``compaction_step``: the compaction stops at each
step until the test lets it go on, so every interleaving below is reached
on purpose, not by luck. Two crash models are checked. After a kill -9 the
page cache survives, so what counts is what the file *named* ``CURSORS``
holds: every value `set` returned for must be there at every step. After a
power cut only synced data survives, so a `sync` must have fsynced the file
holding each line, and the directory after a rename, before it returns.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

import pytest

from logd.storage import cursors as cursors_module
from logd.storage.cursors import FILE, CursorStore, decode_lines

WAIT = 10.0  # seconds: a deadline for the other thread, never a pause


class Holder:
    """A ``compaction_step`` that stops the compaction at each step until `go_on`."""

    def __init__(self) -> None:
        self._reached: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._go = threading.Semaphore(0)

    def step(self, name: str) -> None:
        self._reached.put(name)
        if not self._go.acquire(timeout=WAIT):
            raise AssertionError(f"the test never let the compaction go on from {name!r}")

    def reached(self) -> str:
        """The next step the compaction has stopped at."""
        return self._reached.get(timeout=WAIT)

    def go_on(self) -> None:
        self._go.release()


class Moves:
    """`set` calls on a store, with what they set: the model the file must hold."""

    def __init__(self, store: CursorStore, directory: Path) -> None:
        self.store = store
        self.path = directory / FILE
        self.want: dict[str, int] = {}
        self.busy = 0

    def set(self, name: str, id: int) -> None:
        self.store.set(name, id)
        self.want[name] = id

    def until_compacting(self) -> None:
        """Move "busy" until a compaction starts (the set that starts it returns while it runs)."""
        start = self.busy
        while not self.store.compacting:
            self.busy += 1
            assert self.busy - start < 100_000, "no compaction started"
            self.set("busy", self.busy)

    def assert_named_file_holds_every_move(self) -> None:
        """What a kill -9 now would leave: the file named CURSORS, read as a restart would."""
        cursors, bad = decode_lines(self.path.read_bytes())
        assert bad == 0
        assert cursors == self.want


def test_a_kill_at_any_compaction_step_keeps_every_move(tmp_path: Path) -> None:
    # Lines set after the snapshot is written, between the copies of lines set meanwhile, and
    # after the rename (the old descriptor not yet closed, the directory not yet fsynced).
    holder = Holder()
    moves = Moves(CursorStore(str(tmp_path), compaction_step=holder.step), tmp_path)
    moves.until_compacting()
    old_inode = moves.path.stat().st_ino
    plan = [
        ("copied", [("a", 1)]),  # the snapshot is in the new file, fsynced
        ("copied", [("b", 1), ("a", 2)]),  # "a" copied in
        ("copied", []),  # "b" and "a" again copied in: nothing more came, so it renames next
        ("renamed", [("c", 1)]),  # "c" goes to the new file
    ]
    for expected, lines in plan:
        step = holder.reached()
        moves.assert_named_file_holds_every_move()
        for name, id in lines:
            moves.set(name, id)
            moves.assert_named_file_holds_every_move()
        assert step == expected
        holder.go_on()
    assert moves.path.stat().st_ino != old_inode
    moves.store.wait_compacted()
    assert moves.store.compaction_error is None
    moves.set("d", 1)
    moves.assert_named_file_holds_every_move()
    moves.store.close()
    assert CursorStore(str(tmp_path)).items() == dict(sorted(moves.want.items()))


def test_compaction_runs_beside_set_and_keeps_every_line(tmp_path: Path) -> None:
    # Review finding: compaction fsynced on the caller's thread (the server's event loop).
    holder = Holder()
    moves = Moves(CursorStore(str(tmp_path), compaction_step=holder.step), tmp_path)
    moves.until_compacting()
    assert holder.reached() == "copied"
    for i in range(moves.busy + 1, moves.busy + 5001):  # all written while the compaction runs
        moves.set("busy", i)
        moves.set(f"c{i % 50}", i)
    holder.go_on()
    while (step := holder.reached()) == "copied":  # then copied to the new file before its rename
        holder.go_on()
    assert step == "renamed"
    holder.go_on()
    moves.store.wait_compacted()
    assert moves.store.compaction_error is None and not moves.store.compacting
    assert moves.store.items() == dict(sorted(moves.want.items()))
    moves.assert_named_file_holds_every_move()
    moves.store.close()
    again = CursorStore(str(tmp_path))
    assert again.items() == dict(sorted(moves.want.items())) and again.bad_lines_skipped == 0
    again.close()
    assert not (tmp_path / (FILE + ".tmp")).exists()


class Hold:
    """One held directory fsync: `holding` is set once it waits, `release` lets it go on."""

    def __init__(self) -> None:
        self.holding = threading.Event()
        self.release = threading.Event()


class SyncSpy:
    """Records the inode each fdatasync and fsync hit, and which threads fsynced the directory.

    Calls the real functions: only `hold` makes a thread's next directory fsync wait.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.synced_inodes: list[int] = []
        self.dir_synced_by: list[str] = []
        self._holds: dict[str, Hold] = {}
        real_fdatasync, real_fsync, real_fsync_dir = os.fdatasync, os.fsync, cursors_module.fsync_dir

        def fdatasync(fd: int) -> None:
            self.synced_inodes.append(os.fstat(fd).st_ino)
            real_fdatasync(fd)

        def fsync(fd: int) -> None:
            self.synced_inodes.append(os.fstat(fd).st_ino)
            real_fsync(fd)

        def fsync_dir(directory: str) -> None:
            name = threading.current_thread().name
            self.dir_synced_by.append(name)
            hold = self._holds.pop(name, None)
            if hold is not None:
                hold.holding.set()
                assert hold.release.wait(WAIT)
            real_fsync_dir(directory)

        monkeypatch.setattr(cursors_module.os, "fdatasync", fdatasync)
        monkeypatch.setattr(cursors_module.os, "fsync", fsync)
        monkeypatch.setattr(cursors_module, "fsync_dir", fsync_dir)

    def hold(self, thread_name: str) -> Hold:
        """Hold the next directory fsync made by the thread of that name."""
        hold = self._holds[thread_name] = Hold()
        return hold


def test_a_sync_after_the_rename_fsyncs_the_directory_before_it_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A line set after the rename, synced while the compaction has not fsynced the directory yet:
    # acknowledged, it must not hang on a rename a power cut could undo.
    spy = SyncSpy(monkeypatch)
    holder = Holder()
    moves = Moves(CursorStore(str(tmp_path), compaction_step=holder.step), tmp_path)
    moves.until_compacting()
    while (step := holder.reached()) == "copied":
        holder.go_on()
    assert step == "renamed" and spy.dir_synced_by == []  # held before its directory fsync
    moves.set("after", 1)
    new_inode = moves.path.stat().st_ino
    spy.synced_inodes.clear()
    moves.store.sync()  # the sync of the COMMIT's round, on this thread
    assert spy.dir_synced_by == [threading.current_thread().name]
    assert new_inode in spy.synced_inodes
    holder.go_on()
    moves.store.close()


def test_a_line_written_after_a_swap_is_synced_even_if_a_sync_was_under_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding: `sync` read the file, then cleared the dirty flag. A compaction swapping
    the file in between and a line written to the new file left that line unsynced for good
    (the flag cleared by a sync of the old file), while its COMMIT was answered OK."""
    spy = SyncSpy(monkeypatch)
    holder = Holder()
    moves = Moves(CursorStore(str(tmp_path), compaction_step=holder.step), tmp_path)
    first = spy.hold("logd-cursors")  # the first compaction, its rename not yet durable
    moves.until_compacting()
    while holder.reached() == "copied":
        holder.go_on()
    holder.go_on()  # from "renamed" to its directory fsync
    assert first.holding.wait(WAIT)
    racing = spy.hold("racing-sync")
    racer = threading.Thread(target=moves.store.sync, name="racing-sync")
    racer.start()  # sees the rename not durable: fsyncs the directory too, the file already read
    assert racing.holding.wait(WAIT)
    first.release.set()
    moves.store.wait_compacted()
    moves.until_compacting()  # a second compaction renames its file in while that sync is held
    while (step := holder.reached()) == "copied":
        holder.go_on()
    assert step == "renamed"
    moves.set("last", 1)  # a COMMIT line, in the newest file
    newest = moves.path.stat().st_ino
    racing.release.set()
    racer.join(WAIT)
    assert not racer.is_alive()
    holder.go_on()
    moves.store.wait_compacted()
    spy.synced_inodes.clear()
    moves.store.sync()  # the sync of the COMMIT's round
    assert newest in spy.synced_inodes, "the file holding the last line was never synced"
    moves.store.close()
