"""logd.sink.deliver on a real SQLite target: bad rows are found by splitting, everything else goes in."""

from __future__ import annotations

from pathlib import Path

import pytest

from logd.protocol import RecordRow
from logd.sink.deliver import deliver
from logd.sink.errors import PoisonMessageError
from logd.sink.rows import DeadLetter, json_mapper, map_records
from logd.sink.sqlite import SQLiteTarget
from logd.sink.target import TargetSpec


def _target(tmp_path: Path) -> SQLiteTarget:
    import sqlite3

    with sqlite3.connect(tmp_path / "d.db") as db:
        db.execute("CREATE TABLE ev (id INTEGER PRIMARY KEY, n INTEGER NOT NULL CHECK (n >= 0))")
    target = SQLiteTarget(str(tmp_path / "d.db"), TargetSpec("ev", create=True, json=True))
    target.open()
    return target


def _records(values: dict[int, bytes], n: int) -> list[RecordRow]:
    return [(i, values.get(i, b'{"n": %d}' % i)) for i in range(1, n + 1)]


def test_bad_rows_are_split_out_to_dead_letters_and_the_rest_committed_with_the_position(tmp_path: Path) -> None:
    target = _target(tmp_path)
    bad = {5: b'{"n": -1}', 6: b'{"n": null}', 64: b'{"n": -64}', 100: b"{broken"}
    rows, unmapped = map_records(_records(bad, 100), json_mapper, target.columns)
    assert target.begin() == 0
    done = deliver(target, rows, unmapped, 100, stop_on_error=False)
    assert done.rows == 96
    assert [d.id for d in done.dead] == [5, 6, 64, 100]
    ids = [r[0] for r in target.db.execute("SELECT id FROM ev ORDER BY id")]
    assert ids == [i for i in range(1, 101) if i not in bad]
    dead = list(target.db.execute("SELECT id, error FROM ev_dead_letters ORDER BY id"))
    assert [d[0] for d in dead] == [5, 6, 64, 100]
    assert "CHECK constraint failed" in dead[0][1] and "NOT NULL" in dead[1][1] and "not JSON" in dead[3][1]
    assert target.position() == 100


def test_stop_on_error_commits_what_came_before_and_names_the_id(tmp_path: Path) -> None:
    target = _target(tmp_path)
    rows, unmapped = map_records(_records({40: b'{"n": -40}'}, 50), json_mapper, target.columns)
    target.begin()
    with pytest.raises(PoisonMessageError) as err:
        deliver(target, rows, unmapped, 50, stop_on_error=True)
    assert err.value.id == 40 and "CHECK" in err.value.reason
    assert [r[0] for r in target.db.execute("SELECT max(id), count(*) FROM ev")] == [39]
    assert target.position() == 39
    assert list(target.db.execute("SELECT count(*) FROM ev_dead_letters")) == [(0,)]


def test_a_failure_that_is_not_about_the_rows_rolls_everything_back(tmp_path: Path) -> None:
    target = _target(tmp_path)
    rows, _ = map_records(_records({}, 10), json_mapper, target.columns)
    target.begin()
    target.db.execute("DROP TABLE ev_dead_letters")  # inside the transaction: rolled back with it
    with pytest.raises(Exception, match="no such table"):
        deliver(target, rows, [DeadLetter(11, b"x", "why")], 11, stop_on_error=False)
    assert target.position() == 0
    assert list(target.db.execute("SELECT count(*) FROM ev")) == [(0,)]
