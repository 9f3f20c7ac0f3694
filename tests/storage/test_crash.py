"""Crash test with real processes: SIGKILL a writer at random moments, recover, check.

The child appends batches with ``fsync="always"`` (append, then sync, as the
server's group commit does) and reports each acknowledged last id on a pipe
only after `sync` returned. Whatever moment the kill lands on, every
acknowledged id must be there after recovery, with its body, ids continuous.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

from logd.storage import Log
from logd.storage.cursors import COMPACT_MIN_BYTES, CursorStore

from .helpers import crash_body, first_id_of, log_files, python_child

CYCLES = 50
# Cursor moves between compactions: each move writes two lines of about 20 bytes.
MOVES_PER_COMPACTION = COMPACT_MIN_BYTES // 40
CURSOR_CYCLES = 12
SEGMENT_BYTES = 16 * 1024

CHILD = r"""
import os, random, sys
from logd.storage import Log
from tests.storage.helpers import crash_body

directory, seed, segment_bytes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
log = Log(directory, fsync="always", segment_bytes=segment_bytes)
os.write(1, b"ready %d\n" % log.head)
while True:
    first = log.written + 1
    n = rng.randint(1, 8)
    log.append([crash_body(i) for i in range(first, first + n)])
    log.sync()
    os.write(1, b"%d\n" % log.head)  # acknowledged: one small write, atomic on a pipe
"""


def assert_records(log: Log, start: int) -> None:
    """Ids start..head are all there, continuous, each with its own body."""
    records = log.read(start, max_count=10**7, max_bytes=1 << 40)
    assert [r.id for r in records] == list(range(start, log.head + 1))
    for r in records:
        assert r.body == crash_body(r.id), r.id


def test_sigkill_never_loses_an_acknowledged_batch(tmp_path: Path) -> None:
    rng = random.Random(20240517)
    acked = 0
    cuts = 0
    for cycle in range(CYCLES):
        child = python_child(CHILD, str(tmp_path), str(cycle), str(SEGMENT_BYTES))
        assert child.stdout is not None and child.stdin is not None
        child.stdin.close()
        try:
            ready = child.stdout.readline()  # waits for the child to hold the log
            assert ready.startswith(b"ready "), ready
            assert int(ready.split()[1]) >= acked
            # Some acknowledgements first (progress that does not hang on the machine's
            # speed), then a random moment inside a later batch.
            early = b"".join(child.stdout.readline() for _ in range(rng.randint(1, 6)))
            time.sleep(rng.uniform(0, 0.02))
            child.send_signal(signal.SIGKILL)
            out = early + child.stdout.read()  # to EOF: the child is dead
        finally:
            child.kill()
            child.wait()
            child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        lines = out.split(b"\n")[:-1]  # the piece after the last newline is never an ack
        if lines:
            last_acked = int(lines[-1])
            assert last_acked > acked
            assert [int(x) for x in lines] == sorted(int(x) for x in lines)
            acked = last_acked
        with Log(str(tmp_path), fsync="always", segment_bytes=SEGMENT_BYTES) as log:
            cuts += log.recovered_bytes_cut > 0
            assert log.first == 1
            assert log.head >= acked, f"cycle {cycle}: acknowledged {acked}, recovered {log.head}"
            # Recovery touches only the newest two segments; the whole log is checked at the end.
            files = log_files(tmp_path)
            start = first_id_of(files[-2]) if len(files) > 1 else 1
            assert_records(log, start)
            acked = log.head  # recovered records are committed now (protocol.md section 2)
    with Log(str(tmp_path)) as log:
        assert log.head == acked
        assert_records(log, 1)
    assert acked > 200  # the children did real work between kills
    assert len(log_files(tmp_path)) > 3  # and rolled segments on the way
    print(f"{CYCLES} kills, {acked} records, {cuts} torn tails cut")


CURSOR_CHILD = r"""
import os, signal, sys
from logd.storage.cursors import CursorStore

store = CursorStore(sys.argv[1])
die_within = int(sys.argv[2])  # a move to kill itself in the middle of (0: none)
i = store.get("busy")
os.write(1, b"ready %d\n" % i)
while True:
    i += 1
    store.set("c%d" % (i % 50), i)  # 50 live cursors: a compaction has lines to copy
    if i == die_within:
        os.kill(os.getpid(), signal.SIGKILL)
    store.set("busy", i)  # last: a recovered "busy" says every move up to it was whole
    store.sync()
    os.write(1, b"%d %d\n" % (i, store.compacting))  # acknowledged, and whether a compaction runs
"""


def check_cursors(directory: Path, acked: int) -> tuple[int, bool]:
    """Reopen the cursors after a kill and check every acknowledged move is kept.

    Each move sets its "c" cursor, then "busy". Lines reach the file in that order and a
    kill keeps a prefix of them, so every move up to the recovered "busy" (which is at
    least the last acknowledged) must be whole. A kill between a move's two lines leaves
    its "c" line without its "busy" one: that move was not acknowledged, and the next
    child, which starts from "busy", makes it again. Returns the recovered "busy" and
    whether the move after it was half made.
    """
    store = CursorStore(str(directory))
    try:
        busy = store.get("busy")
        assert busy >= acked, f"acknowledged {acked}, recovered {busy}"
        for k in range(max(1, busy - 49), busy + 1):
            assert store.get(f"c{k % 50}") >= k, f"c{k % 50} lost its move to {k} (acknowledged {acked})"
        return busy, store.get(f"c{(busy + 1) % 50}") == busy + 1
    finally:
        store.close()


def kill_child(directory: Path, die_within: int, stop: Callable[[bytes], bool]) -> tuple[int, int]:
    """Run the cursor child until ``stop`` is true of an acknowledgement line, then SIGKILL it.

    Returns the last acknowledged move and whether a compaction ran when the kill was
    sent (1 or 0, from the line that stopped it: a loaded machine may print more after).
    """
    child = python_child(CURSOR_CHILD, str(directory), str(die_within))
    assert child.stdout is not None and child.stdin is not None
    child.stdin.close()
    try:
        ready = child.stdout.readline()
        assert ready.startswith(b"ready "), ready
        seen = line = b""
        while True:
            line = child.stdout.readline()
            seen += line
            if not line or stop(line):
                break
        child.send_signal(signal.SIGKILL)
        out = seen + child.stdout.read()
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    lines = out.split(b"\n")[:-1]
    if not lines:
        return int(ready.split()[1]), 0
    last = int(lines[-1].split()[0])
    return last, int((line or lines[-1]).split()[1])


def countdown(n: int, only_compacting: bool = False) -> Callable[[bytes], bool]:
    """A ``stop`` for `kill_child`: true at the n-th acknowledgement (counting from 0), or the
    n-th sent while a compaction ran."""
    left = [n]

    def stop(line: bytes) -> bool:
        if not only_compacting or line.endswith(b" 1\n"):
            left[0] -= 1
        return left[0] < 0

    return stop


def test_a_kill_between_a_moves_two_lines_loses_no_acknowledged_move(tmp_path: Path) -> None:
    # The kill test's false alarm ("c39 lost its move to 35639"): a child killed between the
    # lines of move j (not acknowledged), then a child that starts from the recovered "busy"
    # and acknowledges fewer than 50 moves. Checked against every acknowledged move, the move
    # only the first child tried is no loss; with "busy" set first, as the child did, the
    # check took it for one.
    acked, _ = kill_child(tmp_path, 60, lambda line: int(line.split()[0]) >= 60)  # it kills itself first
    assert acked == 59
    assert check_cursors(tmp_path, acked) == (59, True)  # move 60 set its "c" line only
    acked, _ = kill_child(tmp_path, 0, countdown(5))
    assert acked > 60
    check_cursors(tmp_path, acked)


def test_sigkill_during_cursor_compactions_never_loses_a_synced_cursor(tmp_path: Path) -> None:
    # Compactions come every few hundred moves, on their own thread. Even kills land on a random
    # acknowledgement sent while one ran (so before, during or after its rename), odd kills on a
    # random acknowledgement. Every value a sync acknowledged must be kept.
    rng = random.Random(20261130)
    acked = 0
    during = 0  # kills sent while a compaction ran
    halves = 0  # kills that landed between a move's two lines
    for cycle in range(CURSOR_CYCLES):
        if cycle % 2 == 0:
            stop = countdown(rng.randint(0, 40), only_compacting=True)
        else:
            stop = countdown(rng.randint(0, 2000))
        last, compacting = kill_child(tmp_path, 0, stop)
        assert last >= acked
        acked, during = last, during + compacting
        try:
            _, half = check_cursors(tmp_path, acked)
        except AssertionError as exc:
            raise AssertionError(f"cycle {cycle}: {exc}") from None
        halves += half
    assert acked > 4 * MOVES_PER_COMPACTION  # enough work for several compactions
    assert during > 0
    print(f"{CURSOR_CYCLES} kills, {acked} cursor moves, {during} during a compaction, "
          f"{halves} between a move's two lines")
