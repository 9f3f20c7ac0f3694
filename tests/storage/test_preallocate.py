"""Zeros written ahead of the active segment's data (fsync=always): recovery, rolls, check."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest

from logd.storage import Log
from logd.storage.check import check_data_dir
from logd.storage.log import PREALLOCATE_BYTES
from logd.storage.record import encode_record
from logd.storage.segment import INDEX_WRITE_ENTRIES

from .helpers import first_id_of, log_files


def body_of(id: int) -> bytes:
    return b"event %d " % id + b"." * (id % 50)


def records_size(first: int, last: int) -> int:
    return sum(len(encode_record(i, body_of(i))) for i in range(first, last + 1))


def fill(log: Log, count: int) -> None:
    for _ in range(count):
        id = log.written + 1
        log.append([body_of(id)])
        log.sync()


def crash_copy(d: Path, tmp_path: Path) -> Path:
    """The files of an open log as a crash would leave them (the copy was never closed)."""
    copy = tmp_path / "crashed"
    shutil.copytree(d, copy)
    return copy


def check(d: Path) -> tuple[int, str]:
    out = io.StringIO()
    return check_data_dir(str(d), out=out), out.getvalue()


def test_zeros_are_kept_ahead_and_cut_at_close(tmp_path: Path) -> None:
    d = tmp_path / "data"
    log = Log(str(d))  # fsync=always: preallocation on by default
    assert log.preallocate
    fill(log, 100)
    path = log_files(d)[-1]
    data = path.read_bytes()
    assert len(data) == records_size(1, 1) + PREALLOCATE_BYTES  # written once, at the first append
    assert data[records_size(1, 100) :] == bytes(len(data) - records_size(1, 100))
    assert [r.id for r in log.read(1, max_count=1000)] == list(range(1, 101))
    log.close()
    assert path.stat().st_size == records_size(1, 100)


def test_zeros_are_topped_up_only_when_a_quarter_is_left(tmp_path: Path) -> None:
    with Log(str(tmp_path)) as log:
        log.append([b"x" * 100])
        path = log_files(tmp_path)[-1]
        size = path.stat().st_size
        for _ in range(PREALLOCATE_BYTES // 900):
            log.append([b"y" * 900])
            if path.stat().st_size == size:
                # Appends inside the zeros leave the file's size alone: that is the point.
                assert size - log.size_bytes >= PREALLOCATE_BYTES // 4
                continue
            assert size - log.size_bytes < PREALLOCATE_BYTES // 4
            assert path.stat().st_size == log.size_bytes + PREALLOCATE_BYTES
            break
        else:
            raise AssertionError("never topped up")


@pytest.mark.parametrize("fsync", ["interval:1000", "never"])
def test_off_unless_every_commit_syncs(tmp_path: Path, fsync: str) -> None:
    with Log(str(tmp_path), fsync=fsync) as log:
        assert not log.preallocate
        fill(log, 10)
        assert log_files(tmp_path)[-1].stat().st_size == records_size(1, 10)


def test_big_batches_grow_the_file_themselves(tmp_path: Path) -> None:
    with Log(str(tmp_path)) as log:
        log.append([b"b" * (PREALLOCATE_BYTES // 4)])
        log.sync()
        assert log_files(tmp_path)[-1].stat().st_size == log.size_bytes


def test_a_rolled_segment_is_exactly_its_records(tmp_path: Path) -> None:
    with Log(str(tmp_path), segment_bytes=4000) as log:
        fill(log, 200)
        files = log_files(tmp_path)
        assert len(files) >= 3
        for path, nxt in zip(files, files[1:], strict=False):
            assert path.stat().st_size == records_size(first_id_of(path), first_id_of(nxt) - 1)
        assert files[-1].stat().st_size > records_size(first_id_of(files[-1]), 200)  # the active one has zeros


def test_crash_with_zeros_ahead_loses_nothing_and_cuts_nothing(tmp_path: Path) -> None:
    with Log(str(tmp_path / "data")) as log:
        fill(log, 50)
        d = crash_copy(tmp_path / "data", tmp_path)
    code, out = check(d)
    assert code == 0, out
    zeros = records_size(1, 1) + PREALLOCATE_BYTES - records_size(1, 50)
    assert f"offset {records_size(1, 50)}: note: {zeros} bytes of zeros written ahead" in out
    assert out.rstrip().endswith("OK")
    with Log(str(d)) as log:
        assert (log.head, log.recovered_bytes_cut) == (50, 0)
        assert log_files(d)[-1].stat().st_size == records_size(1, 50)  # cut at open...
        fill(log, 1)  # ...and written ahead again by the next append
        assert log_files(d)[-1].stat().st_size == records_size(1, 51) + PREALLOCATE_BYTES
        assert [r.body for r in log.read(1, max_count=100)] == [body_of(i) for i in range(1, 52)]


def test_torn_record_followed_by_zeros(tmp_path: Path) -> None:
    with Log(str(tmp_path / "data")) as log:
        fill(log, 20)
        d = crash_copy(tmp_path / "data", tmp_path)
    path = log_files(d)[-1]
    torn = encode_record(21, body_of(21))[:17]  # a write of record 21 cut short by the crash
    with open(path, "r+b") as f:
        f.seek(records_size(1, 20))
        f.write(torn)
    code, out = check(d)
    assert code == 0, out
    assert f"id 21: note: torn tail, a cut-off record of {len(torn)} bytes" in out
    with Log(str(d)) as log:
        assert (log.head, log.recovered_bytes_cut) == (20, len(torn))


def test_garbage_followed_by_zeros_is_a_torn_tail(tmp_path: Path) -> None:
    # No valid record follows the garbage: check and recovery agree it is a torn tail (protocol.md 2).
    with Log(str(tmp_path / "data")) as log:
        fill(log, 20)
        d = crash_copy(tmp_path / "data", tmp_path)
    path = log_files(d)[-1]
    with open(path, "r+b") as f:
        f.seek(records_size(1, 20))
        f.write(b"garbage")
    code, out = check(d)
    assert code == 0
    assert "id 21: note: torn tail, bytes that are not a record" in out
    with Log(str(d)) as log:
        assert (log.head, log.recovered_bytes_cut) == (20, len(b"garbage"))


def test_newest_segment_holding_only_zeros_is_dropped(tmp_path: Path) -> None:
    # A crash after a roll and the zeros of the new segment, before its first record reached disk.
    with Log(str(tmp_path / "data"), segment_bytes=4000) as log:
        fill(log, 100)
        d = crash_copy(tmp_path / "data", tmp_path)
    newest = log_files(d)[-1]
    newest.write_bytes(bytes(PREALLOCATE_BYTES))
    newest.with_suffix(".idx").write_bytes(b"")
    prev_last = first_id_of(newest) - 1
    with Log(str(d), segment_bytes=4000) as log:
        assert log.head == prev_last
        assert log.recovered_bytes_cut == 0
        assert not newest.exists()
        fill(log, 1)
        assert [r.id for r in log.read(1, max_count=1000)] == list(range(1, prev_last + 2))
    assert check(d)[0] == 0


def test_flag_overrides_the_policy(tmp_path: Path) -> None:
    with Log(str(tmp_path / "a"), preallocate=False) as log:
        fill(log, 5)
        assert log_files(tmp_path / "a")[-1].stat().st_size == records_size(1, 5)
    with Log(str(tmp_path / "b"), fsync="interval:1000", preallocate=True) as log:
        fill(log, 5)
        assert log_files(tmp_path / "b")[-1].stat().st_size == records_size(1, 1) + PREALLOCATE_BYTES


def test_sizes_and_streamed_spans_stop_at_the_data(tmp_path: Path) -> None:
    with Log(str(tmp_path)) as log:
        fill(log, 30)
        assert os.path.getsize(log_files(tmp_path)[-1]) > records_size(1, 30)  # the zeros are there
        assert log.size_bytes == records_size(1, 30)
        # What READ and REPLICATE send: whole records, never the zeros after them.
        span = log.span(1, max_bytes=1 << 30)
        assert span is not None and (span.start, span.end, span.last_id) == (0, records_size(1, 30), 30)
    assert os.path.getsize(log_files(tmp_path)[-1]) == records_size(1, 30)


@pytest.mark.parametrize("unsynced_rolls", [1, 2])
def test_zeros_after_closed_segments_are_cut_at_open(tmp_path: Path, unsynced_rolls: int) -> None:
    # A roll cuts the zeros at once, but a power loss before the next sync may
    # bring them back: the newest closed segments are checked at open.
    with Log(str(tmp_path / "data"), segment_bytes=4000) as log:
        fill(log, 200)
    files = log_files(tmp_path / "data")
    sizes = {p: p.stat().st_size for p in files}
    for path in files[-1 - unsynced_rolls : -1]:
        with open(path, "ab") as f:
            f.write(bytes(5000))
    with Log(str(tmp_path / "data"), segment_bytes=4000) as log:
        assert log.head == 200
        assert [r.body for r in log.read(1, max_count=1000)] == [body_of(i) for i in range(1, 201)]
        span = log.span(1, max_bytes=1 << 30)
        assert span is not None
    assert {p: p.stat().st_size for p in files} == sizes
    assert check(tmp_path / "data")[0] == 0


def test_index_is_written_in_runs_and_complete_at_close(tmp_path: Path) -> None:
    d = tmp_path / "data"
    with Log(str(d), fsync="never") as log:
        log.append([b"m"] * (INDEX_WRITE_ENTRIES - 1))
        idx = log_files(d)[-1].with_suffix(".idx")
        assert idx.stat().st_size == 0  # not yet: one write(2) per run, not per batch
        log.append([b"m", b"m"])
        assert idx.stat().st_size == 8 * (INDEX_WRITE_ENTRIES + 1)
        log.append([b"m"] * 10)
        copy = crash_copy(d, tmp_path)
    assert idx.stat().st_size == 8 * (INDEX_WRITE_ENTRIES + 11)
    with Log(str(copy)) as log:  # a crash leaves the index short: recovery scans the rest
        assert log.head == INDEX_WRITE_ENTRIES + 11
        assert log.read(INDEX_WRITE_ENTRIES + 5, max_count=1)[0].id == INDEX_WRITE_ENTRIES + 5
