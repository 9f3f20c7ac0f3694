"""The sink keeps exactly-once while the things around it crash: PostgreSQL and logd killed -9 and restarted.

The sink runs as a child process under a live writer; the database or
logd is SIGKILLed by pid at ten moments drawn from a seeded generator, and
restarted on the same port and data. The sink retries with backoff and
resumes where it was; after the writer stops it catches up and ends on
SIGTERM, then a ``--once`` run finds nothing left: the table equals the log.
"""

from __future__ import annotations

import random
import signal
from pathlib import Path

from logd.client import Client
from tests.e2e.conftest import wait_for
from tests.sink.dbs import TargetDB
from tests.sink.helpers import Writer, log_records, run_sink, start_sink

CRASHES = 10  # the "10 random moments"
UNTIL_STOPPED = 10**9  # a writer's limit it never reaches: `Writer.stop` ends it


def _delivered(db: TargetDB) -> int:
    """The sink's checkpoint (0 while the database is down or nothing is delivered yet)."""
    try:
        rows = db.rows("logd_sink_checkpoints", "name, last_id", order="name")
    except Exception:  # noqa: BLE001 - down, or the table is not there yet
        return 0
    return int(rows[0][1]) if rows else 0


def _head(server) -> int:  # type: ignore[no-untyped-def]
    with Client(server.host, server.port) as client:
        return client.head()


def _crash_under_a_live_writer(server, db: TargetDB, tmp_path: Path, crash, seed: int,  # type: ignore[no-untyped-def]
                               logd_crashes: bool = False):
    """Sink ``server`` into ``db`` under a live writer; ``crash()`` (which returns the logd server
    to use from then on) at CRASHES moments; then the sink catches up, stops on SIGTERM, and a
    ``--once`` run finds nothing left. Returns the server, the log's records and the sink's stderr."""
    rng = random.Random(seed)
    # No limit the crashes could outlast: it writes until stopped after the last crash, so every crash
    # cycle (however slow a restart and the sink's backoff are here) has new records to make progress on.
    writer = Writer(server, limit=UNTIL_STOPPED, tolerate_errors=logd_crashes)  # its MSGs fail while logd is down
    writer.start()
    stderr = tmp_path / "sink.stderr"
    sink = start_sink(server, db.url, "ev", "--create", "--batch", "500", "--log-format", "json",
                      "--retry-max-s", "0.5", stderr=stderr)
    try:
        for n in range(CRASHES):
            goal = _delivered(db) + rng.randrange(100, 2000)
            wait_for(lambda goal=goal: _delivered(db) >= goal, 60, f"progress before crash {n}")
            server = crash(server)
        writer.stop()
        head = _head(server)
        wait_for(lambda: _delivered(db) == head, 60, "the sink to catch up")
        sink.send_signal(signal.SIGTERM)
        assert sink.wait(30) == 0, stderr.read_text()
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()
    once = run_sink(server, db.url, "ev", "--once")
    assert once.returncode == 0, once.stderr
    log = log_records(server)
    assert db.rows("ev") == log
    assert len(log) == head
    return stderr.read_text()


def test_postgres_killed_9_and_restarted_under_a_live_writer(
    start_server, postgres_server, postgres_db: TargetDB, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    def crash(server):  # type: ignore[no-untyped-def]
        postgres_server.kill()  # postmaster and backends, SIGKILL: crash recovery at the next start
        postgres_server.start()
        return server

    stderr = _crash_under_a_live_writer(start_server("--fsync", "never"), postgres_db, tmp_path, crash, 1616)
    assert stderr.count('"sink_retrying"') >= CRASHES  # it did see the database go, each time


def test_logd_killed_9_and_restarted_under_a_live_writer(
    start_server, sqlite_db: TargetDB, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    def crash(server):  # type: ignore[no-untyped-def]
        server.kill()
        return start_server("--fsync", "never", data_dir=server.data_dir, port=server.port)

    stderr = _crash_under_a_live_writer(start_server("--fsync", "never"), sqlite_db, tmp_path, crash, 1617,
                                        logd_crashes=True)
    # It did see logd go (the tail also reconnects by itself when logd is back quickly: not every crash shows).
    assert '"sink_retrying"' in stderr
