"""The segmented log: ids, reads, rolling, retention, the commit point, the lock, I/O errors."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from logd.errors import CorruptRecordError, LockedError, NotFoundError, UnavailableError
from logd.storage import FsyncPolicy, Log
from logd.storage.files import segment_name
from logd.storage.record import encode_batch, encode_record

from .helpers import first_id_of, flip_bit, layout, log_files, python_child


def body_of(id: int) -> bytes:
    return b"m%d-" % id + b"x" * (id * 13 % 50)


def fill(log: Log, count: int, per_batch: int = 3) -> None:
    """Append ids head+1 .. head+count with `body_of` bodies."""
    end = log.written + count
    while log.written < end:
        first = log.written + 1
        bodies = [body_of(i) for i in range(first, min(first + per_batch, end + 1))]
        assert log.append(bodies) == first + len(bodies) - 1


def test_append_read_head_first(tmp_path: Path) -> None:
    with Log(str(tmp_path), fsync="never") as log:
        assert (log.head, log.first, log.written) == (0, 1, 0)
        assert log.read(1) == []
        assert log.span(1) is None
        assert log.append([b"a", b"b"]) == 2
        assert log.append([b"c\r\n\x00"]) == 3
        assert (log.head, log.first, log.written) == (3, 1, 3)
        records = log.read(1)
        assert [(r.id, r.body) for r in records] == [(1, b"a"), (2, b"b"), (3, b"c\r\n\x00")]
        assert records[2].crc == log.crc_of(3)
        assert [r.id for r in log.read(2, max_count=1)] == [2]
        assert log.read(4) == []
        with pytest.raises(ValueError):
            log.read(0)
        with pytest.raises(ValueError):
            log.append([])
    with Log(str(tmp_path)) as log:  # reopen: the same records
        assert log.head == 3
        assert [r.body for r in log.read(1)] == [b"a", b"b", b"c\r\n\x00"]


def test_read_limits_across_segments(tmp_path: Path) -> None:
    with Log(str(tmp_path), fsync="never", segment_bytes=300) as log:
        fill(log, 40)
        assert log.segment_count > 3
        assert [r.id for r in log.read(1, max_count=1000)] == list(range(1, 41))
        assert [r.id for r in log.read(5, max_count=20)] == list(range(5, 25))
        assert all(r.body == body_of(r.id) for r in log.read(1, max_count=1000))
        # max_bytes: whole records only, but always at least one.
        assert [r.id for r in log.read(7, max_bytes=1)] == [7]
        size = len(encode_record(7, body_of(7))) + len(encode_record(8, body_of(8)))
        assert [r.id for r in log.read(7, max_bytes=size)] == [7, 8]
        assert [r.id for r in log.read(7, max_bytes=size - 1)] == [7]


def test_span_and_offset_of(tmp_path: Path) -> None:
    with Log(str(tmp_path), fsync="never", segment_bytes=400) as log:
        fill(log, 30)
        files = log_files(tmp_path)
        first_of_second = first_id_of(files[1])
        bodies = [body_of(i) for i in range(1, first_of_second)]
        recs = layout(1, bodies)
        span = log.span(2)
        assert span is not None
        assert (span.first_id, span.last_id, span.path) == (2, first_of_second - 1, str(files[0]))
        assert (span.start, span.end) == (recs[1][0], recs[-1][1])
        data = os.pread(span.handle.fd, span.end - span.start, span.start)
        assert data == b"".join(encode_record(i, body_of(i)) for i in range(2, first_of_second))
        span = log.span(2, max_count=3)
        assert span is not None and (span.first_id, span.last_id, span.end) == (2, 4, recs[3][1])
        span = log.span(2, max_bytes=recs[3][1] - recs[1][0])  # exactly records 2..4
        assert span is not None and (span.last_id, span.end) == (4, recs[3][1])
        span = log.span(2, max_bytes=recs[3][1] - recs[1][0] - 1)
        assert span is not None and span.last_id == 3
        span = log.span(2, max_bytes=1)
        assert span is not None and span.last_id == 2  # at least one record
        assert log.span(31) is None
        for id in range(1, first_of_second):
            assert log.offset_of(id) == (str(files[0]), recs[id - 1][0])
        assert log.offset_of(first_of_second) == (str(files[1]), 0)
        with pytest.raises(NotFoundError):
            log.offset_of(31)


def test_roll_at_segment_bytes(tmp_path: Path) -> None:
    segment_bytes = 1000
    batches: list[tuple[int, int]] = []
    with Log(str(tmp_path), fsync="never", segment_bytes=segment_bytes) as log:
        for n in range(1, 60):
            first = log.written + 1
            last = log.append([body_of(i) for i in range(first, first + n % 7 + 1)])
            batches.append((first, last))
        big_first = log.written + 1
        big = log.append([b"B" * 1500])  # larger than a segment: alone in a fresh one
        for first, last in batches:  # a batch is never split
            assert log.offset_of(first)[0] == log.offset_of(last)[0]
        assert log.offset_of(big)[1] == 0
        assert log.append([b"after"]) == big + 1
        assert log.offset_of(big + 1) == (str(tmp_path / (segment_name(big + 1) + ".log")), 0)
    files = log_files(tmp_path)
    assert len(files) > 5
    for path in files:
        size = path.stat().st_size
        assert 0 < size
        if first_id_of(path) != big_first:
            assert size <= segment_bytes
    assert files[0].name == segment_name(1) + ".log"
    assert any(first_id_of(p) == big_first for p in files)


def test_append_encoded(tmp_path: Path) -> None:
    with Log(str(tmp_path), fsync="never") as log:
        log.append([b"one"])
        data, offsets = encode_batch(2, [b"two", b"three"], 0)
        assert log.append_encoded(data, offsets, 2) == 3
        assert [r.body for r in log.read(1)] == [b"one", b"two", b"three"]
        assert log.append([b"four"]) == 4


def segment_sizes(directory: Path) -> list[tuple[int, int]]:
    return [(first_id_of(p), p.stat().st_size) for p in log_files(directory)]


def test_retention_by_bytes(tmp_path: Path) -> None:
    with Log(str(tmp_path), fsync="never", segment_bytes=500) as log:
        fill(log, 100)
        log.sync()
        assert log.apply_retention() == []  # no limits set
        sizes = segment_sizes(tmp_path)
        assert len(sizes) > 6
        limit = sum(size for _f, size in sizes[3:])  # exactly the newest segments from the 4th
        log.retention_bytes = limit
        assert log.apply_retention() == [first for first, _size in sizes[:3]]
        assert log.first == sizes[3][0]
        assert log.size_bytes == limit
        assert [first_id_of(p) for p in log_files(tmp_path)] == [f for f, _s in sizes[3:]]
        assert not (tmp_path / (segment_name(1) + ".idx")).exists()
        for call in (lambda: log.read(log.first - 1), lambda: log.span(1), lambda: log.offset_of(1)):
            with pytest.raises(NotFoundError):
                call()
        assert log.read(log.first, max_count=1)[0].body == body_of(log.first)
        assert log.head == 100
        log.retention_bytes = 0  # everything but the active segment goes
        log.apply_retention()
        assert log.segment_count == 1
        assert log.first == sizes[-1][0]
        assert log.read(log.first)[-1].id == 100
        fill(log, 1)
    with Log(str(tmp_path)) as log:  # reopen: first is the oldest remaining segment
        assert (log.first, log.head) == (sizes[-1][0], 101)
        with pytest.raises(NotFoundError):
            log.read(1)


def test_retention_keeps_the_active_segment_and_the_newest_bytes(tmp_path: Path) -> None:
    with Log(str(tmp_path), fsync="never", segment_bytes=500, retention_bytes=1200) as log:
        for _ in range(10):
            fill(log, 10)
            log.sync()
            before = dict(segment_sizes(tmp_path))
            deleted = log.apply_retention()
            sizes = segment_sizes(tmp_path)
            total = sum(s for _f, s in sizes)
            assert total <= 1200 or len(sizes) == 1
            if deleted:  # oldest first, and no more than needed
                assert deleted == sorted(before)[: len(deleted)]
                assert total + before[deleted[-1]] > 1200
            assert log.first == sizes[0][0]
        assert log.head == 100


def test_retention_by_age(tmp_path: Path) -> None:
    now = time.time()
    with Log(str(tmp_path), fsync="never", segment_bytes=300, retention_ms=60_000) as log:
        fill(log, 30)
        log.sync()
        files = log_files(tmp_path)
        assert len(files) >= 4
        assert log.apply_retention(now=now) == []  # all fresh
        for path in files:  # everything is old, the active segment too
            os.utime(path, (now - 120, now - 120))
        os.utime(files[2], (now - 30, now - 30))  # ... but the third is younger than 60 s
        assert log.apply_retention(now=now) == [first_id_of(files[0]), first_id_of(files[1])]
        assert log.first == first_id_of(files[2])
        assert log.apply_retention(now=now + 31) == [first_id_of(p) for p in files[2:-1]]
        assert log.apply_retention(now=now + 10**6) == []  # the active segment is never deleted
        assert [p.name for p in log_files(tmp_path)] == [files[-1].name]
        assert log.read(log.first)[-1].id == 30


def test_lock_refused_with_the_holders_pid(tmp_path: Path) -> None:
    code = "\n".join(
        [
            "import sys",
            "from logd.storage import Log",
            "log = Log(sys.argv[1])",
            "print('ready', flush=True)",
            "sys.stdin.read()  # hold the lock until the parent closes our stdin",
            "log.close()",
        ]
    )
    child = python_child(code, str(tmp_path))
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == b"ready\n"
        with pytest.raises(LockedError) as info:
            Log(str(tmp_path))
        assert info.value.pid == child.pid
        assert f"pid {child.pid}" in str(info.value)
        child.stdin.close()
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    with Log(str(tmp_path)) as log:  # the lock died with its holder; now we hold it
        assert (tmp_path / "LOCK").read_text() == f"{os.getpid()}\n"
        with pytest.raises(LockedError):  # flock is per open file: a second open in-process is refused too
            Log(str(tmp_path))
        assert log.head == 0


@pytest.mark.parametrize("where", ["id digit", "length digit", "crc digit", "body", "trailer", "plus"])
def test_flipped_bit_in_a_closed_segment(tmp_path: Path, where: str) -> None:
    d = tmp_path / "d"
    with Log(str(d), fsync="never", segment_bytes=400) as log:
        fill(log, 30)
        bad = first_id_of(log_files(d)[1]) + 2
        path, offset = log.offset_of(bad)
    record = encode_record(bad, body_of(bad))
    header_end = record.index(b"\n") + 1
    pos = {
        "plus": 0,
        "id digit": 1,
        "length digit": len(str(bad)) + 2,
        "crc digit": header_end - 4,
        "body": header_end + 2,
        "trailer": len(record) - 1,
    }[where]
    flip_bit(path, offset + pos, bit=1)
    with Log(str(d), fsync="never") as log:  # closed segments are not scanned at open
        assert log.head == 30
        for start, count in ((bad, 1), (1, 1000), (bad - 1, 5)):
            with pytest.raises(CorruptRecordError) as info:
                log.read(start, max_count=count)
            exc = info.value
            assert (exc.where, exc.offset, exc.id) == (path, offset, bad)
            assert path in str(exc) and f"offset {offset}" in str(exc) and f"id {bad}" in str(exc)
        with pytest.raises(CorruptRecordError):
            log.crc_of(bad)
        assert [r.id for r in log.read(1, max_count=bad - 1)] == list(range(1, bad))
        assert [r.id for r in log.read(bad + 1, max_count=1000)] == list(range(bad + 1, 31))


def test_fsync_always_commit_point_moves_only_at_sync(tmp_path: Path) -> None:
    with Log(str(tmp_path), fsync="always", segment_bytes=200) as log:
        assert not log.needs_sync
        assert log.append([b"a", b"b"]) == 2
        assert (log.head, log.written, log.needs_sync) == (0, 2, True)
        assert log.read(1) == [] and log.span(1) is None
        assert log.append([b"c"]) == 3
        assert log.sync() == 3
        assert (log.head, log.needs_sync) == (3, False)
        assert [r.id for r in log.read(1)] == [1, 2, 3]
        fill(log, 20)  # rolls, none of it visible yet
        assert log.segment_count > 1
        assert log.head == 3 and log.read(4) == []
        assert log.sync() == 23
        assert [r.id for r in log.read(1, max_count=100)] == list(range(1, 24))
        assert log.sync() == 23  # nothing new: the same commit point


@pytest.mark.parametrize("policy", ["never", "interval:50"])
def test_fsync_never_and_interval_commit_at_append(tmp_path: Path, policy: str) -> None:
    with Log(str(tmp_path), fsync=policy, segment_bytes=100) as log:
        assert str(log.policy) == policy
        assert not log.needs_sync
        assert log.append([b"a", b"b"]) == 2
        assert (log.head, log.written) == (2, 2)
        assert [r.body for r in log.read(1)] == [b"a", b"b"]
        # The interval syncer must find work after an append; under never only a roll makes work.
        assert log.needs_sync == (policy != "never")
        assert log.sync() == 2
        assert not log.needs_sync
        log.append([b"c" * 90])  # rolls
        assert log.segment_count == 2 and log.needs_sync
        assert log.sync() == 3
        assert not log.needs_sync


def test_fsync_policy_parse() -> None:
    assert FsyncPolicy.parse(" Always ") == FsyncPolicy("always")
    assert FsyncPolicy.parse("interval:250") == FsyncPolicy("interval", 250)
    assert str(FsyncPolicy.parse("never")) == "never"
    for bad in ("sometimes", "interval:", "interval:0", "interval:-5", "interval:x"):
        with pytest.raises(ValueError):
            FsyncPolicy.parse(bad)
    with pytest.raises(ValueError):
        Log("/nonexistent-never-created", segment_bytes=0)


DISK_FULL_CHILD = r"""
import json, os, resource, signal, sys
from logd.errors import UnavailableError
from logd.storage import Log
from logd.storage.files import nonzero_end

directory, limit, preallocate = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-big write fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
log = Log(directory, fsync="always", segment_bytes=1 << 30, preallocate=preallocate)
seg = os.path.join(directory, "00000000000000000001.log")
batch = [bytes([65 + k]) * 1000 for k in range(5)]
acked = []

def data_size():  # the file may end with zeros written ahead (preallocate)
    fd = os.open(seg, os.O_RDONLY)
    try:
        return nonzero_end(fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)

while True:
    before, size = log.head, data_size()
    try:
        log.append(batch)
    except UnavailableError as exc:
        error = str(exc)
        break
    acked.append(log.sync())
assert (log.head, log.written) == (before, before), "the failed batch moved the head"
assert data_size() == size, "the partial write was not undone"
idx_size = os.path.getsize(seg[:-4] + ".idx")  # written in runs, so it may lag
assert idx_size % 8 == 0 and idx_size <= 8 * before
assert log.failed is None
log.append([b"s" * 100])  # a small batch still fits under the limit
acked.append(log.sync())
try:
    log.append(batch)
except UnavailableError:
    pass
else:
    raise AssertionError("a batch past the limit was accepted")
assert log.head == acked[-1]
records = log.read(1, max_count=10**6)
assert [r.id for r in records] == list(range(1, log.head + 1))
log.close()
print(json.dumps({"acked": acked, "error": error}))
"""


@pytest.mark.parametrize("preallocate", [False, True])
def test_disk_full_on_append(tmp_path: Path, preallocate: bool) -> None:
    # With preallocation the zeros written ahead hit the limit first: that must
    # cost nothing, and the data still fills the space up to the limit.
    limit = 64 * 1024
    child = python_child(DISK_FULL_CHILD, str(tmp_path), str(limit), str(int(preallocate)), stderr=subprocess.PIPE)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err.decode()
    report = json.loads(out)
    acked = report["acked"]
    assert "write failed" in report["error"]
    assert len(acked) == 13 and acked[-2] == 60 and acked[-1] == 61  # 12 batches of 5, then the small one
    assert os.path.getsize(log_files(tmp_path)[0]) <= limit
    with Log(str(tmp_path)) as log:  # only complete batches survive
        assert log.head == 61 and log.recovered_bytes_cut == 0
        records = log.read(1, max_count=100)
        assert [r.body for r in records[:60]] == [bytes([65 + k]) * 1000 for k in range(5)] * 12
        assert records[60].body == b"s" * 100
        assert log.append([b"more"]) == 62  # no limit here


def test_failed_undo_fails_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A write fails half-way and so does the truncate that should undo it: the
    # log must refuse every later write rather than append after the debris.
    log = Log(str(tmp_path), fsync="always")
    log.append([b"good"])
    log.sync()
    real_write = os.write

    def half_write(fd: int, data: bytes) -> int:
        if len(data) > 100:
            real_write(fd, bytes(data[:50]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    def no_truncate(fd: int, length: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "write", half_write)
    monkeypatch.setattr(os, "ftruncate", no_truncate)
    with pytest.raises(UnavailableError):
        log.append([b"x" * 500])
    monkeypatch.undo()
    assert log.failed is not None
    with pytest.raises(UnavailableError):
        log.append([b"small"])
    with pytest.raises(UnavailableError):
        log.sync()
    assert log.head == 1
    log.close()
    with Log(str(tmp_path)) as log:  # recovery cuts the debris
        assert log.head == 1 and log.recovered_bytes_cut == 50
        assert log.read(1)[0].body == b"good"


def test_failed_roll_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Log(str(tmp_path), fsync="never", segment_bytes=100) as log:
        log.append([b"a" * 80])
        real_open = os.open

        def no_files(path: str, flags: int, mode: int = 0o777) -> int:
            if str(path).endswith(".log"):
                raise OSError(errno.EMFILE, "Too many open files")
            return real_open(path, flags, mode)

        monkeypatch.setattr(os, "open", no_files)
        with pytest.raises(UnavailableError):
            log.append([b"b" * 80])
        monkeypatch.undo()
        assert (log.head, log.failed) == (1, None)
        assert log.append([b"b" * 80]) == 2  # the next attempt rolls
        assert log.segment_count == 2


def test_close_is_idempotent_and_releases_the_lock(tmp_path: Path) -> None:
    log = Log(str(tmp_path), fsync="always")
    log.append([b"a"])
    log.close()  # syncs what was written
    log.close()
    with Log(str(tmp_path)) as again:
        assert again.head == 1


def test_copy_of_a_log_is_a_log(tmp_path: Path) -> None:
    with Log(str(tmp_path / "a"), fsync="never", segment_bytes=300) as log:
        fill(log, 25)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    with Log(str(tmp_path / "b")) as log:
        assert log.head == 25
        assert [r.body for r in log.read(1, max_count=100)] == [body_of(i) for i in range(1, 26)]
