"""What the server sees of a sink: its position as the named cursor ``sink.<name>``, and a sink over TLS with a token.

The cursor is advisory (the database's checkpoint is where a sink
resumes): the tests check that `logd cursors` shows each sink's position and
lag, and that a cursor the server will not move (it is ahead) neither stops
nor fails delivery.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from logd.client import Client
from logd.tls import client_context
from tests.e2e.conftest import ServerProcess, new_token, wait_for
from tests.e2e.helpers import url_of
from tests.e2e.test_tls import Certs, certs, tls_args  # noqa: F401 - certs is a fixture
from tests.sink.dbs import TargetDB
from tests.sink.helpers import fill, run_sink, start_sink


def _cursors_cli(server: ServerProcess) -> dict[str, dict[str, int]]:
    """`logd cursors --json`: name -> {id, lag}."""
    out = subprocess.run([sys.executable, "-m", "logd.cli", "cursors", "--json", "--url", url_of(server)],
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _cursor(server: ServerProcess, name: str) -> int:
    with Client(server.host, server.port) as client:
        return client.cursor(name)


def test_a_following_sink_shows_its_position_and_lag_in_logd_cursors(
    start_server, sqlite_db: TargetDB, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    server = start_server("--fsync", "never")
    fill(server, [b"a%d" % i for i in range(500)])
    sink = start_sink(server, sqlite_db.url, "ev", "--create", "--name", "billing", "--batch", "100",
                      stderr=tmp_path / "sink.stderr")
    try:
        wait_for(lambda: _cursor(server, "sink.billing") == 500, 30, "the cursor at the first 500")
        fill(server, [b"b%d" % i for i in range(300)])
        wait_for(lambda: _cursor(server, "sink.billing") == 800, 30, "the cursor to follow the sink")
        assert _cursors_cli(server)["sink.billing"] == {"id": 800, "lag": 0}
        sink.send_signal(signal.SIGTERM)
        assert sink.wait(30) == 0, (tmp_path / "sink.stderr").read_text()
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()
    fill(server, [b"c%d" % i for i in range(50)])  # written while no sink runs: the lag shows it
    assert _cursors_cli(server)["sink.billing"] == {"id": 800, "lag": 50}
    assert sqlite_db.rows("logd_sink_checkpoints", "last_id", order="name") == [(800,)]


def test_once_reports_the_cursor_and_no_report_cursor_leaves_none(start_server, sqlite_db: TargetDB) -> None:  # type: ignore[no-untyped-def]
    server = start_server("--fsync", "never")
    fill(server, [b"x%d" % i for i in range(1000)])
    done = run_sink(server, sqlite_db.url, "ev", "--create", "--once", "--name", "nightly")
    assert done.returncode == 0, done.stderr
    quiet = run_sink(server, sqlite_db.url, "ev2", "--create", "--once", "--name", "silent", "--no-report-cursor")
    assert quiet.returncode == 0, quiet.stderr
    assert _cursors_cli(server) == {"sink.nightly": {"id": 1000, "lag": 0}}
    assert len(sqlite_db.rows("ev2")) == 1000


def test_a_cursor_the_server_will_not_move_neither_stops_nor_fails_delivery(
    start_server, sqlite_db: TargetDB  # type: ignore[no-untyped-def]
) -> None:
    # The cursor is ahead of the database (as after restoring the database from a backup), and the run
    # ends below it (a poison message with --on-error stop): its COMMITs get ERR STALE. The sink logs
    # that once; what it delivers and how it ends are those of the poison message alone.
    server = start_server("--fsync", "never")
    fill(server, [b"{oops" if i == 1500 else b'{"n": %d}' % i for i in range(1, 2001)])
    with Client(server.host, server.port) as client:
        client.commit("sink.default", 2000)
    sqlite_db.execute("CREATE TABLE ev (id INTEGER PRIMARY KEY, n INTEGER)")
    done = run_sink(server, sqlite_db.url, "ev", "--create", "--once", "--format", "json", "--batch", "100",
                    "--on-error", "stop", "--log-format", "json")
    assert done.returncode == 2, done.stderr
    assert sqlite_db.rows("ev", "id, n") == [(i, i) for i in range(1, 1500)]
    assert done.stderr.count('"sink_cursor_ahead"') == 1
    assert _cursor(server, "sink.default") == 2000


def test_sink_over_tls_with_a_read_token(start_server, certs: Certs, sqlite_db: TargetDB, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    auth = tmp_path / "tokens.auth"
    reader, writer = new_token(auth, "sink", "read"), new_token(auth, "app", "write")
    server = start_server("--auth-file", str(auth), *tls_args(certs))
    tls_env = {"LOGD_CLIENT_TLS_CA": str(certs.ca), "LOGD_CLIENT_TLS_CERT": str(certs.client_cert),
               "LOGD_CLIENT_TLS_KEY": str(certs.client_key)}
    ctx = client_context(
        str(certs.ca), str(certs.client_cert), str(certs.client_key))
    with Client(server.host, server.port, token=writer, ssl_context=ctx) as client:
        client.append(*[b"secret %d" % i for i in range(3000)])
    url = f"logds://:{reader}@127.0.0.1:{server.port}"
    done = run_sink(None, sqlite_db.url, "ev", "--create", "--once", "--url", url, env=tls_env)
    assert done.returncode == 0, done.stderr
    with Client(server.host, server.port, token=reader, ssl_context=ctx) as client:
        assert client.cursor("sink.default") == 3000  # the cursor went over TLS with the token too
        want = [(r.id, r.body) for r in client.read(1, 3000)]
    assert sqlite_db.rows("ev") == want
    assert reader not in done.stderr and reader not in done.stdout  # the token is never printed
    # Without the token: a clear refusal and exit status 1, not a retry loop or a traceback.
    denied = run_sink(None, sqlite_db.url, "ev", "--once", "--url", f"logds://127.0.0.1:{server.port}", env=tls_env)
    assert denied.returncode == 1, denied.stderr
    assert "Traceback" not in denied.stderr
    assert "logd:" in denied.stderr and "denied" in denied.stderr.lower()
