"""`logd check`: offline verification and repair of a data dir, and where two dirs diverge."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from array import array
from pathlib import Path

import pytest

from logd.errors import DamagedLogError, LockedError, StorageError
from logd.storage import Log
from logd.storage.check import check_data_dir, diverge_point
from logd.storage.record import encode_record

from .helpers import first_id_of, flip_bit, forget_clean_close, layout, log_files, read_index

SEGMENT_BYTES = 400
COUNT = 40


def body_of(id: int, tag: bytes = b"") -> bytes:
    return tag + b"body-%d-" % id + b"z" * (id * 11 % 37)


def make_log(d: Path, count: int = COUNT, segment_bytes: int = SEGMENT_BYTES, tag_from: int = 0) -> Path:
    """A log of ``count`` records; from id ``tag_from`` on (if set) the bodies differ."""
    with Log(str(d), fsync="never", segment_bytes=segment_bytes) as log:
        for id in range(1, count + 1):
            log.append([body_of(id, b"other-" if tag_from and id >= tag_from else b"")])
    return d


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = make_log(tmp_path / "data")
    assert len(log_files(d)) >= 4
    return d


def run_check(d: Path, repair: bool = False) -> tuple[int, str]:
    out = io.StringIO()
    code = check_data_dir(str(d), repair=repair, out=out)
    return code, out.getvalue()


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "LOCK"}


def record_of(d: Path, id: int) -> tuple[Path, int]:
    """The segment file holding ``id`` and the record's byte offset in it."""
    path = [p for p in log_files(d) if first_id_of(p) <= id][-1]
    first = first_id_of(path)
    return path, layout(first, [body_of(i) for i in range(first, id + 1)])[-1][0]


def assert_log(d: Path, head: int) -> None:
    with Log(str(d)) as log:
        assert (log.head, log.recovered_bytes_cut) == (head, 0)
        records = log.read(1, max_count=1000) if head else []
        assert [r.id for r in records] == list(range(1, head + 1))
        assert all(r.body == body_of(r.id) for r in records)
    assert run_check(d)[0] == 0


def test_good_dir(data: Path) -> None:
    before = snapshot(data)
    code, out = run_check(data)
    assert code == 0
    total = sum(p.stat().st_size for p in log_files(data))
    assert out.splitlines() == [f"{len(log_files(data))} segments, {COUNT} records, ids 1..{COUNT}, {total} bytes: OK"]
    assert snapshot(data) == before


def test_repair_of_a_good_dir_changes_nothing(data: Path) -> None:
    before = snapshot(data)
    code, out = run_check(data, repair=True)
    assert code == 0
    assert "moving" not in out and "rebuilt" not in out and "truncating" not in out
    assert snapshot(data) == before


def test_flipped_bit_names_the_record_then_repair(data: Path) -> None:
    bad = first_id_of(log_files(data)[1]) + 1  # in a closed segment
    path, offset = record_of(data, bad)
    flip_bit(path, offset + len(encode_record(bad, body_of(bad))) - 5)  # in the body
    before = snapshot(data)
    code, out = run_check(data)
    assert code == 1
    (line,) = [x for x in out.splitlines() if "bad record" in x]
    assert line.startswith(f"{path}: offset {offset}: id {bad}: bad record: crc mismatch")
    assert out.splitlines()[-1].endswith("1 problem")
    assert snapshot(data) == before  # no repair without --repair

    later = [p for p in log_files(data) if first_id_of(p) > bad]
    lost = path.stat().st_size - offset + sum(p.stat().st_size for p in later)
    code, out = run_check(data, repair=True)
    assert code == 1
    moved = COUNT - bad  # the valid records after the bad one, kept in .broken files
    assert (
        f"truncating the log after id {bad - 1}: moving the bad record at id {bad} and everything after it "
        f"({moved} valid records, {lost} bytes, {len(later)} later segments) to .broken files" in out
    )
    assert not any(p.exists() or p.with_suffix(".idx").exists() for p in later)
    # Nothing is deleted: the cut bytes and the later segments are kept whole.
    assert Path(f"{path}.broken").read_bytes() == before[path.name][offset:]
    assert all(Path(f"{p}.broken").read_bytes() == before[p.name] for p in later)
    assert path.stat().st_size == offset
    assert_log(data, bad - 1)


def test_flipped_bit_in_the_active_segment(data: Path) -> None:
    bad = COUNT - 1
    path, offset = record_of(data, bad)
    assert path == log_files(data)[-1]
    flip_bit(path, offset + 1, bit=3)  # the id's first digit is no longer a digit
    code, out = run_check(data)
    assert code == 1
    assert f"{path}: offset {offset}: id {bad}: bad record" in out
    code, out = run_check(data, repair=True)
    assert f"moving the bad record at id {bad} and everything after it (1 valid records" in out
    assert_log(data, bad - 1)


def test_truncated_middle_segment(data: Path) -> None:
    path = log_files(data)[1]
    first = first_id_of(path)
    recs = layout(first, [body_of(i) for i in range(first, first_id_of(log_files(data)[2]))])
    bad = first + len(recs) - 2
    header = encode_record(bad, body_of(bad)).index(b"\n") + 1
    os.truncate(path, recs[-2][0] + header + 2)  # inside the body of the second-to-last record
    code, out = run_check(data)
    assert code == 1
    assert f"{path}: offset {recs[-2][0]}: id {bad}: bad record: body cut off" in out
    code, out = run_check(data, repair=True)
    assert code == 1
    assert f"truncating the log after id {bad - 1}: moving the bad record at id {bad}" in out
    assert read_index(path.with_suffix(".idx")) == [off for off, _end in recs[:-2]]
    assert log_files(data)[-1] == path
    assert_log(data, bad - 1)


def test_middle_segment_cut_at_a_record_boundary(data: Path) -> None:
    path = log_files(data)[1]
    first, nxt = first_id_of(path), first_id_of(log_files(data)[2])
    recs = layout(first, [body_of(i) for i in range(first, nxt)])
    os.truncate(path, recs[-1][0])  # the last record is gone, cleanly
    code, out = run_check(data)
    assert code == 1
    assert f"{path}: offset {recs[-1][0]}: id {nxt - 1}: segment ends early: ids {nxt - 1}..{nxt - 1} missing" in out
    code, out = run_check(data, repair=True)
    assert_log(data, nxt - 2)


@pytest.mark.parametrize("segment", [0, 2, -1])
def test_missing_index_is_rebuilt(data: Path, segment: int) -> None:
    idx = log_files(data)[segment].with_suffix(".idx")
    good = idx.read_bytes()
    idx.unlink()
    code, out = run_check(data)
    assert code == 1
    assert f"{idx}: offset 0: id {first_id_of(idx)}: index missing" in out
    code, out = run_check(data, repair=True)
    assert code == 1
    assert f"repair: {idx}: rebuilt" in out and "moving" not in out
    assert idx.read_bytes() == good
    assert_log(data, COUNT)


@pytest.mark.parametrize("how", ["swapped", "short", "zero-extended"])
def test_wrong_closed_index_is_rebuilt(data: Path, how: str) -> None:
    idx = log_files(data)[1].with_suffix(".idx")
    good = idx.read_bytes()
    entries = read_index(idx)
    if how == "swapped":
        entries[1], entries[2] = entries[2], entries[1]
        idx.write_bytes(array("Q", entries).tobytes())
        want = f"{idx}: offset 8: id {first_id_of(idx) + 1}: index entry says offset {entries[1]}"
    elif how == "short":
        idx.write_bytes(good[:-8])
        want = f"index is {len(good) - 8} bytes, {len(entries)} records need {len(good)}"
    else:
        idx.write_bytes(good + bytes(8))
        want = f"index is {len(good) + 8} bytes, {len(entries)} records need {len(good)}"
    code, out = run_check(data)
    assert code == 1
    assert want in out
    run_check(data, repair=True)
    assert idx.read_bytes() == good
    assert_log(data, COUNT)


def test_extra_bytes_after_a_closed_segment(data: Path) -> None:
    path = log_files(data)[0]
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"garbage")
    code, out = run_check(data)
    assert code == 1
    assert f"{path}: offset {size}: id {first_id_of(log_files(data)[1])}: 7 bytes after the segment's last id" in out
    code, out = run_check(data, repair=True)
    assert "truncating the log" not in out
    assert path.stat().st_size == size
    assert_log(data, COUNT)


def test_torn_tail_is_a_note_not_a_problem(data: Path) -> None:
    path, offset = record_of(data, COUNT)
    forget_clean_close(data)  # a crash, not a clean close
    os.truncate(path, offset + 9)
    code, out = run_check(data)
    assert code == 0
    assert f"{path}: offset {offset}: id {COUNT}: note: torn tail, a cut-off record of 9 bytes" in out
    assert f"ids 1..{COUNT - 1}" in out
    code, out = run_check(data, repair=True)
    assert code == 0
    assert path.stat().st_size == offset
    assert_log(data, COUNT - 1)


def test_short_active_index_is_a_note(data: Path) -> None:
    idx = log_files(data)[-1].with_suffix(".idx")
    idx.write_bytes(idx.read_bytes()[:-16])
    code, out = run_check(data)
    assert code == 0
    assert "note: index is" in out
    run_check(data, repair=True)
    assert_log(data, COUNT)


def test_first_record_bad_empties_the_log(data: Path) -> None:
    flip_bit(log_files(data)[0], 0)
    code, out = run_check(data, repair=True)
    assert code == 1
    assert f"moving the bad record at id 1 and everything after it ({COUNT - 1} valid records" in out
    assert len(log_files(data)) == 1
    assert_log(data, 0)


def test_locked_dir_is_refused_with_the_pid(data: Path) -> None:
    before = snapshot(data)
    with Log(str(data)) as log:
        code, out = run_check(data, repair=True)
        assert code == 2
        assert f"pid {os.getpid()}" in out
        assert log.append([body_of(COUNT + 1)]) == COUNT + 1  # the holder is unharmed
    assert snapshot(data) != before


class OpenLogOnWrite(io.StringIO):
    """An output that tries to open the log while check is printing."""

    def __init__(self, d: Path) -> None:
        super().__init__()
        self.d = d
        self.refused: list[LockedError] = []

    def write(self, s: str) -> int:
        try:
            Log(str(self.d)).close()
        except LockedError as exc:
            self.refused.append(exc)
        return super().write(s)


def test_check_holds_the_lock_while_checking(data: Path) -> None:
    out = OpenLogOnWrite(data)
    assert check_data_dir(str(data), out=out) == 0
    assert out.refused and all(e.pid == os.getpid() for e in out.refused)
    Log(str(data)).close()  # released afterwards


def test_not_a_data_dir(tmp_path: Path) -> None:
    assert run_check(tmp_path / "missing")[0] == 2
    (tmp_path / "empty").mkdir()
    code, out = run_check(tmp_path / "empty", repair=True)
    assert code == 2 and "not a logd data dir" in out
    assert list((tmp_path / "empty").iterdir()) == []  # no LOCK left in a stranger's dir
    (tmp_path / "file").write_text("x")
    assert run_check(tmp_path / "file")[0] == 2


def test_empty_log_is_good(tmp_path: Path) -> None:
    Log(str(tmp_path)).close()
    code, out = run_check(tmp_path)
    assert code == 0
    assert "1 segments, 0 records, no records, 0 bytes: OK" in out


# --- diverge_point ------------------------------------------------------------------


def test_diverge_point_of_copies_and_prefixes(tmp_path: Path) -> None:
    a = make_log(tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert diverge_point(str(a), str(b)) is None
    with Log(str(b)) as log:
        log.append([body_of(COUNT + 1), body_of(COUNT + 2)])
    assert diverge_point(str(a), str(b)) is None  # a is a prefix of b
    assert diverge_point(str(b), str(a)) is None
    with Log(str(a)) as log:
        log.append([b"a different 41"])
    assert diverge_point(str(a), str(b)) == COUNT + 1
    assert diverge_point(str(b), str(a)) == COUNT + 1


@pytest.mark.parametrize("at", [1, 17, COUNT])
def test_diverge_point_with_other_segment_layouts(tmp_path: Path, at: int) -> None:
    a = make_log(tmp_path / "a")
    b = make_log(tmp_path / "b", segment_bytes=1000, tag_from=at)
    assert len(log_files(a)) != len(log_files(b))
    assert diverge_point(str(a), str(b)) == at


def test_diverge_point_compares_only_ids_held_by_both(tmp_path: Path) -> None:
    a = make_log(tmp_path / "a", tag_from=3)  # differs at 3, which retention removes from b
    b = make_log(tmp_path / "b")
    with Log(str(b), retention_bytes=0) as log:
        log.apply_retention()
        assert log.first > 3
    assert diverge_point(str(a), str(b)) == first_id_of(log_files(b)[0])
    c = make_log(tmp_path / "c")
    assert diverge_point(str(c), str(b)) is None


def test_diverge_point_stops_at_a_bad_record(tmp_path: Path) -> None:
    a = make_log(tmp_path / "a")
    b = make_log(tmp_path / "b", tag_from=30)
    path, offset = record_of(a, 20)
    flip_bit(path, offset + 20)
    assert diverge_point(str(a), str(b)) is None  # a counts up to 19, as repair would keep it


def test_diverge_point_needs_data_dirs(tmp_path: Path) -> None:
    a = make_log(tmp_path / "a")
    (tmp_path / "empty").mkdir()
    for other in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(StorageError):
            diverge_point(str(a), str(other))


def test_directory_named_like_a_segment_is_a_clean_error(tmp_path: Path) -> None:
    # Issue 13, finding 6: this used to end in a traceback (IsADirectoryError).
    d = make_log(tmp_path / "data", count=5)
    (d / "00000000000000000006.log").mkdir()
    result = subprocess.run([sys.executable, "-m", "logd.cli", "check", str(d)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"logd check: cannot check {d}: " in result.stdout and "Is a directory" in result.stdout


def test_check_agrees_with_recovery_on_a_bad_record_followed_by_valid_ones(data: Path) -> None:
    # Issue 13, finding 1: what check calls corruption, recovery refuses to cut.
    path = log_files(data)[-1]
    bad = first_id_of(path)  # the active segment's first record, valid ones after it
    assert bad < COUNT
    _, offset = record_of(data, bad)
    flip_bit(path, offset + len(encode_record(bad, body_of(bad))) - 5)
    path.with_suffix(".idx").write_bytes(b"")  # recovery must not need the active index
    code, out = run_check(data)
    assert code == 1 and f"id {bad}: bad record: crc mismatch; {COUNT - bad} valid records follow" in out
    with pytest.raises(DamagedLogError) as caught:
        Log(str(data))
    assert (caught.value.path, caught.value.offset, caught.value.id) == (str(path), offset, bad)
    assert caught.value.following == COUNT - bad
    code, out = run_check(data, repair=True)
    assert code == 1
    with Log(str(data)) as log:
        assert log.head == bad - 1


def test_repair_refuses_an_unparsable_epochs_before_changing_anything(data: Path) -> None:
    # Review finding: repair cut the log, then crashed loading EPOCHS, leaving it half-repaired.
    bad = first_id_of(log_files(data)[1]) + 1
    path, offset = record_of(data, bad)
    flip_bit(path, offset + len(encode_record(bad, body_of(bad))) - 5)
    (data / "EPOCHS").write_bytes(b"0 1\nnot an epoch line\n")
    before = snapshot(data)
    code, out = run_check(data)
    assert code == 1 and "EPOCHS line 2: cannot parse" in out and out.splitlines()[-1].endswith("2 problems")
    result = subprocess.run([sys.executable, "-m", "logd.cli", "check", "--repair", str(data)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "logd check: refusing to repair: " in result.stdout and "nothing was changed" in result.stdout
    assert snapshot(data) == before
