"""Segments and their index: recovery of the active segment, index rebuilds (protocol.md section 2)."""

from __future__ import annotations

import os
import shutil
from array import array
from pathlib import Path

import pytest

from logd.errors import CorruptRecordError, DamagedLogError
from logd.storage import Log
from logd.storage.files import segment_name
from logd.storage.record import encode_batch
from logd.storage.recovery import recover_active
from logd.storage.segment import Segment

from .helpers import first_id_of, forget_clean_close, layout, log_files, open_fds_under, read_index

SEGMENT_BYTES = 400


def body_of(id: int) -> bytes:
    return b"%d:" % id + bytes([id % 251]) * (15 + id * 7 % 40) + b"\r\n"


def make_log(directory: Path, count: int) -> None:
    with Log(str(directory), fsync="never", segment_bytes=SEGMENT_BYTES) as log:
        for id in range(1, count + 1):
            assert log.append([body_of(id)]) == id


def assert_log(directory: Path, head: int) -> None:
    """The log holds exactly ids 1..head with the right bodies, and every index matches its data."""
    with Log(str(directory), fsync="never", segment_bytes=SEGMENT_BYTES) as log:
        assert (log.first, log.head, log.written) == (1, head, head)
        records = log.read(1, max_count=10**6) if head else []
        assert [r.id for r in records] == list(range(1, head + 1))
        assert all(r.body == body_of(r.id) for r in records)
    files = log_files(directory)
    for k, path in enumerate(files):
        first = first_id_of(path)
        last = first_id_of(files[k + 1]) - 1 if k + 1 < len(files) else head
        bodies = [body_of(i) for i in range(first, last + 1)]
        assert read_index(path.with_suffix(".idx")) == [off for off, _end in layout(first, bodies)]
        assert path.with_suffix(".idx").stat().st_size == 8 * len(bodies)
        assert path.stat().st_size == (layout(first, bodies)[-1][1] if bodies else 0)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log of 3+ segments; the active one holds several records."""
    d = tmp_path_factory.mktemp("template")
    make_log(d, 30)
    files = log_files(d)
    assert len(files) >= 3
    assert 30 - first_id_of(files[-1]) + 1 >= 4
    return d


def copy_of(template: Path, tmp_path: Path, name: str = "data") -> Path:
    d = tmp_path / name
    shutil.copytree(template, d)
    forget_clean_close(d)  # these tests cut files as a crash would
    return d


def active_layout(d: Path, head: int) -> tuple[Path, int, list[tuple[int, int]]]:
    path = log_files(d)[-1]
    first = first_id_of(path)
    return path, first, layout(first, [body_of(i) for i in range(first, head + 1)])


def test_fresh_dir_gets_segment_one(tmp_path: Path) -> None:
    with Log(str(tmp_path / "d")) as log:
        assert (log.first, log.head, log.segment_count) == (1, 0, 1)
    assert sorted(os.listdir(tmp_path / "d")) == [
        "00000000000000000001.idx",
        "00000000000000000001.log",
        "CLOSED_HEAD",
        "LOCK",
    ]
    with Log(str(tmp_path / "d")) as log:  # an empty only segment is kept
        assert (log.head, log.segment_count) == (0, 1)
        assert log.append([b"a"]) == 1


def test_segment_direct_append_and_recover(tmp_path: Path) -> None:
    seg = Segment.create(str(tmp_path), 5)
    data, offsets = encode_batch(5, [b"a", b"bb", b"ccc"], 0)
    seg.append(data, offsets)
    assert (seg.count, seg.size, seg.last_id) == (3, len(data), 7)
    assert [seg.offset_of(i) for i in range(5, 9)] == [*offsets, len(data)]
    assert seg.read_record(6).body == b"bb"
    seg.close()
    with open(seg.log_path, "ab") as f:
        f.write(b"+8 3 ")  # a torn header
    again, cut = recover_active(str(tmp_path), 5)
    assert (again.count, again.size, cut) == (3, len(data), 5)
    assert read_index(again.idx_path) == list(offsets)
    again.close()


def test_torn_tail_at_every_offset(template: Path, tmp_path: Path) -> None:
    head = 30
    path, first, recs = active_layout(template, head)
    size = recs[-1][1]
    last_start = recs[-1][0]
    cuts = list(range(last_start, size + 1))
    cuts += [0, 1, recs[0][1], recs[1][0] + 3, recs[1][1] - 1, recs[2][1]]
    for n, cut in enumerate(cuts):
        d = copy_of(template, tmp_path, f"cut{n}")
        os.truncate(log_files(d)[-1], cut)
        kept = sum(1 for _off, end in recs if end <= cut)
        expect_head = first - 1 + kept
        with Log(str(d), fsync="never", segment_bytes=SEGMENT_BYTES) as log:
            assert log.head == expect_head, cut
            if cut or first == 1:
                assert log.recovered_bytes_cut == cut - (recs[kept - 1][1] if kept else 0)
            records = log.read(1, max_count=10**6)
            assert [r.id for r in records] == list(range(1, expect_head + 1))
            assert all(r.body == body_of(r.id) for r in records)
            assert log.append([body_of(expect_head + 1)]) == expect_head + 1
        assert_log(d, expect_head + 1)


def test_empty_active_segment_is_dropped_and_the_previous_one_continues(template: Path, tmp_path: Path) -> None:
    d = copy_of(template, tmp_path)
    files = log_files(d)
    for path in files[-1], files[-1].with_suffix(".idx"):
        path.write_bytes(b"")  # a crash right after a roll
    prev_last = first_id_of(files[-1]) - 1
    with Log(str(d), fsync="never", segment_bytes=SEGMENT_BYTES) as log:
        assert log.head == prev_last
        assert log.segment_count == len(files) - 1
        assert not files[-1].exists()
        assert log.append([body_of(prev_last + 1)]) == prev_last + 1
    assert_log(d, prev_last + 1)


def test_empty_active_segment_without_index(template: Path, tmp_path: Path) -> None:
    d = copy_of(template, tmp_path)
    with Log(str(d), fsync="never", segment_bytes=SEGMENT_BYTES) as log:
        head, count = log.head, log.segment_count
    (d / (segment_name(head + 1) + ".log")).write_bytes(b"")
    with Log(str(d), fsync="never", segment_bytes=SEGMENT_BYTES) as log:
        assert (log.head, log.segment_count) == (head, count)
    assert not (d / (segment_name(head + 1) + ".log")).exists()
    assert_log(d, head)


def corrupt_active_index(d: Path, how: str) -> None:
    idx = log_files(d)[-1].with_suffix(".idx")
    raw = bytearray(idx.read_bytes())
    n = len(raw) // 8
    if how == "garbage tail":
        raw += b"\xde\xad\xbe\xef" * 5
    elif how == "zeroed tail":
        raw[8 * (n - 3) :] = bytes(24)
    elif how == "beyond data":
        raw += array("Q", [10**6, 10**6 + 40]).tobytes()
    elif how == "last entry off by one":
        raw[-8:] = array("Q", [read_index(idx)[-1] + 1]).tobytes()
    elif how == "short":
        del raw[8 * (n - 3) + 5 :]
    elif how == "random":
        raw[:] = os.urandom(len(raw))
    elif how == "missing":
        idx.unlink()
        return
    idx.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "how", ["garbage tail", "zeroed tail", "beyond data", "last entry off by one", "short", "random", "missing"]
)
def test_active_index_is_rebuilt(template: Path, tmp_path: Path, how: str) -> None:
    d = copy_of(template, tmp_path)
    corrupt_active_index(d, how)
    with Log(str(d), fsync="never", segment_bytes=SEGMENT_BYTES) as log:
        assert log.head == 30
        assert log.recovered_bytes_cut == 0
        assert log.append([body_of(31)]) == 31
    assert_log(d, 31)


@pytest.mark.parametrize("how", ["missing", "short", "partial entry", "zero-extended", "empty"])
def test_closed_index_of_wrong_size_is_rebuilt(template: Path, tmp_path: Path, how: str) -> None:
    d = copy_of(template, tmp_path)
    idx = log_files(d)[1].with_suffix(".idx")
    good = idx.read_bytes()
    if how == "missing":
        idx.unlink()
    elif how == "short":
        idx.write_bytes(good[:-8])
    elif how == "partial entry":
        idx.write_bytes(good[:-3])
    elif how == "zero-extended":
        idx.write_bytes(good + bytes(16))
    else:
        idx.write_bytes(b"")
    with Log(str(d), fsync="never", segment_bytes=SEGMENT_BYTES) as log:
        assert log.head == 30
        assert idx.read_bytes() == good
        assert not list(d.glob("*.tmp"))
    assert_log(d, 30)


def test_closed_index_rebuild_refuses_a_short_segment(template: Path, tmp_path: Path) -> None:
    d = copy_of(template, tmp_path)
    path = log_files(d)[1]
    os.truncate(path, path.stat().st_size - 10)  # the last record of a closed segment is cut
    path.with_suffix(".idx").unlink()
    for _attempt in range(2):  # the first failure must release the lock
        with pytest.raises(DamagedLogError) as info:  # refusing to start names the segment
            Log(str(d))
        assert info.value.path == str(path)
    assert not list(d.glob("*.tmp"))


def test_refusing_a_damaged_closed_segment_closes_the_active_one(template: Path, tmp_path: Path) -> None:
    # Review finding: the active segment, recovered first, kept its two descriptors open.
    d = copy_of(template, tmp_path)
    path = log_files(d)[1]
    os.truncate(path, path.stat().st_size - 10)
    path.with_suffix(".idx").unlink()
    before = open_fds_under(tmp_path)
    with pytest.raises(DamagedLogError):
        Log(str(d))
    assert open_fds_under(tmp_path) == before


@pytest.mark.parametrize("how", ["zeroed tail", "swapped", "huge", "past the end"])
def test_closed_index_of_right_size_but_wrong_entries_never_gives_wrong_data(
    template: Path, tmp_path: Path, how: str
) -> None:
    # Open checks only the size of a closed index (protocol.md section 2); reading
    # through a bad entry must fail with CorruptRecordError, never return data.
    d = copy_of(template, tmp_path)
    path = log_files(d)[1]
    first = first_id_of(path)
    idx = path.with_suffix(".idx")
    entries = read_index(idx)
    k = len(entries) - 3
    if how == "zeroed tail":
        entries[k:] = [0] * (len(entries) - k)
    elif how == "swapped":
        entries[k], entries[k + 1] = entries[k + 1], entries[k]
    elif how == "huge":
        entries[k] = 2**64 - 1
    else:
        entries[k] = path.stat().st_size + 100
    idx.write_bytes(array("Q", entries).tobytes())
    last = first + len(entries) - 1
    with Log(str(d), fsync="never") as log:
        assert [r.id for r in log.read(1, max_count=first + k - 2)] == list(range(1, first + k - 1))
        errors = 0
        for id in range(first + k - 1, last + 1):
            try:
                (rec,) = log.read(id, max_count=1)
            except CorruptRecordError as exc:
                assert (exc.where, exc.id) == (str(path), id)
                errors += 1
            else:
                assert (rec.id, rec.body) == (id, body_of(id))
        assert errors >= 1
        assert log.read(last + 1, max_count=1)[0].body == body_of(last + 1)  # the next segment is fine
