"""logd.sink.pipeline in-process, against a real `logd serve`: the library API, retries, stop, repositioning."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from logd.protocol import Record
from logd.sink import Sink, SinkConfig
from logd.sink.errors import GaveUpError, SchemaError
from logd.sink.sqlite import SQLiteTarget
from logd.sink.target import TargetSpec
from tests.e2e.conftest import wait_for
from tests.e2e.helpers import url_of
from tests.sink.helpers import fill


def _config(server, db: Path, **kw: object) -> SinkConfig:  # type: ignore[no-untyped-def]
    base: dict[str, object] = {"target": f"sqlite:///{db}", "table": "ev", "url": url_of(server), "create": True,
                               "once": True, "retry_initial_s": 0.01, "retry_max_s": 0.05}
    return SinkConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_a_program_runs_a_sink_in_process_with_its_own_mapping(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with sqlite3.connect(tmp_path / "x.db") as db:
        db.execute("CREATE TABLE ev (id INTEGER PRIMARY KEY, word TEXT, size INTEGER)")
    fill(server, [b"alpha", b"be", b"", b"gamma"])

    def mapper(record: Record) -> dict[str, object]:
        if not record.body:
            raise ValueError("empty")
        return {"word": record.body.decode().upper(), "size": len(record.body)}

    progress = Sink(_config(server, tmp_path / "x.db"), mapper=mapper).run()
    assert (progress.delivered, progress.dead_letters, progress.last_id, progress.state) == (3, 1, 4, "stopped")
    with sqlite3.connect(tmp_path / "x.db") as db:
        assert list(db.execute("SELECT id, word, size FROM ev")) == [(1, "ALPHA", 5), (2, "BE", 2), (4, "GAMMA", 5)]
        assert list(db.execute("SELECT id, error FROM ev_dead_letters")) == [(3, "empty")]


def test_a_locked_database_is_retried_until_it_is_free(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    db = tmp_path / "x.db"
    fill(server, [b"x"] * 10)
    Sink(_config(server, db)).run()  # creates the tables
    fill(server, [b"y"] * 5)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    sink = Sink(_config(server, db), target=SQLiteTarget(str(db), TargetSpec("ev"), busy_timeout_ms=20))
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(sink.run()))
    thread.start()
    wait_for(lambda: sink.progress.state == "retrying", 20, "the sink to hit the lock")
    holder.execute("ROLLBACK")
    thread.join(20)
    assert result and sink.progress.last_id == 15 and sink.progress.state == "stopped"


def test_stop_while_following_returns_after_the_batch_in_hand(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    fill(server, [b"x"] * 3)
    sink = Sink(_config(server, tmp_path / "x.db", once=False))
    thread = threading.Thread(target=sink.run)
    thread.start()
    wait_for(lambda: sink.progress.last_id == 3, 20, "delivery")
    sink.stop()
    thread.join(20)
    assert not thread.is_alive() and sink.progress.state == "stopped"


def test_a_database_behind_what_was_read_is_read_again_from_its_position(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    db = tmp_path / "x.db"
    fill(server, [b"%d" % i for i in range(1, 21)])
    Sink(_config(server, db, batch=5)).run()
    with sqlite3.connect(db) as conn:  # someone restores an older copy: rows 11-20 and their position are gone
        conn.execute("DELETE FROM ev WHERE id > 10")
        conn.execute("UPDATE logd_sink_checkpoints SET last_id = 10")
    fill(server, [b"21"])
    Sink(_config(server, db, batch=5)).run()
    with sqlite3.connect(db) as conn:
        assert [r[0] for r in conn.execute("SELECT body FROM ev ORDER BY id")] == [b"%d" % i for i in range(1, 22)]


def test_a_missing_table_fails_before_anything_is_read(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SchemaError, match="no table ev"):
        Sink(_config(server, tmp_path / "x.db", create=False)).run()


def test_two_named_sinks_drain_one_log_into_one_database(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    db = tmp_path / "x.db"
    fill(server, [b"a", b"b"])
    Sink(_config(server, db, name="first", table="ev")).run()
    fill(server, [b"c"])
    Sink(_config(server, db, name="second", table="copy")).run()
    Sink(_config(server, db, name="first", table="ev")).run()
    with sqlite3.connect(db) as conn:
        assert list(conn.execute("SELECT body FROM ev")) == list(conn.execute("SELECT body FROM copy"))
        assert list(conn.execute("SELECT name, last_id FROM logd_sink_checkpoints ORDER BY name")) == [
            ("first", 3), ("second", 3)]


def test_a_database_locked_longer_than_give_up_after_ends_the_run_with_gave_up(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    db = tmp_path / "x.db"
    fill(server, [b"x"] * 10)
    Sink(_config(server, db)).run()  # creates the tables, delivers 1-10
    fill(server, [b"y"] * 5)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # held until the sink has given up
    target = SQLiteTarget(str(db), TargetSpec("ev"), busy_timeout_ms=20)
    sink = Sink(_config(server, db, give_up_after_s=0.5), target=target)
    with pytest.raises(GaveUpError, match="gave up after 0.5 s of retrying: SQLite: database is locked"):
        sink.run()
    assert (sink.progress.state, sink.progress.last_id) == ("failed", 10)
    holder.execute("ROLLBACK")
    assert Sink(_config(server, db, give_up_after_s=0.5)).run().last_id == 15  # the next run resumes
