"""logd.sink.postgres against a real PostgreSQL 15: binary COPY, text COPY by column type, errors sorted."""

from __future__ import annotations

import pytest

from logd.sink.errors import BadRowsError, DatabaseUnavailableError, SchemaError, SinkError
from logd.sink.postgres import PostgresTarget, binary_copy
from logd.sink.rows import RAW_KEYS, Row
from logd.sink.target import TargetSpec
from tests.sink.dbs import PostgresDB


def _open(db: PostgresDB, **kw: object) -> PostgresTarget:
    target = PostgresTarget(db.url, TargetSpec("ev", **kw))  # type: ignore[arg-type]
    target.open()
    return target


def test_binary_copy_keeps_every_byte(postgres_db: PostgresDB) -> None:
    target = _open(postgres_db, create=True)
    bodies = [bytes(range(256)), b"", b"\\N", b"\t\n\r", b"x" * 70_000]
    target.begin()
    target.insert([Row(i + 1, b, RAW_KEYS, (b,)) for i, b in enumerate(bodies)])
    target.commit(len(bodies))
    assert postgres_db.rows("ev") == [(i + 1, b) for i, b in enumerate(bodies)]
    assert target.position() == len(bodies)


def test_the_binary_copy_stream_is_framed_as_postgresql_documents_it() -> None:
    stream = binary_copy([Row(1, b"ab", RAW_KEYS, (b"ab",))])
    assert stream == (b"PGCOPY\n\xff\r\n\x00" + b"\0\0\0\0" + b"\0\0\0\0"
                      + b"\x00\x02" + b"\0\0\0\x08" + b"\0\0\0\0\0\0\0\x01" + b"\0\0\0\x02ab" + b"\xff\xff")


def test_json_values_are_parsed_into_each_columns_type(postgres_db: PostgresDB) -> None:
    postgres_db.execute('CREATE TABLE ev (id bigint PRIMARY KEY, at timestamptz, n numeric, doc jsonb, '
                        'ok boolean, note text DEFAULT \'none\')')
    target = _open(postgres_db, create=True, json=True)
    target.begin()
    target.insert([Row(1, b"", ("at", "n", "doc", "ok"), ("2024-05-01T12:00:00Z", 1.5, '{"a":[1]}', True)),
                   Row(2, b"", ("n",), (7,))])
    target.commit(2)
    rows = postgres_db.rows("ev", "id, at::text, n::text, doc::text, ok, note")
    assert rows == [(1, "2024-05-01 12:00:00+00", "1.5", '{"a": [1]}', True, "none"),
                    (2, None, "7", None, None, "none")]


def test_a_value_postgresql_cannot_take_is_a_bad_row_and_the_savepoint_undoes_it(postgres_db: PostgresDB) -> None:
    postgres_db.execute("CREATE TABLE ev (id bigint PRIMARY KEY, n integer)")
    target = _open(postgres_db, create=True, json=True)
    target.begin()
    target.savepoint()
    with pytest.raises(BadRowsError, match="invalid input syntax for type integer"):
        target.insert([Row(1, b"", ("n",), (1,)), Row(2, b"", ("n",), ("two",))])
    target.rollback_savepoint()
    target.insert([Row(1, b"", ("n",), (1,))])
    target.commit(2)
    assert postgres_db.rows("ev", "id, n") == [(1, 1)]


def test_raw_needs_bigint_ids(postgres_db: PostgresDB) -> None:
    postgres_db.execute("CREATE TABLE ev (id integer PRIMARY KEY, body bytea)")
    with pytest.raises(SchemaError, match="needs id bigint"):
        _open(postgres_db, create=True)


def test_missing_tables_are_clear_errors(postgres_db: PostgresDB) -> None:
    with pytest.raises(SchemaError, match="no table ev .*--create"):
        _open(postgres_db)
    postgres_db.execute("CREATE TABLE ev (id bigint PRIMARY KEY, body bytea)")
    with pytest.raises(SchemaError, match="no table ev_dead_letters"):
        _open(postgres_db)


def test_a_dropped_table_stops_the_sink_rather_than_dead_lettering_every_row(postgres_db: PostgresDB) -> None:
    target = _open(postgres_db, create=True)
    postgres_db.execute("DROP TABLE ev")
    target.begin()
    with pytest.raises(SinkError) as err:
        target.insert([Row(1, b"x", RAW_KEYS, (b"x",))])
    assert not isinstance(err.value, BadRowsError)


def test_an_unreachable_server_is_worth_retrying(postgres_db: PostgresDB) -> None:
    from bench.databases import free_port

    target = PostgresTarget(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", TargetSpec("ev"))
    with pytest.raises(DatabaseUnavailableError, match="Connection refused"):
        target.open()
