"""`logd sink --format json` survives any body (issue 22, finding 11): what the JSON decoder cannot take
(nesting too deep for its recursion, a number too long, bytes that are not text) is a dead letter, never a crash.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from logd.sink.rows import json_mapper, map_records

from .helpers import fill, run_sink

DEEP = b'{"a":"deep","n":' + b"[" * 5000 + b"]" * 5000 + b"}"  # 10 KB: RecursionError in the decoder

HOSTILE = {
    "deep arrays": DEEP,
    "deep objects": b'{"a":' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}",
    "deep, not an object first": b"[" * 5000 + b"]" * 5000,
    "a number of 5000 digits": b'{"a":' + b"1" * 5000 + b"}",
    "not UTF-8": b'{"a":"caf\xe9"}',
    "UTF-16 with a bad half": b"\xff\xfe{\x00\x00\xd8}\x00",
}


@pytest.mark.parametrize("body", list(HOSTILE.values()), ids=list(HOSTILE))
def test_a_body_the_decoder_cannot_take_is_a_dead_letter(body: bytes) -> None:
    rows, dead = map_records([(1, b'{"a":"ok"}'), (2, body), (3, b'{"a":"after"}')], json_mapper, ["a", "n"])
    assert [r.id for r in rows] == [1, 3]
    assert [(d.id, d.body) for d in dead] == [(2, body)] and dead[0].error


def test_the_sink_delivers_around_a_body_nested_too_deep_and_keeps_it_as_a_dead_letter(  # type: ignore[no-untyped-def]
    server, tmp_path: Path
) -> None:
    db = tmp_path / "x.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE ev (id INTEGER PRIMARY KEY, a TEXT, n TEXT)")
    fill(server, [b'{"a":"before"}', DEEP, b'{"a":"after","n":[1,[2]]}'])
    done = run_sink(server, f"sqlite:///{db}", "ev", "--create", "--once", "--format", "json")
    assert done.returncode == 0, done.stderr  # it was 1: RecursionError, nothing of the batch delivered
    assert "Traceback" not in done.stderr
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT id, a, n FROM ev ORDER BY id").fetchall() == [
            (1, "before", None), (3, "after", json.dumps([1, [2]], separators=(",", ":")))]
        dead = conn.execute("SELECT id, body, error FROM ev_dead_letters").fetchall()
    assert [(i, bytes(b)) for i, b, _e in dead] == [(2, DEEP)] and "nested too deep" in dead[0][2]
