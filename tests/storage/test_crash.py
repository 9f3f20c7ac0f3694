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
            time.sleep(rng.uniform(0.005, 0.05))  # the random moment of the crash
            child.send_signal(signal.SIGKILL)
            out = child.stdout.read()  # to EOF: the child is dead
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
import os, sys
from logd.storage.cursors import CursorStore

store = CursorStore(sys.argv[1])
i = store.get("busy")
os.write(1, b"ready %d\n" % i)
while True:
    i += 1
    store.set("busy", i)
    store.set("c%d" % (i % 50), i)  # 50 live cursors: a compaction has lines to copy
    store.sync()
    os.write(1, b"%d %d\n" % (i, store.compacting))  # acknowledged, and whether a compaction runs
"""


def test_sigkill_during_cursor_compactions_never_loses_a_synced_cursor(tmp_path: Path) -> None:
    # Compactions come every few hundred moves: a kill at any moment, before, during or
    # after a compaction's rename, must keep every value a sync acknowledged.
    rng = random.Random(20261130)
    acked = 0
    during = 0  # kills reported while a background compaction ran (none while compaction runs inline)
    for cycle in range(CURSOR_CYCLES):
        child = python_child(CURSOR_CHILD, str(tmp_path))
        assert child.stdout is not None and child.stdin is not None
        child.stdin.close()
        try:
            ready = child.stdout.readline()
            assert ready.startswith(b"ready "), ready
            assert int(ready.split()[1]) >= acked
            # Kill at a random acknowledged line (compactions come every few hundred of them).
            skip = rng.randint(0, 2000)
            seen = b""
            while skip >= 0:
                line = child.stdout.readline()
                assert line, "the child stopped"
                seen += line
                skip -= 1
            child.send_signal(signal.SIGKILL)
            out = seen + child.stdout.read()
        finally:
            child.kill()
            child.wait()
            child.stdout.close()
        lines = out.split(b"\n")[:-1]
        if lines:
            last, compacting = (int(x) for x in lines[-1].split())
            acked, during = last, during + compacting
        store = CursorStore(str(tmp_path))
        try:
            busy = store.get("busy")
            assert busy >= acked, f"cycle {cycle}: acknowledged {acked}, recovered {busy}"
            for k in range(max(1, acked - 49), acked + 1):  # each of the last 50 acknowledged moved one cursor
                assert store.get(f"c{k % 50}") >= k, f"cycle {cycle}: c{k % 50} lost its move to {k}"
        finally:
            store.close()
    assert acked > 4 * MOVES_PER_COMPACTION  # enough work for several compactions
    print(f"{CURSOR_CYCLES} kills, {acked} cursor moves, {during} during a compaction")
