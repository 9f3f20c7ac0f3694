"""logd.sink.clickhouse against a real clickhouse-server: exact bytes, defaults, position, errors sorted."""

from __future__ import annotations

import socket
import threading

import pytest

from logd.sink.clickhouse import ClickHouseTarget, varint
from logd.sink.errors import BadRowsError, DatabaseUnavailableError, SchemaError, SinkError
from logd.sink.rows import RAW_KEYS, DeadLetter, Row
from logd.sink.target import TargetSpec
from tests.sink.dbs import ClickHouseDB


def _open(db: ClickHouseDB, **kw: object) -> ClickHouseTarget:
    target = ClickHouseTarget(db.url, TargetSpec("ev", **kw))  # type: ignore[arg-type]
    target.open()
    return target


def test_varint_is_leb128() -> None:
    assert [varint(n) for n in (0, 127, 128, 300, 1 << 20)] == [b"\0", b"\x7f", b"\x80\x01", b"\xac\x02",
                                                               b"\x80\x80\x40"]


def test_row_binary_keeps_every_byte(clickhouse_db: ClickHouseDB) -> None:
    target = _open(clickhouse_db, create=True)
    bodies = [bytes(range(256)), b"", b"\t\n\\", b"y" * 300]
    target.insert([Row(i + 1, b, RAW_KEYS, (b,)) for i, b in enumerate(bodies)])
    assert clickhouse_db.rows("ev") == [(i + 1, b) for i, b in enumerate(bodies)]


def test_the_position_is_the_largest_id_in_the_table_or_its_dead_letters(clickhouse_db: ClickHouseDB) -> None:
    target = _open(clickhouse_db, create=True)
    assert target.begin() == 0
    target.insert([Row(1, b"a", RAW_KEYS, (b"a",)), Row(2, b"b", RAW_KEYS, (b"b",))])
    assert target.begin() == 2
    target.insert_dead([DeadLetter(3, b"\xff", "why")])
    assert target.begin() == 3
    assert clickhouse_db.rows("ev_dead_letters", "id, body, error") == [(3, b"\xff", b"why")]


def test_json_rows_lacking_a_column_get_its_default_expression(clickhouse_db: ClickHouseDB) -> None:
    clickhouse_db.execute("CREATE TABLE {db}.ev (id UInt64, user String, n Int32 DEFAULT 7, "
                          "d Date DEFAULT toDate('2020-02-02')) ENGINE = MergeTree ORDER BY id")
    target = _open(clickhouse_db, create=True, json=True)
    target.insert([Row(1, b"", ("user", "n"), ("a", 1)), Row(2, b"", ("user",), ("b",))])  # mixed: evaluated
    target.insert([Row(3, b"", ("user",), ("c",))])  # one shape: ClickHouse fills the rest itself
    assert clickhouse_db.rows("ev", "id, user, n, d") == [
        (1, b"a", b"1", b"2020-02-02"), (2, b"b", b"7", b"2020-02-02"), (3, b"c", b"7", b"2020-02-02")]


def test_defaults_that_depend_on_other_columns_split_the_rows_by_shape(clickhouse_db: ClickHouseDB) -> None:
    clickhouse_db.execute("CREATE TABLE {db}.ev (id UInt64, n Int32, m Int32 DEFAULT n * 2) "
                          "ENGINE = MergeTree ORDER BY id")
    target = _open(clickhouse_db, create=True, json=True)
    with pytest.raises(BadRowsError, match="depend on other columns"):
        target.insert([Row(1, b"", ("n", "m"), (1, 1)), Row(2, b"", ("n",), (5,))])
    target.insert([Row(2, b"", ("n",), (5,))])
    assert clickhouse_db.rows("ev", "id, n, m") == [(2, b"5", b"10")]


def test_a_value_clickhouse_cannot_parse_is_a_bad_row_and_nothing_of_the_insert_lands(
    clickhouse_db: ClickHouseDB,
) -> None:
    clickhouse_db.execute("CREATE TABLE {db}.ev (id UInt64, n Int32) ENGINE = MergeTree ORDER BY id")
    target = _open(clickhouse_db, create=True, json=True)
    with pytest.raises(BadRowsError, match="Code: 2[67]"):
        target.insert([Row(1, b"", ("n",), (1,)), Row(2, b"", ("n",), ({"a": 1},))])
    assert clickhouse_db.rows("ev", "id") == []


def test_missing_tables_and_wrong_types_are_clear_errors(clickhouse_db: ClickHouseDB) -> None:
    with pytest.raises(SchemaError, match="no table ev .*--create"):
        _open(clickhouse_db)
    clickhouse_db.execute("CREATE TABLE {db}.ev (id UInt32, body String) ENGINE = MergeTree ORDER BY id")
    with pytest.raises(SchemaError, match="needs id UInt64"):
        _open(clickhouse_db, create=True)


def test_an_unreachable_server_is_worth_retrying() -> None:
    from bench.databases import free_port

    target = ClickHouseTarget(f"clickhouse://127.0.0.1:{free_port()}/default", TargetSpec("ev"))
    with pytest.raises(DatabaseUnavailableError):
        target.open()


def test_a_user_and_password_from_the_url_are_what_clickhouse_checks(clickhouse_db: ClickHouseDB) -> None:
    # bench/databases.py configures the user sinker with the password "s3cret pass".
    good = clickhouse_db.url.replace("clickhouse://", "clickhouse://sinker:s3cret%20pass@")
    target = ClickHouseTarget(good, TargetSpec("ev", create=True))
    target.open()
    target.insert([(1, b"a")])
    assert clickhouse_db.rows("ev") == [(1, b"a")]
    bad = clickhouse_db.url.replace("clickhouse://", "clickhouse://sinker:wrong-one@")
    with pytest.raises(SinkError, match="Wrong password") as info:
        ClickHouseTarget(bad, TargetSpec("ev")).open()
    assert "wrong-one" not in str(info.value)


def test_credentials_travel_in_headers_not_in_the_url() -> None:
    # What goes on the wire, caught by a listener on loopback that answers as ClickHouse does to SELECT 1.
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            seen.append(data)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n1\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    target = ClickHouseTarget(f"clickhouse://sinker:s3cr%C3%A9t@127.0.0.1:{port}/db", TargetSpec("ev"))
    assert target.query("SELECT 1") == b"1\n"
    target.close()
    thread.join(10)
    listener.close()
    request_line, _, rest = seen[0].partition(b"\r\n")
    assert b"sinker" not in request_line and b"s3cr" not in request_line
    headers = rest.lower()
    assert b"x-clickhouse-user: sinker\r\n" in headers
    assert "x-clickhouse-key: s3crét\r\n".encode() in headers  # UTF-8, as typed in the URL
