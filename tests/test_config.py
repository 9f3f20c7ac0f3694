"""Configuration layers: flags > LOGD_* env > config file > defaults, `logd config`, and a real `serve --config`."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from logd import defaults
from logd.cli import main
from logd.client.sync import Client
from logd.config import DEFAULTS, ConfigError, describe, load_file, resolve
from logd.protocol import ClientProtocol, CommandParser
from logd.storage.policy import FsyncPolicy

from .e2e.conftest import RawConn


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "logd.toml"
    path.write_text(text)
    return str(path)


def test_defaults_only(tmp_path: Path) -> None:
    r = resolve({}, {})
    assert r.config == DEFAULTS
    assert set(r.sources.values()) == {"default"}


def test_file_beats_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, 'port = 7001\nsegment-bytes = "1MiB"\nfsync = "interval:50"\nallow_shutdown = true\n')
    r = resolve({}, {}, path)
    assert r.config.port == 7001
    assert r.config.segment_bytes == 1 << 20
    assert r.config.fsync == FsyncPolicy("interval", 50)
    assert r.config.allow_shutdown is True
    assert r.sources["port"] == f"file {path}"
    assert r.sources["host"] == "default"


def test_env_beats_file(tmp_path: Path) -> None:
    path = write(tmp_path, "port = 7001\nmax-batch = 5\n")
    r = resolve({}, {"LOGD_PORT": "7002"}, path)
    assert r.config.port == 7002 and r.sources["port"] == "env LOGD_PORT"
    assert r.config.max_batch == 5 and r.sources["max_batch"] == f"file {path}"


def test_flag_beats_env_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "port = 7001\n")
    r = resolve({"port": 7003}, {"LOGD_PORT": "7002"}, path)
    assert r.config.port == 7003 and r.sources["port"] == "flag --port"


def test_config_file_from_env(tmp_path: Path) -> None:
    path = write(tmp_path, 'log-level = "debug"\n')
    r = resolve({}, {"LOGD_CONFIG": path})
    assert r.config.log_level == "debug" and r.config_file == path


def test_env_booleans_and_sizes() -> None:
    r = resolve({}, {"LOGD_ALLOW_SHUTDOWN": "yes", "LOGD_RETENTION_BYTES": "64KiB", "LOGD_PREALLOCATE": "off"})
    assert r.config.allow_shutdown is True
    assert r.config.retention_bytes == 64 << 10
    assert r.config.preallocate is False


@pytest.mark.parametrize("text, complaint", [
    ("prot = 1\n", "unknown setting 'prot'"),
    ('port = "many"\n', "port: not a whole number"),
    ("host = 5\n", "host: expected str"),
    ("port = true\n", "port: expected int"),
    ('log-level = "loud"\n', "log-level: must be one of"),
    ("port = [\n", "not valid TOML"),
    ("port = 70000\n", "port must be 0..65535"),
])
def test_bad_file_is_a_clear_error(tmp_path: Path, text: str, complaint: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=complaint):
        resolve({}, {}, path)


def test_missing_file_and_bad_env(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        resolve({}, {}, str(tmp_path / "nope.toml"))
    with pytest.raises(ConfigError, match="LOGD_MAX_BATCH: not a whole number"):
        resolve({}, {"LOGD_MAX_BATCH": "lots"})


def test_parser_and_clients_take_their_defaults_from_the_one_place() -> None:
    parser = CommandParser()
    assert parser._max_line == defaults.MAX_LINE_BYTES == DEFAULTS.max_line_bytes
    assert parser._max_batch == defaults.MAX_BATCH == DEFAULTS.max_batch
    assert ClientProtocol()._max_line == defaults.MAX_LINE_BYTES
    assert Client().address == (defaults.HOST, defaults.PORT) == (DEFAULTS.host, DEFAULTS.port)
    assert Client().timeout == defaults.CLIENT_TIMEOUT


def test_logd_config_prints_values_and_sources(tmp_path: Path) -> None:
    path = write(tmp_path, "port = 7001\nmax-batch = 5\nmin-replicas = 2\n")
    result = CliRunner().invoke(
        main, ["config", "--config", path, "--max-batch", "7"], env={"LOGD_MIN_REPLICAS": "1"}
    )
    assert result.exit_code == 0, result.output
    lines = {line.split(" = ")[0]: line for line in result.output.splitlines() if " = " in line}
    assert lines["port"].split("#")[-1].strip() == f"file {path}"
    assert lines["max-batch"].startswith("max-batch = 7 ") and lines["max-batch"].endswith("# flag --max-batch")
    assert lines["min-replicas"].endswith("# env LOGD_MIN_REPLICAS")
    assert lines["host"].endswith("# default")
    assert "# retention-bytes (not set)" in result.output
    # The output is itself a config file that gives the same configuration.
    saved = tmp_path / "saved.toml"
    saved.write_text(result.output)
    assert tomllib.loads(result.output)["max-batch"] == 7
    assert resolve({}, {}, str(saved)).config == resolve({"max_batch": 7}, {"LOGD_MIN_REPLICAS": "1"}, path).config
    assert load_file(str(saved))["port"] == 7001


def test_logd_config_bad_value_exits_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["config"], env={"LOGD_SEGMENT_BYTES": "huge"})
    assert result.exit_code == 2
    assert "LOGD_SEGMENT_BYTES: not a size" in result.output


def test_describe_shows_config_file(tmp_path: Path) -> None:
    path = write(tmp_path, "port = 1\n")
    assert f"# config file: {path}" in describe(resolve({}, {}, path))


def test_serve_reads_the_config_file(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A real server started with --config applies the file (max-batch, allow-shutdown)."""
    path = write(tmp_path, "max-batch = 2\nallow-shutdown = true\n")
    srv = start_server("--config", path)
    conn: RawConn = srv.connect()
    conn.send(b"MSG 1 1 1\r\na\r\nb\r\nc\r\nMSG 1 1\r\na\r\nb\r\nSHUTDOWN\r\n")
    assert conn.line().startswith(b"ERR TOO_LARGE batch of 3 messages is over max_batch 2")
    assert conn.line() == b"OK 2"
    assert conn.line() == b"OK"
    assert srv.proc.wait(timeout=20) == 0


def test_replica_token_file_gives_the_token_and_is_never_shown(tmp_path: Path) -> None:
    path = tmp_path / "replica.token"
    path.write_text("s3cret-token\n")
    r = resolve({"replica_of": "127.0.0.1:1774", "replica_token_file": str(path)}, {})
    assert r.config.replica_secret == "s3cret-token"
    assert r.sources["replica_token"] == f"replica-token-file {path}"
    assert "s3cret-token" not in describe(r) and 'replica-token = "***"' in describe(r)


@pytest.mark.parametrize("problem", ["missing", "empty", "both"])
def test_replica_token_file_problems_are_config_errors(tmp_path: Path, problem: str) -> None:
    path = tmp_path / "replica.token"
    flags = {"replica_token_file": str(path)}
    if problem == "empty":
        path.write_text("\n")
    if problem == "both":
        path.write_text("one\n")
        flags["replica_token"] = "two"
    with pytest.raises(ConfigError, match="replica-token"):
        resolve(flags, {})


def test_replica_token_flag_works_but_warns_that_ps_shows_it(tmp_path: Path) -> None:
    path = tmp_path / "replica.token"
    path.write_text("from-file\n")
    path.chmod(0o600)
    flag = CliRunner().invoke(main, ["config", "--replica-token", "on-the-command-line"])
    assert flag.exit_code == 0 and 'replica-token = "***"' in flag.stdout
    assert "--replica-token is visible to other users" in flag.stderr
    from_file = CliRunner().invoke(main, ["config", "--replica-token-file", str(path)])
    assert from_file.exit_code == 0 and 'replica-token = "***"' in from_file.stdout
    assert "visible to other users" not in from_file.stderr and "chmod 600" not in from_file.stderr
    path.chmod(0o644)
    loose = CliRunner().invoke(main, ["config", "--replica-token-file", str(path)])
    assert loose.exit_code == 0 and f"{path} may be read by other users; chmod 600 it" in loose.stderr
    env = CliRunner().invoke(main, ["config"], env={"LOGD_REPLICA_TOKEN": "from-env"})
    assert env.exit_code == 0 and "# env LOGD_REPLICA_TOKEN" in env.stdout and not env.stderr
