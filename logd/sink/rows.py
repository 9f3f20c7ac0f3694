"""From log records to table rows: the raw and JSON mappings, and dead letters.

A mapper turns one record into the columns it fills (besides ``id``, which
is always the record's id). It raises ValueError for a body it cannot map;
that record becomes a dead letter with the message as its error. A program
that runs a sink in-process can pass its own mapper (see `logd.sink.Sink`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from ..protocol import Record, RecordRow

__all__ = ["DeadLetter", "Mapper", "Row", "Rows", "json_mapper", "map_records", "raw_mapper"]

Mapper = Callable[[Record], Mapping[str, Any]]

RAW_KEYS = ("body",)


class Row(NamedTuple):
    """One row to insert: the record's id and body, and the other columns it fills."""

    id: int
    body: bytes
    keys: tuple[str, ...]  # column names, without "id"
    values: tuple[Any, ...]  # one per key, as plain Python values (dicts and lists already JSON text)


# What a target inserts: with --format raw the records as read, (id, body) tuples built in C (id and
# body are the columns, and nothing is built per record in Python), else mapped Rows. Both are tuples
# with the id first and the body second.
Rows = Sequence[Row] | Sequence[RecordRow]


class DeadLetter(NamedTuple):
    """A message that could not be delivered, with the reason."""

    id: int
    body: bytes
    error: str


def raw_mapper(record: Record) -> Mapping[str, Any]:
    """``--format raw``: the body, as bytes, into the column ``body``."""
    return {"body": record.body}


def json_mapper(record: Record) -> Mapping[str, Any]:
    """``--format json``: the body is a JSON object; its keys name the columns they fill."""
    return _json_object(record.body)


# The json module's C scanner, called directly: json.loads on bytes spends more time guessing the
# encoding and in two Python frames than in scanning a small object.
_scan_once: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
_JSON_SPACE = " \t\n\r"
_SCALARS = frozenset({str, int, float, bool, type(None)})  # JSON values a driver takes as they are


def _json_object(body: bytes) -> dict[str, Any]:
    """The JSON object in ``body``, as json.loads reads it; ValueError (with its reason) if it is not one."""
    if body[:1] == b"{":  # the usual case: UTF-8 text of an object; anything else takes json.loads' path
        try:
            text = body.decode()
            value, end = _scan_once(text, 0)
            if end == len(text) or not text[end:].strip(_JSON_SPACE):
                return value  # type: ignore[no-any-return]
        except (ValueError, UnicodeDecodeError, StopIteration, RecursionError):
            pass  # json.loads below says why, in its own words
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    except RecursionError:  # the decoder recurses per level: a body nested too deep is not a crash
        raise ValueError("not JSON this sink can take: nested too deep") from None
    if not isinstance(value, dict):
        raise ValueError(f"not a JSON object but {type(value).__name__}")
    return value


def plain(value: Any) -> Any:
    """A JSON value as a database driver takes it: objects and arrays as JSON text."""
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return value


def map_records(
    records: Sequence[RecordRow], mapper: Mapper, columns: Sequence[str]
) -> tuple[Rows, list[DeadLetter]]:
    """Map each (id, body) record; those that cannot be mapped (or name unknown columns) become dead letters.

    With `raw_mapper` the records are the rows, untouched. A program's own
    mapper gets each as a `Record`.
    """
    if mapper is raw_mapper:
        return records, []
    rows: list[Row] = []
    dead: list[DeadLetter] = []
    known = frozenset(columns)
    shapes: dict[tuple[str, ...], tuple[str, ...]] = {}  # one shared tuple per key set
    own = None if mapper is json_mapper else mapper
    scalars = _SCALARS
    for id_, body in records:
        try:
            mapped = _json_object(body) if own is None else own(Record(id_, body))
            keys = tuple(mapped)
            shape = shapes.get(keys)
            if shape is None:
                _check_keys(keys, known)
                shape = shapes[keys] = keys
            rows.append(Row(id_, body, shape, tuple([v if type(v) in scalars else plain(v) for v in mapped.values()])))
        except ValueError as exc:
            dead.append(DeadLetter(id_, body, str(exc)))
        except RecursionError:  # plain()'s json.dumps of a value nested near the limit
            dead.append(DeadLetter(id_, body, "a value nested too deep to store as JSON text"))
    return rows, dead


def by_shape(rows: Sequence[Row]) -> dict[tuple[str, ...], list[Row]]:
    """The rows grouped by the columns they fill (one insert per group; order kept within a group)."""
    if rows and all(r.keys is rows[0].keys for r in rows):
        return {rows[0].keys: list(rows)}
    groups: dict[tuple[str, ...], list[Row]] = {}
    for row in rows:
        groups.setdefault(row.keys, []).append(row)
    return groups


def _check_keys(keys: tuple[str, ...], known: frozenset[str]) -> None:
    if "id" in keys:
        raise ValueError("the body has a key 'id'; the column id holds the log id")
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ValueError(f"no column named {', '.join(map(repr, unknown[:5]))}")
