"""logd.sink.sqlite: tables created or checked, rows and position in one transaction."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from logd.protocol import RecordRow
from logd.sink.errors import DatabaseUnavailableError, SchemaError
from logd.sink.sqlite import SQLiteTarget
from logd.sink.target import TargetSpec, open_target


def _rows(ids: range) -> list[RecordRow]:
    return [(i, b"b%d" % i) for i in ids]


def test_sqlite_urls_follow_the_sqlalchemy_convention(tmp_path: Path) -> None:
    spec = TargetSpec("ev")
    assert open_target("sqlite:///rel/x.db", spec).describe() == "sqlite:rel/x.db"  # type: ignore[union-attr]
    assert open_target(f"sqlite:///{tmp_path}/x.db", spec).describe() == f"sqlite:{tmp_path}/x.db"


def test_without_create_a_missing_table_is_a_clear_error(tmp_path: Path) -> None:
    target = SQLiteTarget(str(tmp_path / "x.db"), TargetSpec("ev"))
    with pytest.raises(SchemaError, match="no table ev .*--create"):
        target.open()


def test_a_missing_column_is_a_clear_error(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "x.db") as db:
        db.execute("CREATE TABLE ev (id INTEGER PRIMARY KEY, payload BLOB)")
    with pytest.raises(SchemaError, match="table ev has no column body"):
        SQLiteTarget(str(tmp_path / "x.db"), TargetSpec("ev", create=True)).open()


def test_rows_and_position_commit_together_or_not_at_all(tmp_path: Path) -> None:
    target = SQLiteTarget(str(tmp_path / "x.db"), TargetSpec("ev", create=True))
    target.open()
    assert target.begin() == 0
    target.insert(_rows(range(1, 11)))
    target.commit(10)
    assert target.begin() == 10
    target.insert(_rows(range(11, 21)))
    target.close()  # a crash before commit
    target.open()
    assert target.position() == 10
    assert list(target.db.execute("SELECT count(*), max(id) FROM ev")) == [(10, 10)]


def test_a_sink_name_belongs_to_one_table(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    first = open_target(url, TargetSpec("ev", create=True))
    first.open()
    first.begin()
    first.commit(5)
    other = open_target(url, TargetSpec("other", create=True))
    other.open()
    with pytest.raises(SchemaError, match="delivers into ev, not other"):
        other.position()


def test_a_database_locked_by_another_writer_is_worth_retrying(tmp_path: Path) -> None:
    target = SQLiteTarget(str(tmp_path / "x.db"), TargetSpec("ev", create=True))
    target.open()
    target.close()
    holder = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        target = SQLiteTarget(str(tmp_path / "x.db"), TargetSpec("ev"), busy_timeout_ms=50)
        target.open()
        with pytest.raises(DatabaseUnavailableError, match="locked"):
            target.begin()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
