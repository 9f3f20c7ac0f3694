"""The client commands of the `logd` CLI: click's CliRunner for flags and errors, and real
processes joined by pipes for the unix side (streams, exit codes, stderr)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import logd
from logd.cli import main

from .e2e.conftest import ServerProcess
from .e2e.helpers import url_of

ROOT = Path(__file__).resolve().parent.parent
LOGD = [sys.executable, "-m", "logd.cli"]
REFUSED = "logd://127.0.0.1:1"


def cli(*args: str, input: bytes | None = None, env: dict[str, str] | None = None) -> tuple[int, bytes, bytes]:
    """Run `logd ARGS` in a process: (exit status, stdout, stderr)."""
    proc = subprocess.run([*LOGD, *args], input=input, capture_output=True, cwd=ROOT, timeout=60,
                          env=dict(os.environ, **(env or {})))
    return proc.returncode, proc.stdout, proc.stderr


def run(*args: str, input: bytes | str | None = None) -> Result:
    """Run `logd ARGS` in this process (click's CliRunner); LOGD_URL points at nothing."""
    return CliRunner().invoke(main, list(args), input=input, env={"LOGD_URL": REFUSED})


# --- flags and usage errors (no server needed) -------------------------------------------------


@pytest.mark.parametrize("args, complaint", [
    (["read", "--from", "yesterday"], "--from"),
    (["read", "--from", "0"], "--from"),
    (["read", "--format", "{nope}"], "--format"),
    (["read", "-n", "-3"], "-n"),
    (["head", "--url", "http://x:1"], "--url"),
    (["append", "-d", "", "x"], "--delimiter"),
    (["consume", "--checkpoint", "ck"], "COMMAND"),
    (["consume", "--", "cat"], "--checkpoint"),
    (["stats", "--timeout", "0"], "--timeout"),
])
def test_usage_errors_exit_2(args: list[str], complaint: str) -> None:
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert complaint in result.output


def test_help_lists_the_client_commands() -> None:
    out = run("--help").output
    for name in ("append", "read", "consume", "head", "ping", "stats", "cursors", "config"):
        assert name in out
    assert "LOGD_URL" in run("read", "--help").output


@pytest.mark.parametrize("args", [["ping"], ["head"], ["stats"], ["read"], ["append", "x"],
                                  ["consume", "--checkpoint", "/nonexistent/ck", "--timeout", "1", "--", "cat"]])
def test_connection_refused_is_one_line_and_exit_1(args: list[str]) -> None:
    result = CliRunner().invoke(main, args, env={"LOGD_URL": REFUSED})
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("logd: cannot connect to 127.0.0.1:1")


def test_connection_refused_in_a_real_process() -> None:
    status, out, err = cli("ping", env={"LOGD_URL": REFUSED})
    assert status == 1 and out == b""
    assert err.decode().splitlines() == ["logd: cannot connect to 127.0.0.1:1: Connection refused"]


# --- against a server, in process ----------------------------------------------------------------


def test_append_read_head_stats_ping(server: ServerProcess) -> None:
    url = url_of(server)
    result = run("append", "--url", url, "hello", "w\u00f6rld")
    assert result.exit_code == 0 and result.stdout == "1\n2\n"
    assert run("append", "--url", url, "-q", input=b"a\x00b\x00").stdout == ""  # one message: no newline in it
    assert run("append", "--url", url, "--null", input=b"c\x00d\x00").stdout == "4\n5\n"
    with logd.connect(url) as c:
        c.append(b"\xff\xfe")  # not UTF-8
    assert run("head", "--url", url).stdout == "6\n"
    assert run("ping", "--url", url).stdout == "PONG\n"
    assert run("read", "--url", url, "-n", "2").stdout == "hello\nw\u00f6rld\n"
    assert run("read", "--url", url, "--from", "3", "-n", "1").stdout == "a\x00b\x00\n"
    lines = run("read", "--url", url, "--from", "-2", "--format", "json").stdout.splitlines()
    assert [json.loads(x) for x in lines] == [{"id": 5, "body": "d"}, {"id": 6, "body": "//4=", "base64": True}]
    assert run("read", "--url", url, "--from=-3", "-n", "1", "--format", "{id}:{len}:{body}").stdout == "4:1:c\n"
    assert run("read", "--url", url, "--from", "end").stdout == ""
    assert run("read", "--url", url, "--from", "-1", "--null").stdout_bytes == b"\xff\xfe\x00"
    assert run("read", "--url", url, "--from", "-1", "--format", "{body}").stdout_bytes == b"\xff\xfe\n"
    stats = json.loads(run("stats", "--url", url, "--json").stdout)
    assert stats["head"] == 6 and stats["role"] == "leader"
    assert "head 6" in run("stats", "--url", url).stdout.splitlines()


def test_stats_table_and_cursors_json(server: ServerProcess) -> None:
    url = url_of(server)
    with logd.connect(url) as c:
        c.append(*[b"x" * 600] * 3)
        c.commit("reader", 1)
    table = run("stats", "--url", url, "--table").stdout.splitlines()
    assert table[0].split() == ["figure", "value"]
    rows = {line.split()[0]: line.split(None, 1)[1] for line in table[1:]}
    assert rows["head"] == "3" and rows["cursor_reader_lag"] == "2"
    assert rows["appended_bytes"] == "1800 (1.8 KiB)"  # bytes readable, the exact count kept
    # Every value starts in the same column.
    starts = {len(line) - len(line[len(line.split()[0]):].lstrip()) for line in table[1:]}
    assert len(starts) == 1
    assert json.loads(run("cursors", "--url", url, "--json").stdout) == {"reader": {"id": 1, "lag": 2}}
    assert run("stats", "--url", url, "--lines").stdout.splitlines()[0] == "version 0.1.0"


def test_server_errors_are_one_line(start_server: Callable[..., ServerProcess]) -> None:
    srv = start_server("--max-message-bytes", "4")
    result = run("append", "--url", url_of(srv), "toolong")
    assert result.exit_code == 1
    assert result.stderr.startswith("logd: TOO_LARGE ") and result.stderr.count("\n") == 1


# --- real processes and pipes ------------------------------------------------------------------


def test_seq_through_append_and_read_round_trips(server: ServerProcess) -> None:
    url = url_of(server)
    seq = b"".join(b"%d\n" % i for i in range(1, 100_001))
    status, out, err = cli("append", "-q", "--url", url, input=seq)
    assert (status, out, err) == (0, b"", b"")  # no progress bar: stderr is not a terminal
    status, out, err = cli("read", "--url", url, "--from", "beginning", "-n", "100000")
    assert status == 0 and err == b""
    assert out == seq
    status, out, _ = cli("append", "--url", url, input=b"x\ny")  # no final newline
    assert out == b"100001\n100002\n"


# `logd append` that reports its own peak memory (VmHWM, KiB) as the last line of stderr.
# (Not ru_maxrss: Linux carries that over exec from the forking parent, here pytest.)
MEASURED = [sys.executable, "-c", "import re, sys\nfrom logd.cli import main\ntry:\n    main()\nfinally:\n"
            "    print(re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read())[1], file=sys.stderr)"]


def test_append_streams_big_input_in_bounded_memory(server: ServerProcess, tmp_path: Path) -> None:
    line = b"L" * 999 + b"\n"
    big = tmp_path / "big"
    with open(big, "wb") as f:
        for _ in range(96):
            f.write(line * 1024)  # 96 MiB in all
    with open(big, "rb") as stdin:
        proc = subprocess.run([*MEASURED, "append", "-q", "--url", url_of(server)], stdin=stdin, cwd=ROOT,
                              capture_output=True, timeout=120)
    *complaints, peak_kib = proc.stderr.decode().split()
    assert proc.returncode == 0 and not complaints, proc.stderr
    assert int(peak_kib) < 80 * 1024, f"append peaked at {int(peak_kib) >> 10} MiB for 96 MiB of input"
    with logd.connect(url_of(server)) as c:
        assert c.head() == 96 * 1024
        assert c.read(96 * 1024, 1)[0].body == line[:-1]


def test_read_follow_prints_new_messages(server: ServerProcess) -> None:
    url = url_of(server)
    with logd.connect(url) as c:
        c.append(b"old")
        proc = subprocess.Popen([*LOGD, "read", "-f", "--from", "end", "--url", url], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            got = b""
            deadline = time.monotonic() + 20
            while got.count(b"\n") < 2 and time.monotonic() < deadline:
                c.append(b"new1", b"new2")  # the reader may not be tailing yet: keep appending
                ready, _, _ = select.select([proc.stdout], [], [], 0.2)
                if ready:
                    got += os.read(proc.stdout.fileno(), 65536)
            lines = got.split(b"\n")
            assert lines[:2] == [b"new1", b"new2"]  # not "old": only what came after it started
        finally:
            proc.terminate()
            proc.wait(10)


def test_read_into_a_closed_pipe_is_quiet(server: ServerProcess) -> None:
    with logd.connect(url_of(server)) as c:
        for _ in range(20):
            c.append(*[b"y" * 100] * 1000)
    reader = subprocess.Popen([*LOGD, "read", "--url", url_of(server)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert reader.stdout is not None and reader.stderr is not None
    reader.stdout.read(10)
    reader.stdout.close()  # as `| head -c 10` does
    assert reader.wait(20) == 0
    assert reader.stderr.read() == b""


def test_consume_commits_after_success_and_stops_on_failure(server: ServerProcess, tmp_path: Path) -> None:
    url = url_of(server)
    with logd.connect(url) as c:
        c.append(*[b"m%d" % i for i in range(1, 251)])
    ck, out = tmp_path / "ck", tmp_path / "out"
    script = f'cat >> {out}; echo "$LOGD_FIRST_ID-$LOGD_LAST_ID" >> {out}.ranges'
    status, _, err = cli("consume", "--url", url, "--checkpoint", str(ck), "--batch", "100", "--no-follow",
                         "--", "sh", "-c", script)
    assert status == 0, err
    assert out.read_bytes() == b"".join(b"m%d\n" % i for i in range(1, 251))
    ranges = [tuple(map(int, r.split("-"))) for r in Path(f"{out}.ranges").read_text().split()]
    assert ranges[0][0] == 1 and ranges[-1][1] == 250 and all(b - a < 100 for a, b in ranges)
    assert ck.read_text() == "250\n"
    with logd.connect(url) as c:
        c.append(b"poison")
    status, _, err = cli("consume", "--url", url, "--checkpoint", str(ck), "--no-follow", "--", "sh", "-c", "exit 3")
    assert status == 3
    assert err.decode().splitlines() == ["logd: sh exited with status 3 on ids 251..251; checkpoint stays at 250"]
    assert ck.read_text() == "250\n"
    status, _, err = cli("consume", "--url", url, "--checkpoint", str(ck), "--no-follow", "--", "no-such-cmd-x")
    assert status == 127 and b"no-such-cmd-x" in err


def _through_a_terminal(args: list[str], stdin: bytes | None, tty: str) -> tuple[bytes, bytes]:
    """Run `logd ARGS` with ``tty`` ("stdout" or "stderr") on a pseudo-terminal.

    Returns (the stdout pipe's bytes, or b"" when stdout is the terminal; what the terminal got).
    """
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 x 100, as a terminal
    pipe = subprocess.PIPE
    proc = subprocess.Popen([*LOGD, *args], cwd=ROOT, stdin=pipe,
                            stdout=slave if tty == "stdout" else pipe, stderr=slave if tty == "stderr" else pipe)
    os.close(slave)
    try:
        out, _ = proc.communicate(stdin, timeout=30)
        screen = b""
        while True:  # the child has exited: read what it left on the terminal
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: nothing more
                break
            if not chunk:
                break
            screen += chunk
    finally:
        os.close(master)
    return out or b"", screen


def test_terminals_get_a_progress_bar_and_ids_with_bodies(server: ServerProcess) -> None:
    url = url_of(server)
    out, bar = _through_a_terminal(["append", "--url", url], b"a\nb\n", "stderr")
    assert out == b"1\n2\n"
    assert b"append" in bar and b"B/s" in bar  # tqdm's bar, on the terminal only
    _, screen = _through_a_terminal(["read", "--url", url], None, "stdout")
    assert screen.replace(b"\r\n", b"\n") == b"1\ta\n2\tb\n"
