"""The PostgreSQL target (psycopg 3): COPY the batch, update the checkpoint row, one transaction.

``--format raw`` writes a binary COPY stream built here in one piece (the
fastest way into PostgreSQL: no per-value adaptation; it needs ``id
bigint`` and ``body bytea`` or ``text``). ``--format json`` uses a text COPY
per set of columns, so PostgreSQL parses each value into its column's type
(numbers, timestamps, jsonb, ...); a value it cannot parse is a bad row.
The checkpoint row is locked (``FOR UPDATE``) at the start of each
transaction, so even two sinks started by mistake under one name cannot
both deliver a batch.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import psycopg

from .errors import BadRowsError, DatabaseUnavailableError, SchemaError, SinkError
from .rows import DeadLetter, Row, Rows, by_shape
from .target import CHECKPOINT_TABLE, Target, TargetSpec, missing_table_hint

CONNECT_TIMEOUT_S = 10
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)  # signature, flags, no header extension
COPY_TRAILER = struct.pack(">h", -1)
_ROW_HEAD = struct.Struct(">hiqi")  # 2 fields; id: 8 bytes, int8; body: its length
BAD_DATA_CLASSES = ("22", "23", "54")  # data exception, integrity constraint, program limit (value too large)
RAW_BODY_TYPES = ("bytea", "text", "character varying")


class PostgresTarget(Target):
    """A table in a PostgreSQL database, reached by a libpq URL."""

    def __init__(self, url: str, spec: TargetSpec) -> None:
        self.url = url
        self.spec = spec
        self._conn: psycopg.Connection[Any] | None = None
        self._types: dict[str, str] = {}

    def describe(self) -> str:
        info = psycopg.conninfo.conninfo_to_dict(self.url)
        return f"postgresql://{info.get('host', '')}:{info.get('port', '5432')}/{info.get('dbname', '')}"

    @property
    def conn(self) -> psycopg.Connection[Any]:
        if self._conn is None:
            raise SinkError("the PostgreSQL target is not open")
        return self._conn

    def open(self) -> None:
        with _errors():
            try:
                self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                                             application_name=f"logd-sink-{self.spec.name}")
            except psycopg.ProgrammingError as exc:  # a malformed URL
                raise SinkError(f"PostgreSQL: {exc}") from None
            if self.spec.create:
                self._create()
            self._types = self._column_types(self.spec.table)
            self.columns = tuple(self._types)
            self._check()

    def _create(self) -> None:
        t, d = _ident(self.spec.table), _ident(self.spec.dead_table)
        if not self.spec.json:
            self.conn.execute(f"CREATE TABLE IF NOT EXISTS {t} (id bigint PRIMARY KEY, body bytea)")
        self.conn.execute(f"CREATE TABLE IF NOT EXISTS {d} (id bigint NOT NULL, body bytea, error text NOT NULL, "
                          "failed_at timestamptz NOT NULL DEFAULT now())")
        self.conn.execute(f"CREATE TABLE IF NOT EXISTS {CHECKPOINT_TABLE} (name text PRIMARY KEY, "
                          "table_name text NOT NULL, last_id bigint NOT NULL)")

    def _column_types(self, table: str) -> dict[str, str]:
        rows = self.conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = %s ORDER BY ordinal_position", (table,)
        ).fetchall()
        return {name: kind for name, kind in rows}

    def _check(self) -> None:
        spec, hint = self.spec, " (add --create to create it)"
        if not self._types:
            raise SchemaError(f"no table {spec.table}{missing_table_hint(spec)}")
        need = ("id",) if spec.json else ("id", "body")
        missing = [c for c in need if c not in self._types]
        if missing:
            raise SchemaError(f"table {spec.table} has no column {', '.join(missing)}")
        if not spec.json and (self._types["id"] != "bigint" or self._types["body"] not in RAW_BODY_TYPES):
            raise SchemaError(f"table {spec.table}: --format raw needs id bigint and body bytea or text, "
                              f"not {self._types['id']} and {self._types['body']}")
        for table, cols in ((spec.dead_table, ("id", "body", "error")),
                            (CHECKPOINT_TABLE, ("name", "table_name", "last_id"))):
            have = self._column_types(table)
            if not have:
                raise SchemaError(f"no table {table}{hint}")
            if any(c not in have for c in cols):
                raise SchemaError(f"table {table} lacks one of the columns {', '.join(cols)}")

    def _position(self, lock: bool) -> int:
        sql = f"SELECT table_name, last_id FROM {CHECKPOINT_TABLE} WHERE name = %s" + (" FOR UPDATE" if lock else "")
        row = self.conn.execute(sql, (self.spec.name,)).fetchone()
        if row is None:
            return 0
        if row[0] != self.spec.table:
            raise SchemaError(f"the sink named {self.spec.name!r} delivers into {row[0]}, not {self.spec.table}: "
                              "give this sink another --name")
        return int(row[1])

    def position(self) -> int:
        with _errors():
            return self._position(lock=False)

    def begin(self) -> int:
        with _errors():
            self.conn.execute("BEGIN")
            return self._position(lock=True)

    def savepoint(self) -> None:
        with _errors():
            self.conn.execute("SAVEPOINT logd_sink")

    def rollback_savepoint(self) -> None:
        with _errors():
            self.conn.execute("ROLLBACK TO SAVEPOINT logd_sink")
            self.conn.execute("RELEASE SAVEPOINT logd_sink")

    def release(self) -> None:
        with _errors():
            self.conn.execute("RELEASE SAVEPOINT logd_sink")

    def insert(self, rows: Rows) -> None:
        t = _ident(self.spec.table)
        with _errors(bad_rows=True), self.conn.cursor() as cur:
            if not self.spec.json:  # raw: the records themselves, as one binary stream
                with cur.copy(f"COPY {t} (id, body) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.write(binary_copy(rows))
                return
            for keys, group in by_shape(cast(Sequence[Row], rows)).items():
                names = ", ".join(_ident(k) for k in keys)
                with cur.copy(f"COPY {t} (id, {names}) FROM STDIN") as copy:
                    for row in group:
                        copy.write_row((row.id, *row.values))

    def insert_dead(self, letters: Sequence[DeadLetter]) -> None:
        with _errors(), self.conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {_ident(self.spec.dead_table)} (id, body, error) VALUES (%s, %s, %s)",
                            [(x.id, x.body, x.error.replace("\x00", "")) for x in letters])

    def commit(self, last_id: int) -> None:
        with _errors():
            self.conn.execute(
                f"INSERT INTO {CHECKPOINT_TABLE} (name, table_name, last_id) VALUES (%s, %s, %s) "
                "ON CONFLICT (name) DO UPDATE SET last_id = EXCLUDED.last_id",
                (self.spec.name, self.spec.table, last_id),
            )
            self.conn.execute("COMMIT")

    def rollback(self) -> None:
        if self._conn is not None and not self._conn.closed:
            try:
                self._conn.execute("ROLLBACK")
            except psycopg.Error:
                pass

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


def binary_copy(rows: Rows) -> bytes:
    """The rows (id, body) as one PostgreSQL binary COPY stream, header to trailer."""
    pack = _ROW_HEAD.pack
    parts = [COPY_HEADER]
    for row in rows:
        id_, body = row[0], row[1]
        parts.append(pack(2, 8, id_, len(body)))
        parts.append(body)
    parts.append(COPY_TRAILER)
    return b"".join(parts)


def _ident(name: str) -> str:
    """A quoted identifier (names are checked to be letters, digits and _ before they get here)."""
    return '"' + name.replace('"', '""') + '"'


@contextmanager
def _errors(bad_rows: bool = False) -> Iterator[None]:
    """psycopg errors as sink errors: bad rows (only while inserting), unreachable, or fatal."""
    try:
        yield
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        raise DatabaseUnavailableError(f"PostgreSQL: {_message(exc)}") from None
    except psycopg.Error as exc:
        state = exc.sqlstate or ""
        if bad_rows and (state[:2] in BAD_DATA_CLASSES or (not state and isinstance(exc, psycopg.DataError))):
            raise BadRowsError(_message(exc)) from None
        if bad_rows and not state and isinstance(exc, psycopg.ProgrammingError):  # a value it cannot adapt
            raise BadRowsError(_message(exc)) from None
        raise SinkError(f"PostgreSQL: {_message(exc)}") from None


def _message(exc: BaseException) -> str:
    """The server's message on one line (with its CONTEXT, which names the COPY line and column)."""
    text = " ".join(str(exc).split())
    return text[:500] if text else type(exc).__name__
