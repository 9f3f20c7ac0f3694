"""One handle per target database for the tests: its sink URL, its rows, raw SQL."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import psycopg

from bench.databases import ClickHouse, Postgres


class TargetDB:
    """A place a sink can deliver into, and a way to look at what it delivered."""

    kind = ""
    url = ""

    def rows(self, table: str, columns: str = "id, body", order: str = "id") -> list[tuple[Any, ...]]:
        """Every row of ``table``, ordered by id."""
        raise NotImplementedError

    def execute(self, sql: str) -> None:
        raise NotImplementedError

    def max_id(self, table: str) -> int:
        """The largest id in ``table`` (0: no rows), without fetching the rows."""
        found = self.rows(table, "max(id)", order="1")[0][0]  # ORDER BY 1: the aggregate, one row anyway
        return int(found or 0)  # NULL in SQLite and PostgreSQL, 0 in ClickHouse, for no rows

    def id_count(self, table: str) -> tuple[int, int]:
        """(rows, distinct ids) of ``table``."""
        rows = self.rows(table, "id")
        return len(rows), len({r[0] for r in rows})


class SQLiteDB(TargetDB):
    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"  # sqlite:/// + an absolute path: four slashes

    def rows(self, table: str, columns: str = "id, body", order: str = "id") -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.path) as db:
            return [tuple(r) for r in db.execute(f'SELECT {columns} FROM "{table}" ORDER BY {order}')]

    def execute(self, sql: str) -> None:
        with sqlite3.connect(self.path) as db:
            db.executescript(sql)


class PostgresDB(TargetDB):
    """A fresh schema in the session's PostgreSQL; the sink URL puts it first on the search path."""

    kind = "postgresql"

    def __init__(self, server: Postgres, schema: str) -> None:
        self.server = server
        self.schema = schema
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        self.url = f"{server.url}?options=-csearch_path%3D{schema}"

    def rows(self, table: str, columns: str = "id, body", order: str = "id") -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url) as conn:
            out = conn.execute(f'SELECT {columns} FROM "{table}" ORDER BY {order}').fetchall()
        return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in out]

    def execute(self, sql: str) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql)

    def drop(self) -> None:
        try:
            with psycopg.connect(self.server.url, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")
        except psycopg.OperationalError:
            pass  # the server is down: its whole directory goes at the end of the session


class ClickHouseDB(TargetDB):
    """A fresh database in the session's ClickHouse."""

    kind = "clickhouse"

    def __init__(self, server: ClickHouse, database: str) -> None:
        self.server = server
        self.database = database
        server.query(f"CREATE DATABASE {database}")
        self.url = f"clickhouse://127.0.0.1:{server.http_port}/{database}"

    def rows(self, table: str, columns: str = "id, body", order: str = "id") -> list[tuple[Any, ...]]:
        """Rows as (id, body bytes, ...): read as TSV with ClickHouse's escapes undone."""
        data = self.server.query(f"SELECT {columns} FROM {self.database}.{table} ORDER BY {order} FORMAT TabSeparated")
        out = []
        for line in data.split(b"\n")[:-1]:
            fields = [_unescape(f) for f in line.split(b"\t")]
            out.append((int(fields[0]), *fields[1:]))
        return out

    def execute(self, sql: str) -> None:
        self.server.query(sql.replace("{db}", self.database))

    def drop(self) -> None:
        try:
            self.server.query(f"DROP DATABASE IF EXISTS {self.database}")
        except OSError:
            pass


_TSV_ESCAPES = {ord("n"): b"\n", ord("t"): b"\t", ord("r"): b"\r", ord("0"): b"\0", ord("\\"): b"\\",
                ord("'"): b"'", ord("b"): b"\b", ord("f"): b"\f"}


def _unescape(field: bytes) -> bytes:
    if b"\\" not in field:
        return field
    out = bytearray()
    i = 0
    while i < len(field):
        c = field[i]
        if c == 0x5C and i + 1 < len(field):
            out += _TSV_ESCAPES.get(field[i + 1], bytes([field[i + 1]]))
            i += 2
        else:
            out.append(c)
            i += 1
    return bytes(out)
