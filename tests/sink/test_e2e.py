"""`logd sink` end to end: real `logd serve`, real databases, the sink as a child process.

The acceptance of issue 16: 100,000 raw messages and 100,000 JSON ones
into each target, then the table equals the log; the sink killed -9 at ten moments
under a live writer, then ``--once``: the table equals the log.
"""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest

from logd.client import Client
from tests.e2e.conftest import wait_for
from tests.sink.dbs import TargetDB
from tests.sink.helpers import Writer, fill, log_records, run_sink, start_sink, waiting_in_its_tail

N = 100_000
N_JSON = 100_000
JSON_TABLES = {
    "sqlite": 'CREATE TABLE ev (id INTEGER PRIMARY KEY, user TEXT, n INTEGER DEFAULT 7, tags TEXT)',
    "postgresql": 'CREATE TABLE ev (id bigint PRIMARY KEY, "user" text, n integer DEFAULT 7, tags jsonb)',
    "clickhouse": "CREATE TABLE {db}.ev (id UInt64, user String, n Int32 DEFAULT 7, tags String) "
                  "ENGINE = MergeTree ORDER BY id",
}


def raw_bodies(n: int) -> list[bytes]:
    """Bodies with every byte value somewhere, line ends, NULs, quotes, and plain text."""
    special = [bytes(range(256)), b"\r\n", b"\x00\x00", b'"\\\t', "é€😀".encode(), b"\xff\xfe"]
    return [special[i % len(special)] + b"%d" % i if i % 97 == 0 else b"message %08d" % i for i in range(n)]


def test_100k_raw_messages_into_each_target_equal_the_log(start_server, target_db: TargetDB) -> None:  # type: ignore[no-untyped-def]
    server = start_server("--fsync", "never")
    fill(server, raw_bodies(N))
    done = run_sink(server, target_db.url, "ev", "--create", "--once")
    assert done.returncode == 0, done.stderr
    assert target_db.rows("ev") == log_records(server)
    again = run_sink(server, target_db.url, "ev", "--once")  # nothing new: nothing inserted twice
    assert again.returncode == 0, again.stderr
    assert target_db.id_count("ev") == (N, N)


def test_json_messages_into_each_target_fill_their_columns(start_server, target_db: TargetDB) -> None:  # type: ignore[no-untyped-def]
    server = start_server("--fsync", "never")
    target_db.execute(JSON_TABLES[target_db.kind])
    objs = [{"user": f"u{i}", "tags": ["a", i]} if i % 10 == 0 else {"user": f"u{i}", "n": i, "tags": ["a", i]}
            for i in range(N_JSON)]
    fill(server, [json.dumps(o).encode() for o in objs])
    done = run_sink(server, target_db.url, "ev", "--create", "--once", "--format", "json")
    assert done.returncode == 0, done.stderr
    rows = target_db.rows("ev", 'id, "user", n, tags' if target_db.kind == "postgresql" else "id, user, n, tags")
    got = [(int(i), _text(u), int(n), _json(t)) for i, u, n, t in rows]
    want = [(i + 1, o["user"], o.get("n", 7), o["tags"]) for i, o in enumerate(objs)]
    assert got == want


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _json(value: object) -> object:
    return json.loads(value) if isinstance(value, str | bytes) else value


def _position(db: TargetDB) -> int:
    """How far the sink got: the largest id in the table (0: none). Polled often: only max(id) is fetched."""
    try:
        return db.max_id("ev")
    except Exception:  # noqa: BLE001 - the table does not exist yet
        return 0


def test_sink_killed_9_ten_times_under_a_live_writer_then_once_equals_the_log(
    start_server, target_db: TargetDB, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    server = start_server("--fsync", "never")
    rng = random.Random(16)
    # No limit the kills could outlast: it writes until stopped after the last kill, so every sink
    # started (however slowly it starts here) has new records to make progress on.
    writer = Writer(server, limit=10**9)
    writer.start()
    run_sink(server, target_db.url, "ev", "--create", "--once")  # creates the tables
    for kill in range(10):
        goal = _position(target_db) + rng.randrange(1, 400)  # kill once this far: at a random point
        sink = start_sink(server, target_db.url, "ev", "--batch", str(rng.choice([50, 500, 2000])),
                          stderr=tmp_path / "sink.stderr")
        try:
            wait_for(lambda goal=goal: _position(target_db) >= goal, 30, f"progress before kill {kill}")
        finally:
            sink.kill()  # SIGKILL by pid, mid-batch or between batches
            sink.wait(10)
    written = writer.stop()
    assert written > 0
    done = run_sink(server, target_db.url, "ev", "--once")
    assert done.returncode == 0, done.stderr
    log = log_records(server)
    assert target_db.rows("ev") == log
    assert len(log) == written


def test_sigterm_commits_the_batch_in_hand_and_exits_0(start_server, sqlite_db: TargetDB, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server("--fsync", "never")
    # "late" is in the log before the sink starts, so its tail has sent it by the time the tail waits
    # for more; after ten full batches it opens an eleventh that would linger a minute.
    fill(server, [b"x%d" % i for i in range(1000)] + [b"late"])
    sink = start_sink(server, sqlite_db.url, "ev", "--create", "--batch", "100", "--linger-ms", "60000",
                      stderr=tmp_path / "sink.stderr")
    wait_for(lambda: _position(sqlite_db) == 1000, 30, "the first 1000 delivered")
    # SIGTERM only once "late" is certainly in hand (else the sink may rightly stop without it):
    # logd has sent everything (its only tail waits for new records), and after the commit
    # above the sink is inside its tail's short wait, which returns whatever had arrived.
    wait_for(lambda: _logd_sent_everything(server), 30, "logd to send the whole log to the sink")
    wait_for(lambda: waiting_in_its_tail(sink.pid), 30, "the sink to wait for more records")
    sink.send_signal(signal.SIGTERM)
    assert sink.wait(20) == 0, (tmp_path / "sink.stderr").read_text()
    assert sqlite_db.rows("ev")[-1] == (1001, b"late")
    assert sqlite_db.rows("logd_sink_checkpoints", "last_id", order="name") == [(1001,)]


def _logd_sent_everything(server) -> bool:  # type: ignore[no-untyped-def]
    with Client(server.host, server.port) as client:
        stats = client.stats()
    return stats["waiting_tails"] == "1" and stats["output_bytes"] == "0"


@pytest.mark.parametrize("kind", ["sqlite", "postgresql", "clickhouse"])
def test_poison_messages_go_to_dead_letters_and_the_rest_is_delivered(start_server, kind: str, request) -> None:  # type: ignore[no-untyped-def]
    db: TargetDB = request.getfixturevalue({"sqlite": "sqlite_db", "postgresql": "postgres_db",
                                            "clickhouse": "clickhouse_db"}[kind])
    server = start_server("--fsync", "never")
    strict = {"sqlite": 'CREATE TABLE ev (id INTEGER PRIMARY KEY, user TEXT, n INTEGER NOT NULL DEFAULT 7 '
                        "CHECK (typeof(n) = 'integer'), tags TEXT)"}
    db.execute(strict.get(kind, JSON_TABLES[kind]))
    bodies = [json.dumps({"user": f"u{i}", "n": i}).encode() for i in range(1, 301)]
    poison = {37: b"{not json", 120: b'{"user": "x", "colour": "red"}', 121: b"[1, 2]",
              250: b'{"user": "x", "n": "many"}'}
    for i, body in poison.items():
        bodies[i - 1] = body
    fill(server, bodies)
    done = run_sink(server, db.url, "ev", "--create", "--once", "--format", "json", "--batch", "100")
    assert done.returncode == 0, done.stderr
    assert [r[0] for r in db.rows("ev", "id")] == [i for i in range(1, 301) if i not in poison]
    dead = db.rows("ev_dead_letters", "id, body, error")
    assert [(int(d[0]), bytes(d[1])) for d in dead] == sorted(poison.items())
    errors = {int(d[0]): _text(d[2]) for d in dead}
    assert "not JSON" in errors[37]
    assert "colour" in errors[120]
    assert "not a JSON object" in errors[121]
    assert errors[250]  # the database's own words about "many" in an integer column


def test_on_error_stop_exits_2_with_the_id_and_keeps_what_came_before(start_server, postgres_db: TargetDB) -> None:  # type: ignore[no-untyped-def]
    server = start_server("--fsync", "never")
    postgres_db.execute(JSON_TABLES["postgresql"])
    bodies = [json.dumps({"n": i}).encode() for i in range(1, 51)]
    bodies[29] = b'{"n": "thirty"}'
    fill(server, bodies)
    for _ in range(2):  # stays stopped at the same message until it is dealt with
        done = run_sink(server, postgres_db.url, "ev", "--create", "--once", "--format", "json",
                        "--on-error", "stop")
        assert done.returncode == 2, done.stderr
        assert "message 30 cannot be delivered" in done.stderr
        assert [r[0] for r in postgres_db.rows("ev", "id")] == list(range(1, 30))
        assert postgres_db.rows("logd_sink_checkpoints", "last_id", order="name") == [(29,)]
