"""Fixtures that start real `logd serve` processes on ephemeral ports."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

LISTENING = re.compile(rb"logd listening on ([\d.]+):(\d+)")
START_TIMEOUT = 20.0
# Every token a test created. No log of any server the suite starts may contain one:
# `start_server` checks each server's stderr when the test ends (issue 14).
SECRETS: list[str] = []


def new_token(auth_file: Path, name: str, role: str) -> str:
    """``logd token add NAME --role ROLE --auth-file FILE``; return the token it printed."""
    out = subprocess.run(
        [sys.executable, "-m", "logd.cli", "token", "add", name, "--role", role, "--auth-file", str(auth_file)],
        capture_output=True, check=True, timeout=60,
    )
    token = out.stdout.decode().strip()
    assert len(token) >= 40 and "\n" not in token, out
    SECRETS.append(token)
    return token


@dataclass
class ServerProcess:
    """A running `logd serve` child process."""

    data_dir: Path
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None
    host: str = "127.0.0.1"
    port: int = 0
    stderr_path: Path = field(default_factory=Path)
    preexec: Callable[[], None] | None = None  # runs in the child before exec (limits)
    output: bytes = b""  # stdout read so far (the "listening" line, and whatever came with it)

    def start(self) -> ServerProcess:
        self.stderr_path = self.data_dir.parent / f"{self.data_dir.name}.stderr"
        err = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "logd.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--data-dir", str(self.data_dir), "--log-level", "warning", *self.args],
            stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, preexec_fn=self.preexec,
        )
        err.close()
        line = _readline_with_deadline(self.proc, START_TIMEOUT)
        self.output = line
        m = LISTENING.search(line)
        if not m:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"server did not start: {line!r}\n{self.stderr()}")
        self.host, self.port = m.group(1).decode(), int(m.group(2))
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def connect(self, timeout: float = 10.0) -> RawConn:
        return RawConn(socket.create_connection((self.host, self.port), timeout=timeout))

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; return the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=20)


def _readline_with_deadline(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf


def wait_for(cond: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll ``cond`` until it is truthy and return its value; fail the test after ``timeout`` s.

    The waits between polls are a polling interval (a condition with a
    deadline), never synchronisation by themselves.
    """
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


class RawConn:
    """A blocking socket with line/exact reads, for talking the wire protocol by hand."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def line(self) -> bytes:
        """One reply line without its CRLF."""
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return out
            self._fill()

    def exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def record(self) -> tuple[int, bytes] | None:
        """One record (id, body), or None at +EOF."""
        head = self.line()
        if head == b"+EOF":
            return None
        assert head.startswith(b"+"), head
        rid, length, _crc = head[1:].split(b" ")
        body = self.exact(int(length))
        assert self.exact(2) == b"\r\n"
        return int(rid), body

    def closed_by_peer(self) -> bool:
        """True once the server has closed (reads EOF)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator:
    """Factory: start_server(*args, data_dir=None, port=0) -> ServerProcess; all stopped at teardown.

    ``port`` 0 picks a free one; pass a stopped server's port to restart it where clients expect it.
    """
    started: list[ServerProcess] = []

    def _start(*args: str, data_dir: Path | None = None, port: int = 0) -> ServerProcess:
        d = data_dir or tmp_path / f"data{len(started)}"
        srv = ServerProcess(d, list(args), port=port).start()
        started.append(srv)
        return srv

    yield _start
    for srv in started:
        if srv.proc is not None and srv.proc.poll() is None:
            srv.proc.send_signal(signal.SIGTERM)
            try:
                srv.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                srv.proc.kill()
                srv.proc.wait()
    for srv in started:
        log = srv.stderr()
        leaked = [i for i, secret in enumerate(SECRETS) if secret in log]
        assert not leaked, f"the log of a server ({srv.stderr_path}) contains token(s) {leaked} of SECRETS"


@pytest.fixture
def server(start_server) -> ServerProcess:  # type: ignore[no-untyped-def]
    """One server with fsync=always and SHUTDOWN allowed."""
    return start_server("--allow-shutdown")
