"""Every durable write checks what it wrote (issue 22): the small files on a real full disk.

A tmpfs is mounted and filled to the brim (tests/fulldisk.py). A write that
crosses into a page the disk no longer has is cut short there, as on a real
disk: the file must then end as it did before (or, where it cannot be cut
back, the torn bytes must stay a line of their own), the error must be
raised, and no temporary file may be left holding space.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from logd.storage import Log, watermark
from logd.storage.cursors import FILE, CursorStore, encode_line
from logd.storage.files import replace_durably
from tests.fulldisk import PAGE, fill, tmpfs


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "disk", "1m") as where:
        yield where


def _one_page_but_ten_bytes(store: CursorStore) -> dict[str, int]:
    """Set cursors until CURSORS is 10 bytes short of a page; return them."""
    names = [f"c{i:063d}" for i in range(53)] + ["p" * 46]  # 53 lines of 76 bytes, one of 58
    for name in names:
        store.set(name, 1)
    assert os.path.getsize(store.path) == PAGE - 10
    return dict.fromkeys(names, 1)


def test_a_cursor_line_cut_short_is_cut_back_and_raised(disk: Path) -> None:
    store = CursorStore(str(disk))
    want = _one_page_but_ten_bytes(store)
    filler = fill(disk)
    with pytest.raises(OSError) as exc:
        store.set("t" * 64, 1)  # 76 bytes: 10 fit, the next page is not there
    assert exc.value.errno == errno.ENOSPC
    assert os.path.getsize(store.path) == PAGE - 10  # the 10 bytes are gone again
    assert store.get("t" * 64) == 0 and store.items() == want
    filler.unlink()
    store.set("after", 2)
    store.close()
    again = CursorStore(str(disk))
    assert again.items() == {**want, "after": 2} and again.bad_lines_skipped == 0
    again.close()


def test_torn_bytes_that_cannot_be_cut_stay_a_bad_line_of_their_own(disk: Path) -> None:
    store = CursorStore(str(disk))
    want = _one_page_but_ten_bytes(store)
    # Append-only (chattr +a): appends work, truncating fails (EPERM), as when ftruncate meets an I/O error.
    subprocess.run(["chattr", "+a", store.path], check=True, timeout=60)
    try:
        filler = fill(disk)
        with pytest.raises(OSError):
            store.set("t" * 64, 1)
        assert os.path.getsize(store.path) == PAGE  # 10 torn bytes stay: they could not be cut
        filler.unlink()
        store.set("after", 2)  # acknowledged: it must not be read as the rest of the torn line
        store.close()
        data = Path(store.path).read_bytes()
        assert data.endswith(b"\n" + encode_line("after", 2))
        again = CursorStore(str(disk))  # its rewrite fails (the file cannot be replaced): it goes on
        assert again.items() == {**want, "after": 2} and again.bad_lines_skipped == 1
        again.set("later", 3)
        again.close()
    finally:
        subprocess.run(["chattr", "-a", store.path], check=True, timeout=60)
    assert CursorStore(str(disk)).items() == {**want, "after": 2, "later": 3}


def test_a_cursor_file_with_bad_lines_opens_on_a_full_disk(disk: Path) -> None:
    good = encode_line("a", 3) + encode_line("b", 4)
    (disk / FILE).write_bytes(encode_line("a", 1) + b"garbage\n" + good + b"c 9 12")  # a torn tail
    filler = fill(disk)
    store = CursorStore(str(disk))  # the rewrite without the bad lines needs space there is none of
    assert store.items() == {"a": 3, "b": 4} and store.bad_lines_skipped == 2
    assert store.rewrite_error is not None and store.rewrite_error.errno == errno.ENOSPC
    assert (disk / FILE).read_bytes().endswith(good)  # the torn tail was cut: that needs no space
    assert not (disk / (FILE + ".tmp")).exists()
    filler.unlink()
    store.set("c", 5)
    store.close()
    assert CursorStore(str(disk)).items() == {"a": 3, "b": 4, "c": 5}


def test_a_file_replaced_on_a_full_disk_stays_as_it_was_with_no_debris(disk: Path) -> None:
    path = disk / "EPOCHS"
    replace_durably(str(path), b"old\n")
    fill(disk)
    with pytest.raises(OSError):
        replace_durably(str(path), b"x" * (3 * PAGE))
    assert path.read_bytes() == b"old\n"
    assert sorted(os.listdir(disk)) == ["EPOCHS", "filler"]  # no EPOCHS.tmp holding pages


def test_the_high_watermark_not_saved_on_a_full_disk_leaves_no_debris(disk: Path) -> None:
    watermark.save(disk, 7)
    fill(disk)
    with pytest.raises(OSError):
        watermark.save(disk, 8)
    assert watermark.load(disk) == 7 and sorted(os.listdir(disk)) == ["HIGH_WATERMARK", "filler"]


def test_a_follower_cut_that_cannot_save_the_dropped_records_cuts_nothing(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "4m") as disk:
        lg = Log(str(disk), fsync="always", preallocate=False)
        for i in range(1, 201):
            lg.append([b"r%04d" % i + b"x" * 4000])
        lg.sync()
        filler = fill(disk)
        dropped = disk / "dropped-e0-00000000000000000101.dropped"
        with pytest.raises(OSError):
            lg.truncate_after(100, str(dropped))
        assert lg.head == 200 and lg.read(200, 1)[0].body.startswith(b"r0200")
        assert not dropped.exists() and not Path(str(dropped) + ".tmp").exists()
        filler.unlink()
        assert lg.truncate_after(100, str(dropped)) == 100 and lg.head == 100
        lg.close()
