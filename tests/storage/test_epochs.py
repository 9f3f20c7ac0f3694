"""Leader epochs on disk (storage/epochs.py) and cutting a log back (Log.truncate_after)."""

from __future__ import annotations

from pathlib import Path

import pytest
from crc32c import crc32c

from logd.errors import NotFoundError, StorageError
from logd.storage import Log, closed_head
from logd.storage.epochs import FILE, Epochs
from logd.storage.files import replace_durably
from logd.storage.record import decode_record
from logd.storage.truncate import dropped_name


def test_missing_file_is_epoch_zero_and_writable(tmp_path: Path) -> None:
    e = Epochs.load(str(tmp_path))
    assert e.entries == [(0, 1)] and e.current == 0 and e.seen == 0 and not e.refused
    assert not (tmp_path / FILE).exists()  # nothing written until something changes


def test_changes_survive_a_reload(tmp_path: Path) -> None:
    e = Epochs.load(str(tmp_path))
    e.start(1, 101, refused=False)
    e.see(5, refused=True)
    again = Epochs.load(str(tmp_path))
    assert again.entries == [(0, 1), (1, 101)] and again.seen == 5 and again.refused
    body = b"0 1\n1 101\nseen 5\nrefused\n"
    assert (tmp_path / FILE).read_bytes() == body + b"crc %08x\n" % crc32c(body)
    assert not (tmp_path / (FILE + ".tmp")).exists()


def test_epochs_must_move_forward(tmp_path: Path) -> None:
    e = Epochs.load(str(tmp_path))
    e.start(2, 50)
    with pytest.raises(ValueError):
        e.start(2, 60)  # same epoch again
    with pytest.raises(ValueError):
        e.start(3, 40)  # starting before the previous one
    (tmp_path / FILE).write_text("0 1\n3 10\n2 20\n")
    with pytest.raises(StorageError, match="must increase"):
        Epochs.load(str(tmp_path))
    (tmp_path / FILE).write_text("0 1\nbogus\n")
    with pytest.raises(StorageError, match="cannot parse"):
        Epochs.load(str(tmp_path))


def test_end_of_answers_like_offsets_for_leader_epoch(tmp_path: Path) -> None:
    e = Epochs(str(tmp_path), entries=[(0, 1), (2, 101), (3, 101), (5, 300)])
    assert e.end_of(0, 400) == (0, 101)
    assert e.end_of(1, 400) == (0, 101)  # unknown here: the largest epoch below it, and its end
    assert e.end_of(2, 400) == (2, 101)  # an epoch that holds no record ends where it starts
    assert e.end_of(4, 400) == (3, 300)
    assert e.end_of(5, 400) == (5, 400)  # the newest runs to the next id
    assert e.end_of(9, 400) == (5, 400)
    assert e.epoch_of(100) == (0, 101)
    assert e.epoch_of(101) == (3, 300)
    assert e.epoch_of(350) == (5, None)


def test_truncate_after_keeps_seen(tmp_path: Path) -> None:
    e = Epochs.load(str(tmp_path))
    e.start(1, 11)
    e.start(2, 21)
    e.truncate_after(15)
    assert e.entries == [(0, 1), (1, 11)] and e.seen == 2
    assert Epochs.load(str(tmp_path)).entries == [(0, 1), (1, 11)]
    e.truncate_after(0)
    assert e.entries == [(0, 1)] and Epochs.load(str(tmp_path)).seen == 2


def _fill(lg: Log, n: int, start: int = 1) -> None:
    for i in range(start, start + n):
        lg.append([b"m%05d" % i])
    lg.sync()


def test_log_truncate_after_moves_records_to_a_file(tmp_path: Path) -> None:
    lg = Log(str(tmp_path), segment_bytes=200)  # a few records per segment
    _fill(lg, 40)
    before = lg.segment_count
    path = str(tmp_path / dropped_name(3, 23))
    assert lg.truncate_after(22, path) == 18
    assert lg.head == lg.written == 22 and lg.segment_count < before
    # The dropped records, as stored, one after another.
    data = Path(path).read_bytes()
    pos, ids = 0, []
    while pos < len(data):
        rec = decode_record(data, pos, 23 + len(ids))
        ids.append(rec.id)
        assert rec.body == b"m%05d" % rec.id
        pos += rec.size
    assert ids == list(range(23, 41))
    # The log goes on from 23, and survives a reopen.
    _fill(lg, 5, start=23)
    lg.close()
    again = Log(str(tmp_path), segment_bytes=200)
    assert again.head == 27
    assert [r.body for r in again.read(20, 10)] == [b"m%05d" % i for i in range(20, 28)]
    assert again.truncate_after(30, path) == 0  # nothing past 30
    again.close()


def test_log_truncate_at_a_segment_boundary(tmp_path: Path) -> None:
    lg = Log(str(tmp_path), segment_bytes=200)
    _fill(lg, 30)
    firsts = [s.first_id for s in lg._segments]
    boundary = firsts[2]
    lg.truncate_after(boundary - 1, str(tmp_path / "x.log"))
    assert lg.head == boundary - 1
    assert [s.first_id for s in lg._segments] == firsts[:2]
    lg.close()


def test_log_truncate_below_retention_is_refused(tmp_path: Path) -> None:
    lg = Log(str(tmp_path), segment_bytes=200, retention_bytes=300)
    _fill(lg, 30)
    assert lg.apply_retention()
    with pytest.raises(NotFoundError):
        lg.truncate_after(lg.first - 2, str(tmp_path / "x.log"))
    lg.close()


def test_retention_keeps_the_segment_holding_the_last_record(tmp_path: Path) -> None:
    # A follower told +SEG 11 before record 11 arrived: its active segment is empty.
    lg = Log(str(tmp_path), fsync="interval:20", retention_bytes=10)
    _fill(lg, 10)
    lg.start_segment(11)
    lg.sync()
    assert lg.apply_retention() == []  # size is over the limit, but id 10's CRC is needed to resume
    assert lg.crc_of(10)
    lg.append([b"eleven"])
    lg.sync()
    assert lg.apply_retention() == [1]
    lg.close()


def test_truncate_after_a_clean_close_lowers_the_closed_head(tmp_path: Path) -> None:
    # A follower cutting divergent records after a restart: the head saved at the last
    # clean close must not make the next open (after a crash, say) refuse the shorter log.
    lg = Log(str(tmp_path), segment_bytes=200)
    _fill(lg, 40)
    lg.close()
    lg = Log(str(tmp_path), segment_bytes=200)
    assert lg.truncate_after(22, str(tmp_path / dropped_name(3, 23))) == 18
    assert closed_head.load(str(tmp_path)) == 22
    assert [r.id for r in lg.read(21, 5)] == [21, 22]  # read handles work on the re-opened segments
    lg._release_lock()  # a crash: no clean close, so CLOSED_HEAD is what truncate_after left
    again = Log(str(tmp_path), segment_bytes=200)
    assert again.head == 22
    again.close()


def test_replace_durably_swaps_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "FILE"
    path.write_bytes(b"old\n")
    replace_durably(str(path), b"new\n" * 1000)
    assert path.read_bytes() == b"new\n" * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["FILE"]  # no temp file left behind


# --- the crc line: a file that may have lost its `refused` line fails closed (issue 22) ------


@pytest.mark.parametrize("text, why", [
    (b"", "empty"),
    (b"0 1\nseen 2\n", "does not end with its crc line"),  # cut short, or an older logd's
    (b"0 1\nseen 2\ncrc 00000000\n", "does not match"),
    (b"0 1\nseen 2\nrefused\ncrc 0000", "does not end with its crc line"),
])
def test_a_file_it_cannot_verify_loads_refused(tmp_path: Path, text: bytes, why: str) -> None:
    (tmp_path / FILE).write_bytes(text)
    e = Epochs.load(str(tmp_path))
    assert e.refused and e.unverified is not None and why in e.unverified
    e.start(3, 1, refused=False)  # what ACCEPT does: the file is whole again, with its crc
    again = Epochs.load(str(tmp_path))
    assert again.unverified is None and not again.refused and again.current == 3


def test_a_verified_file_without_refused_is_writable(tmp_path: Path) -> None:
    body = b"0 1\n1 5\nseen 1\n"
    (tmp_path / FILE).write_bytes(body + b"crc %08x\n" % crc32c(body))
    e = Epochs.load(str(tmp_path))
    assert e.unverified is None and not e.refused and e.entries == [(0, 1), (1, 5)]
