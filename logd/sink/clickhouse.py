"""The ClickHouse target, over its HTTP interface (standard library only).

ClickHouse has no transactions, so exactly-once rests on two facts: each
batch goes in as one INSERT of one block, which MergeTree makes visible
whole or not at all; and ids go in ascending order, so the position is the
largest id in the table or its dead letters. After a crash, the sink
resumes right after it and a replayed batch can never duplicate a row.
Raw bodies go in as ``RowBinary`` (bytes exactly, nothing escaped); JSON
rows as ``JSONEachRow`` (columns a row lacks take their defaults).

``clickhouse://[user[:password]@]host[:8123]/database``. The user and
password travel in the ``X-ClickHouse-User`` and ``X-ClickHouse-Key``
headers, never in the request's URL (which proxies and logs keep).
"""

from __future__ import annotations

import http.client
import json
import re
import struct
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import unquote, urlencode, urlsplit

from ..url import hide_token
from .errors import BadRowsError, DatabaseUnavailableError, SchemaError, SinkError
from .rows import DeadLetter, Row, Rows
from .target import Target, TargetSpec, check_identifier, missing_table_hint

DEFAULT_HTTP_PORT = 8123
TIMEOUT_S = 60.0
ONE_BLOCK = 1_048_576  # ClickHouse's default max_insert_block_size; an INSERT of more rows asks for one block
# Codes of errors about the data sent (parsing, types, values); an INSERT that gets one changed nothing.
DATA_ERROR_CODES = frozenset({6, 25, 26, 27, 32, 38, 41, 53, 69, 70, 72, 76, 117, 131, 190, 321})
# Codes of passing conditions: overloaded, out of memory, timeouts, network.
BUSY_CODES = frozenset({159, 160, 164, 202, 203, 209, 210, 241, 252, 319})
_CODE = re.compile(rb"Code: (\d+)")
_U64 = struct.Struct("<Q")
_U64_U8 = struct.Struct("<QB")  # an id and a length below 128, whose varint is one byte


class ClickHouseTarget(Target):
    """A MergeTree table in a ClickHouse database, written over HTTP."""

    def __init__(self, url: str, spec: TargetSpec) -> None:
        parts = urlsplit(url)
        self.spec = spec
        self.host = parts.hostname or "127.0.0.1"
        try:
            self.port = parts.port or DEFAULT_HTTP_PORT
        except ValueError:
            raise SinkError(f"bad port in {hide_token(url)!r}") from None
        self.database = check_identifier(parts.path.strip("/") or "default", "database name")
        # Header values as UTF-8 bytes: http.client would encode str as Latin-1 and fail on other letters.
        self._auth = {"X-ClickHouse-User": unquote(parts.username or "default").encode()}
        if parts.password:
            self._auth["X-ClickHouse-Key"] = unquote(parts.password).encode()
        self._http: http.client.HTTPConnection | None = None
        self._default_kinds: dict[str, str] = {}
        self._default_exprs: dict[str, str] = {}
        self._defaults: dict[str, str] = {}  # column -> DEFAULT expression
        self._position: int | None = None  # the last id delivered, as far as this connection knows

    def describe(self) -> str:
        return f"clickhouse://{self.host}:{self.port}/{self.database}"

    def _table(self, name: str) -> str:
        return f"`{self.database}`.`{name}`"

    def query(self, sql: str, data: bytes | None = None, **settings: Any) -> bytes:
        """Run ``sql`` (with ``data`` as the INSERT's rows); the response body, or a sink error."""
        params = {"database": self.database, **settings}
        if data is not None:
            params["query"] = sql
        body = data if data is not None else sql.encode()
        try:
            if self._http is None:
                self._http = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT_S)
            self._http.request("POST", "/?" + urlencode(params), body=body, headers=self._auth)
            response = self._http.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise DatabaseUnavailableError(f"ClickHouse at {self.host}:{self.port}: {exc or type(exc).__name__}") \
                from None
        if response.status == 200:
            return payload
        match = _CODE.search(payload)
        code = int(match.group(1)) if match else 0
        message = " ".join(payload.decode("utf-8", "replace").split())[:500]
        if code in BUSY_CODES or response.status in (502, 503, 504):
            raise DatabaseUnavailableError(f"ClickHouse: {message}")
        if data is not None and code in DATA_ERROR_CODES:
            raise BadRowsError(message)
        raise SinkError(f"ClickHouse: {message}")

    def open(self) -> None:
        self.query("SELECT 1")
        spec = self.spec
        if spec.create:
            if not spec.json:
                self.query(f"CREATE TABLE IF NOT EXISTS {self._table(spec.table)} "
                           "(id UInt64, body String) ENGINE = MergeTree ORDER BY id")
            self.query(f"CREATE TABLE IF NOT EXISTS {self._table(spec.dead_table)} (id UInt64, body String, "
                       "error String, failed_at DateTime DEFAULT now()) ENGINE = MergeTree ORDER BY id")
        types = self._column_types(spec.table)
        if not types:
            raise SchemaError(f"no table {spec.table} in {self.database}{missing_table_hint(spec)}")
        need = ("id",) if spec.json else ("id", "body")
        missing = [c for c in need if c not in types]
        if missing:
            raise SchemaError(f"table {spec.table} has no column {', '.join(missing)}")
        if not spec.json and (types["id"] != "UInt64" or types["body"] != "String"):
            raise SchemaError(f"table {spec.table}: --format raw needs id UInt64 and body String, "
                              f"not {types['id']} and {types['body']}")
        dead = self._column_types(spec.dead_table)
        if not dead:
            raise SchemaError(f"no table {spec.dead_table} in {self.database} (add --create to create it)")
        if any(c not in dead for c in ("id", "body", "error")):
            raise SchemaError(f"table {spec.dead_table} lacks one of the columns id, body, error")
        # MATERIALIZED and ALIAS columns cannot be inserted into; a JSON key naming one is a bad row.
        self.columns = tuple(c for c, kind in self._default_kinds.items() if kind not in ("MATERIALIZED", "ALIAS"))
        self._defaults = {c: self._default_exprs[c] for c, kind in self._default_kinds.items() if kind == "DEFAULT"}

    def _column_types(self, table: str) -> dict[str, str]:
        text = self.query(f"SELECT name, type, default_kind, default_expression FROM system.columns "
                          f"WHERE database = '{self.database}' AND table = '{table}' FORMAT JSONEachRow")
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        if table == self.spec.table:
            self._default_kinds = {r["name"]: r["default_kind"] for r in rows}
            self._default_exprs = {r["name"]: r["default_expression"] for r in rows}
        return {r["name"]: r["type"] for r in rows}

    def position(self) -> int:
        a, b = self._table(self.spec.table), self._table(self.spec.dead_table)
        text = self.query(f"SELECT greatest((SELECT max(id) FROM {a}), (SELECT max(id) FROM {b}))")
        return int(text.strip() or b"0")

    def begin(self) -> int:
        # Read once per connection, then followed: a max(id) per batch would scan the id column of
        # a table that may hold billions of rows. Any failure closes the connection, so the next
        # batch after one reads the position again.
        if self._position is None:
            self._position = self.position()
        return self._position

    def insert(self, rows: Rows) -> None:
        if not rows:
            return
        table = self._table(self.spec.table)
        block = max(ONE_BLOCK, len(rows))  # one block: all rows or none
        if not self.spec.json:  # raw: the records themselves
            self.query(f"INSERT INTO {table} (id, body) FORMAT RowBinary", row_binary(rows),
                       max_insert_block_size=block)
        else:
            self._insert_json(table, cast(Sequence[Row], rows), block)
        self._position = rows[-1][0]

    def _insert_json(self, table: str, rows: Sequence[Row], block: int) -> None:
        listed = list(dict.fromkeys(k for shape in dict.fromkeys(r.keys for r in rows) for k in shape))
        fill = self._fill_defaults(rows, listed)
        columns = ", ".join(f"`{c}`" for c in ("id", *listed))
        self.query(f"INSERT INTO {table} ({columns}) FORMAT JSONEachRow", json_each_row(rows, fill),
                   max_insert_block_size=block)

    def _fill_defaults(self, rows: Sequence[Row], listed: list[str]) -> dict[str, Any]:
        """Values for the DEFAULT columns that some rows give and others lack.

        ClickHouse 18.16 gives a listed column that a JSON row lacks its
        type's zero, not its DEFAULT; so the sink evaluates those defaults
        once for the batch (as ClickHouse does once per block). A default
        that depends on other columns cannot be evaluated alone: then the
        rows are split until each insert has one set of columns, for which
        ClickHouse computes the defaults itself.
        """
        partial = [c for c in listed if c in self._defaults and any(c not in r.keys for r in rows)]
        if not partial:
            return {}
        exprs = ", ".join(f"{self._defaults[c]} AS `{c}`" for c in partial)
        try:
            return dict(json.loads(self.query(f"SELECT {exprs} FORMAT JSONEachRow")))
        except DatabaseUnavailableError:
            raise
        except SinkError:
            raise BadRowsError("rows with different columns, whose defaults depend on other columns") from None

    def insert_dead(self, letters: Sequence[DeadLetter]) -> None:
        parts = []
        for x in letters:
            error = x.error.encode()
            parts += [_U64.pack(x.id), varint(len(x.body)), x.body, varint(len(error)), error]
        self.query(f"INSERT INTO {self._table(self.spec.dead_table)} (id, body, error) FORMAT RowBinary",
                   b"".join(parts))
        self._position = max([x.id for x in letters], default=self._position)

    def commit(self, last_id: int) -> None:
        """Nothing to do: each INSERT was atomic, and the position is the largest id present."""

    def close(self) -> None:
        self._position = None
        if self._http is not None:
            self._http.close()
            self._http = None


def varint(n: int) -> bytes:
    """An unsigned LEB128 number, as RowBinary prefixes a String with its length."""
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def row_binary(rows: Rows) -> bytes:
    """(id UInt64, body String) rows in ClickHouse's RowBinary format."""
    parts = []
    short, pack = _U64_U8.pack, _U64.pack
    for row in rows:
        id_, body = row[0], row[1]
        n = len(body)
        parts.append(short(id_, n) if n < 0x80 else pack(id_) + varint(n))  # one call for most rows
        parts.append(body)
    return b"".join(parts)


def json_each_row(rows: Sequence[Row], fill: dict[str, Any]) -> bytes:
    """One JSON object per line: the id, the mapped columns, and ``fill`` for those a row lacks."""
    lines = []
    for row in rows:
        obj: dict[str, Any] = {"id": row.id}
        try:
            for key, value in zip(row.keys, row.values, strict=True):
                obj[key] = value.decode() if isinstance(value, bytes) else value
            for key, value in fill.items():
                obj.setdefault(key, value)
            lines.append(json.dumps(obj, separators=(",", ":")))
        except (TypeError, ValueError) as exc:  # bytes that are not UTF-8, values JSON cannot hold
            raise BadRowsError(f"row {row.id} cannot be written as JSON: {exc}") from None
    return ("\n".join(lines) + "\n").encode()
