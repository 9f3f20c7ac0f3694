"""The SQLite target: rows, dead letters and the checkpoint row in one transaction.

One ``executemany`` per group of rows with the same columns, inside an
explicit ``BEGIN IMMEDIATE`` ... ``COMMIT`` that also updates the sink's row
in ``logd_sink_checkpoints``; after a crash the database holds the batch
and its checkpoint, or neither. The journal mode is left as the database
has it (WAL is recommended when other programs read the table meanwhile).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, cast

from .errors import BadRowsError, DatabaseUnavailableError, SchemaError, SinkError
from .rows import DeadLetter, Row, Rows, by_shape
from .target import CHECKPOINT_TABLE, Target, TargetSpec, missing_table_hint

BUSY_TIMEOUT_MS = 10_000


class SQLiteTarget(Target):
    """A table in an SQLite file (created if missing)."""

    reads_ahead = False

    def __init__(self, path: str, spec: TargetSpec, busy_timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
        self.path = path
        self.spec = spec
        self.busy_timeout_ms = busy_timeout_ms  # how long a statement waits for another writer's lock
        self._db: sqlite3.Connection | None = None

    def describe(self) -> str:
        return f"sqlite:{self.path}"

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise SinkError("the SQLite target is not open")
        return self._db

    def open(self) -> None:
        try:
            # isolation_level=None: we write BEGIN/COMMIT ourselves, so nothing commits behind our back.
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=self.busy_timeout_ms / 1000)
            if self.spec.create:
                self._create()
            self.columns = self._check()
        except sqlite3.OperationalError as exc:
            self.close()
            raise _classify(exc) from None

    def _create(self) -> None:
        if not self.spec.json:  # the columns JSON bodies fill are the user's to declare
            self.db.execute(f'CREATE TABLE IF NOT EXISTS "{self.spec.table}" (id INTEGER PRIMARY KEY, body BLOB)')
        self.db.execute(
            f'CREATE TABLE IF NOT EXISTS "{self.spec.dead_table}" '
            "(id INTEGER NOT NULL, body BLOB, error TEXT NOT NULL, failed_at TEXT DEFAULT CURRENT_TIMESTAMP)"
        )
        self.db.execute(
            f"CREATE TABLE IF NOT EXISTS {CHECKPOINT_TABLE} "
            "(name TEXT PRIMARY KEY, table_name TEXT NOT NULL, last_id INTEGER NOT NULL)"
        )

    def _table_columns(self, table: str) -> tuple[str, ...]:
        return tuple(row[1] for row in self.db.execute(f'PRAGMA table_info("{table}")'))

    def _check(self) -> tuple[str, ...]:
        hint = " (add --create to create it)"
        columns = self._table_columns(self.spec.table)
        if not columns:
            raise SchemaError(f"no table {self.spec.table} in {self.path}{missing_table_hint(self.spec)}")
        _require(columns, ("id",) if self.spec.json else ("id", "body"), self.spec.table)
        _require(self._table_columns(self.spec.dead_table), ("id", "body", "error"), self.spec.dead_table, hint)
        _require(self._table_columns(CHECKPOINT_TABLE), ("name", "table_name", "last_id"), CHECKPOINT_TABLE, hint)
        return columns

    def position(self) -> int:
        try:
            row = self.db.execute(
                f"SELECT table_name, last_id FROM {CHECKPOINT_TABLE} WHERE name = ?", (self.spec.name,)
            ).fetchone()
        except sqlite3.OperationalError as exc:
            raise _classify(exc) from None
        if row is None:
            return 0
        _same_table(self.spec, row[0])
        return int(row[1])

    def begin(self) -> int:
        self._run("BEGIN IMMEDIATE")  # takes the write lock now: the position read next stays true
        return self.position()

    def savepoint(self) -> None:
        self._run("SAVEPOINT logd_sink")

    def rollback_savepoint(self) -> None:
        self._run("ROLLBACK TO logd_sink")
        self._run("RELEASE logd_sink")

    def release(self) -> None:
        self._run("RELEASE logd_sink")

    def insert(self, rows: Rows) -> None:
        t = self.spec.table
        try:
            if not self.spec.json:  # raw: the records themselves; (id, body) tuples are bound as they are
                self.db.executemany(f'INSERT INTO "{t}" (id, body) VALUES (?, ?)', rows)
                return
            for keys, group in by_shape(cast(Sequence[Row], rows)).items():
                names = ", ".join(f'"{k}"' for k in keys)
                marks = ", ".join("?" * (len(keys) + 1))
                sql = f'INSERT INTO "{t}" (id, {names}) VALUES ({marks})'
                self.db.executemany(sql, [(r.id, *r.values) for r in group])
        except (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError, sqlite3.ProgrammingError,
                OverflowError, TypeError, ValueError) as exc:
            raise BadRowsError(f"{type(exc).__name__}: {exc}") from None
        except sqlite3.OperationalError as exc:
            raise _classify(exc) from None

    def insert_dead(self, letters: Sequence[DeadLetter]) -> None:
        sql = f'INSERT INTO "{self.spec.dead_table}" (id, body, error) VALUES (?, ?, ?)'
        self._run(sql, [tuple(x) for x in letters], many=True)

    def commit(self, last_id: int) -> None:
        self._run(
            f"INSERT INTO {CHECKPOINT_TABLE} (name, table_name, last_id) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET last_id = excluded.last_id",
            (self.spec.name, self.spec.table, last_id),
        )
        self._run("COMMIT")

    def rollback(self) -> None:
        if self._db is not None and self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def close(self) -> None:
        if self._db is not None:
            self.rollback()
            self._db.close()
            self._db = None

    def _run(self, sql: str, args: Any = (), many: bool = False) -> None:
        try:
            if many:
                self.db.executemany(sql, args)
            else:
                self.db.execute(sql, args)
        except sqlite3.OperationalError as exc:
            raise _classify(exc) from None


def _classify(exc: sqlite3.OperationalError) -> SinkError:
    """A locked or busy database is worth waiting for; anything else (no such table, ...) is not."""
    text = str(exc)
    if "locked" in text or "busy" in text or "disk I/O" in text:
        return DatabaseUnavailableError(f"SQLite: {text}")
    return SinkError(f"SQLite: {text}")


def _require(have: tuple[str, ...], need: tuple[str, ...], table: str, hint: str = "") -> None:
    if not have:
        raise SchemaError(f"no table {table}{hint}")
    missing = [c for c in need if c not in have]
    if missing:
        raise SchemaError(f"table {table} has no column {', '.join(missing)}")


def _same_table(spec: TargetSpec, recorded: str) -> None:
    """A sink name belongs to one table: its position means nothing for another."""
    if recorded != spec.table:
        raise SchemaError(
            f"the sink named {spec.name!r} delivers into {recorded}, not {spec.table}: "
            "give this sink another --name"
        )
