"""A sink's advisory cursor under cursor owners (protocol.md 3.7): a token that may not move
``sink.<name>`` still delivers everything; with the grant the README gives, the cursor follows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from logd.client import Client
from tests.e2e.conftest import SECRETS, new_token
from tests.sink.dbs import TargetDB
from tests.sink.helpers import run_sink


def test_a_sink_whose_cursor_commit_is_denied_delivers_everything(start_server, sqlite_db: TargetDB,  # type: ignore[no-untyped-def]
                                                                  tmp_path: Path) -> None:
    auth = tmp_path / "tokens.auth"
    writer, loader = new_token(auth, "app", "write"), new_token(auth, "loader", "read")
    granted = subprocess.run([sys.executable, "-m", "logd.cli", "token", "add", "etl", "--role", "read",
                              "--cursors", "sink.*", "--auth-file", str(auth)],
                             capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    SECRETS.append(granted)
    server = start_server("--auth-file", str(auth), "--fsync", "never")
    with Client(server.host, server.port, token=writer) as client:
        client.append(*[b"m%d" % i for i in range(2500)])
    denied = run_sink(None, sqlite_db.url, "ev", "--create", "--once", "--log-format", "json",
                      "--url", f"logd://:{loader}@127.0.0.1:{server.port}")
    assert denied.returncode == 0, denied.stderr
    assert len(sqlite_db.rows("ev")) == 2500
    assert denied.stderr.count('"sink_cursor_not_reported"') == 1  # logged once, not once a second
    assert "may not move cursor sink.default" in denied.stderr
    with Client(server.host, server.port, token=loader) as client:
        assert client.cursors() == {}
    # The grant the README gives a sink's token: its cursor is reported.
    done = run_sink(None, sqlite_db.url, "ev2", "--create", "--once", "--name", "pg",
                    "--url", f"logd://:{granted}@127.0.0.1:{server.port}")
    assert done.returncode == 0, done.stderr
    with Client(server.host, server.port, token=loader) as client:
        assert client.cursors() == {"sink.pg": 2500}
    for result in (denied, done):
        assert all(t not in result.stderr + result.stdout for t in (writer, loader, granted))
