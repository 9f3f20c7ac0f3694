"""Config values are checked for range (issue 22, wrong answers), and a config file that is not UTF-8 is a
clear error: no NaN, infinity or negative number of seconds or bytes, and `max-line-bytes` at least the
longest command the server must parse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from logd.config import ConfigError, resolve
from logd.protocol.commands import MAX_ID, Commit, encode_command

from .e2e.conftest import RawConn

# The longest command line a server must parse: COMMIT with a 64-character name and the largest id.
LONGEST_COMMAND = 340  # REPLICATE with every argument and a 253-character host (protocol.md 3.1)


def test_a_config_file_that_is_not_utf8_is_a_clear_error_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "logd.toml"
    path.write_bytes(b'host = "caf\xe9"\n')  # Latin-1
    with pytest.raises(ConfigError, match="not UTF-8"):
        resolve({}, {}, str(path))
    done = subprocess.run([sys.executable, "-m", "logd.cli", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr  # it was a UnicodeDecodeError traceback
    assert "not UTF-8" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("env", [
    {"LOGD_IDLE_TIMEOUT": "nan"}, {"LOGD_IDLE_TIMEOUT": "-1"}, {"LOGD_IDLE_TIMEOUT": "inf"},
    {"LOGD_REPLICA_TIMEOUT": "nan"}, {"LOGD_TAIL_STALL_TIMEOUT": "nan"},
    {"LOGD_SHUTDOWN_TIMEOUT": "inf"}, {"LOGD_SHUTDOWN_TIMEOUT": "-0.5"}, {"LOGD_RETENTION_MS": "-1"},
    {"LOGD_MAX_LINE_BYTES": "3"}, {"LOGD_MAX_LINE_BYTES": str(LONGEST_COMMAND - 1)},
])
def test_values_out_of_range_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        resolve({}, env)


@pytest.mark.parametrize("text", [
    "retention-ms = -1\n", "retention-bytes = -5\n", "retention-cap-bytes = 0\n", "idle-timeout = nan\n",
    "replica-timeout = nan\n", "tail-stall-timeout = inf\n", "max-line-bytes = 3\n",
])
def test_values_out_of_range_in_the_file_are_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "logd.toml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        resolve({}, {}, str(path))


def test_values_in_range_are_taken() -> None:
    config = resolve({}, {"LOGD_IDLE_TIMEOUT": "0.5", "LOGD_SHUTDOWN_TIMEOUT": "0", "LOGD_RETENTION_MS": "1",
                          "LOGD_MAX_LINE_BYTES": str(LONGEST_COMMAND)}).config
    assert (config.idle_timeout, config.shutdown_timeout, config.retention_ms) == (0.5, 0.0, 1)


def test_the_smallest_max_line_bytes_still_parses_the_longest_commands(start_server) -> None:  # type: ignore[no-untyped-def]
    from logd.protocol import commands

    commit = encode_command(Commit("n" * 64, MAX_ID))
    longest = b"REPLICATE %d 0000abcd %d %d %s:65535\r\n" % (MAX_ID, MAX_ID, MAX_ID, b"h" * 253)
    assert len(longest) == commands.LONGEST_COMMAND == LONGEST_COMMAND == 340
    srv = start_server("--max-line-bytes", str(LONGEST_COMMAND))
    conn: RawConn = srv.connect()
    conn.send(b"PING\r\n" + commit + longest)
    assert conn.line() == b"PONG"
    assert conn.line().startswith(b"ERR NOT_FOUND ")  # parsed: the id is past the head
    assert conn.line().startswith(b"ERR FENCED ")  # parsed: the epoch exchange ran
