"""What every target database does for a sink, and choosing one by URL.

A target holds one table (``id`` + the mapped columns), the sink's own
checkpoint and dead-letter tables, and knows how to insert a batch of rows
atomically with the sink's position. The pipeline drives it as::

    target.open()                       # connect; check (or create) the tables
    start = target.position() + 1       # the last id delivered, 0: none yet
    position = target.begin()           # the same, read again inside the transaction
    target.savepoint(); target.insert(rows); target.release()
    target.insert_dead(letters)         # rows that could not be inserted
    target.commit(last_id)              # rows, dead letters and position: all or nothing

SQLite and PostgreSQL keep the position in ``logd_sink_checkpoints`` and
write it in the transaction of the rows. ClickHouse has no transactions:
each insert is atomic and in id order, so its position is the largest id
in the table or its dead letters, read when it connects and followed after
each insert; `savepoint` and `commit` do nothing.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from ..url import hide_token
from .errors import SinkError
from .rows import DeadLetter, Rows

__all__ = ["CHECKPOINT_TABLE", "Target", "TargetSpec", "missing_table_hint", "open_target", "parse_target"]

CHECKPOINT_TABLE = "logd_sink_checkpoints"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def check_identifier(name: str, what: str) -> str:
    """A table or sink name: letters, digits and underscores, so it can be quoted safely anywhere."""
    if not _NAME.match(name) or len(name) > 48:
        raise SinkError(f"bad {what} {name!r}: use letters, digits and _ (at most 48), not starting with a digit")
    return name


@dataclass(frozen=True)
class TargetSpec:
    """What a target is asked to hold: which table, for which sink, in which format, created or not."""

    table: str
    name: str = "default"
    create: bool = False
    json: bool = False  # rows are mapped `Row`s (--format json, or a program's mapper); else raw records

    @property
    def dead_table(self) -> str:
        return f"{self.table}_dead_letters"


class Target(ABC):
    """One table in one database, written by one sink (see the module docstring for the protocol)."""

    spec: TargetSpec
    columns: tuple[str, ...] = ()  # the table's columns, known after open()
    # Read the next batch while this one is delivered: worth it when the database works in its own
    # process; SQLite works in ours, where a reading thread would only take turns with it for the GIL.
    reads_ahead: bool = True

    @abstractmethod
    def open(self) -> None:
        """Connect, then check the tables (create them with ``spec.create``); SchemaError if unusable."""

    @abstractmethod
    def position(self) -> int:
        """The id of the last message delivered (0: none yet)."""

    @abstractmethod
    def begin(self) -> int:
        """Start the transaction that the next `commit` ends; return the position as it holds it.

        Read inside the transaction (and locked, where the database can), so
        a batch whose commit was lost with the connection is never
        delivered twice: the caller skips what the position already covers.
        """

    def savepoint(self) -> None:  # noqa: B027 - a no-op for targets without transactions
        """Mark a point that `rollback_savepoint` returns to (a failed insert leaves nothing behind)."""

    def rollback_savepoint(self) -> None:  # noqa: B027 - a no-op for targets without transactions
        """Undo everything since the last `savepoint`."""

    def release(self) -> None:  # noqa: B027 - a no-op for targets without transactions
        """Forget the last `savepoint`, keeping what was done since."""

    @abstractmethod
    def insert(self, rows: Rows) -> None:
        """Insert the rows (ascending ids); BadRowsError if the database refused them for their content."""

    @abstractmethod
    def insert_dead(self, letters: Sequence[DeadLetter]) -> None:
        """Record messages that could not be delivered, with the reason."""

    @abstractmethod
    def commit(self, last_id: int) -> None:
        """Store ``last_id`` as the position and commit everything since `begin`."""

    def rollback(self) -> None:  # noqa: B027 - a no-op for targets without transactions
        """Abandon the transaction (best effort: the connection may be gone)."""

    @abstractmethod
    def close(self) -> None:
        """Close the connection (open() connects again)."""

    def describe(self) -> str:
        """The target for messages, without passwords."""
        return type(self).__name__


def missing_table_hint(spec: TargetSpec) -> str:
    """What to do about a missing target table."""
    if spec.json:
        return " (with --format json, create it with id and the columns the JSON bodies fill)"
    return " (add --create to create it)"


def parse_target(url: str) -> tuple[str, str]:
    """(kind, url): kind is sqlite, postgresql or clickhouse; SinkError for anything else."""
    scheme = urlsplit(url).scheme.lower()
    kinds = {"sqlite": "sqlite", "postgresql": "postgresql", "postgres": "postgresql", "clickhouse": "clickhouse"}
    if scheme not in kinds:
        raise SinkError(
            f"unknown target {hide_token(url)!r}: use sqlite:///path/file.db, postgresql://user@host:port/db "
            "or clickhouse://host:8123/db"
        )
    return kinds[scheme], url


def open_target(url: str, spec: TargetSpec) -> Target:
    """The target for a URL (not yet opened)."""
    check_identifier(spec.table, "table name")
    check_identifier(spec.name, "sink name")
    kind, url = parse_target(url)
    if kind == "sqlite":
        from .sqlite import SQLiteTarget

        parts = urlsplit(url)
        path = unquote(parts.netloc + parts.path) if parts.netloc else unquote(parts.path)
        if not path or path == "/":
            raise SinkError(f"no file in {url!r}: use sqlite:///relative.db or sqlite:////absolute/path.db")
        return SQLiteTarget(path.removeprefix("/") if not parts.netloc else path, spec)
    if kind == "postgresql":
        from .postgres import PostgresTarget

        return PostgresTarget(url, spec)
    from .clickhouse import ClickHouseTarget

    return ClickHouseTarget(url, spec)
