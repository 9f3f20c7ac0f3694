"""Start and stop the servers under test: logd and redis-server, on 127.0.0.1.

Each server gets an ephemeral port, a temporary data directory and, when
pinning is on, its own CPU. It is stopped by its pid (SIGTERM, then SIGKILL
after a deadline); nothing here ever signals a process it did not start.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0
LISTEN_RE = re.compile(rb"logd listening on 127\.0\.0\.1:(\d+)")

# Durability pairs compared in the same run: (logd --fsync, redis appendfsync).
FSYNC_MODES: dict[str, tuple[str, str]] = {
    "always": ("always", "always"),
    "interval": ("interval:1000", "everysec"),
}

REDIS_HOWTO = (
    "redis-server not found: the Redis half of the benchmark is skipped. "
    "Install it with `apt-get update && apt-get install -y redis-server` "
    "(Debian/Ubuntu), or run `python -m bench --install-redis` as root."
)


class ServerError(RuntimeError):
    """A server could not be started or did not answer."""


@dataclass
class Server:
    """One running server process that this benchmark started."""

    kind: str  # "logd" or "redis"
    fsync: str  # the server's own durability setting, as passed to it
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path  # temporary; holds data/ and the server's output files
    version: str = "?"
    _ps: psutil.Process | None = field(default=None, repr=False)

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def ps(self) -> psutil.Process:
        if self._ps is None:
            self._ps = psutil.Process(self.proc.pid)
        return self._ps

    def rss_bytes(self) -> int:
        """Resident set size of the server process."""
        return int(self.ps.memory_info().rss)

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far by the server (all its threads)."""
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM by pid, wait, SIGKILL by pid if it does not exit; remove its files."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT_S)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def output_tail(self, limit: int = 2000) -> str:
        """The end of the server's stdout/stderr files, for error messages."""
        parts = []
        for name in ("stdout", "stderr", "redis.log"):
            path = self.workdir / name
            if path.exists():
                text = path.read_bytes()[-limit:].decode("utf-8", "replace")
                if text.strip():
                    parts.append(f"--- {name} ---\n{text}")
        return "\n".join(parts)


def free_port() -> int:
    """A port that was free a moment ago (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pin(cpu: int | None):  # type: ignore[no-untyped-def]
    """A preexec_fn that pins the child (and so all its threads) to one CPU."""
    if cpu is None:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, {cpu})

    return pin


def _ping(addr: tuple[str, int], ping: bytes, pong: bytes, deadline: float) -> None:
    """Wait until the server at ``addr`` answers ``ping`` with ``pong``."""
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(addr, timeout=2.0) as s:
                s.sendall(ping)
                data = b""
                while not data.endswith(b"\n"):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                if data.startswith(pong):
                    return
                last = ServerError(f"unexpected reply to ping: {data!r}")
        except OSError as e:
            last = e
        time.sleep(0.02)
    raise ServerError(f"no answer to ping on {addr}: {last}")


def logd_command() -> list[str]:
    """How to run logd: the installed console script if present, else the module."""
    return [sys.executable, "-m", "logd.cli"]


def logd_available() -> tuple[bool, str]:
    """Whether ``logd serve`` can be run here (and why not)."""
    try:
        out = subprocess.run(
            [*logd_command(), "serve", "--help"],
            cwd=REPO_ROOT,
            env=_logd_env(),
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    if out.returncode != 0:
        lines = out.stderr.decode("utf-8", "replace").strip().splitlines()
        return False, lines[-1] if lines else f"exit status {out.returncode}"
    return True, ""


def _logd_env() -> dict[str, str]:
    # No LOGD_* from the caller's environment: the flags below are the whole config.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOGD_")}
    # Run the tree's logd even when it is not pip-installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def start_logd(fsync: str, cpu: int | None) -> Server:
    """Start ``logd serve`` on an ephemeral port; return once it answers PING."""
    workdir = Path(tempfile.mkdtemp(prefix="logd-bench-logd-"))
    data = workdir / "data"
    data.mkdir()
    cmd = [
        *logd_command(),
        "serve",
        "--host", "127.0.0.1",
        "--port", "0",
        "--data-dir", str(data),
        "--fsync", fsync,
        "--log-level", "warning",
    ]  # fmt: skip
    with open(workdir / "stdout", "wb") as out, open(workdir / "stderr", "wb") as err:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=_logd_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            preexec_fn=_pin(cpu),
            start_new_session=True,
        )
    server = Server("logd", fsync, 0, proc, workdir)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            m = LISTEN_RE.search((workdir / "stdout").read_bytes())
            if m:
                server.port = int(m.group(1))
                break
            if proc.poll() is not None:
                raise ServerError(f"logd exited with {proc.returncode}\n{server.output_tail()}")
            if time.monotonic() > deadline:
                raise ServerError(f"logd did not print its port\n{server.output_tail()}")
            time.sleep(0.02)
        _ping(server.addr, b"PING\r\n", b"PONG", deadline)
    except BaseException:
        server.stop()
        raise
    return server


def redis_binary() -> str | None:
    """Path of redis-server, or None."""
    return shutil.which("redis-server")


def install_redis() -> bool:
    """Try ``apt-get install redis-server`` (root only). True if it is now present."""
    if redis_binary():
        return True
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "redis-server"]):
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, timeout=600, check=False)
    return redis_binary() is not None


def start_redis(appendfsync: str, cpu: int | None) -> Server:
    """Start redis-server with AOF on (appendfsync as given), RDB off, in a temp dir."""
    binary = redis_binary()
    if binary is None:
        raise ServerError(REDIS_HOWTO)
    last = ""
    for _attempt in range(5):  # the free port may be taken between probe and bind
        workdir = Path(tempfile.mkdtemp(prefix="logd-bench-redis-"))
        data = workdir / "data"
        data.mkdir()
        port = free_port()
        cmd = [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(data),
            "--appendonly", "yes",
            "--appendfsync", appendfsync,
            "--save", "",
            # No background AOF rewrite (fork) in the middle of a measurement:
            # logd has no compaction either, so this only helps Redis.
            "--auto-aof-rewrite-percentage", "0",
            "--daemonize", "no",
            "--logfile", str(workdir / "redis.log"),
            "--loglevel", "warning",
            "--maxclients", "4096",
        ]  # fmt: skip
        with open(workdir / "stdout", "wb") as out, open(workdir / "stderr", "wb") as err:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                preexec_fn=_pin(cpu),
                start_new_session=True,
            )
        server = Server("redis", appendfsync, port, proc, workdir)
        try:
            _ping(server.addr, b"PING\r\n", b"+PONG", time.monotonic() + START_TIMEOUT_S)
        except ServerError as e:
            last = f"{e}\n{server.output_tail()}"
            server.stop()
            continue
        return server
    raise ServerError(f"redis-server did not start: {last}")


def redis_version() -> str:
    """``redis-server --version`` output, trimmed."""
    binary = redis_binary()
    if binary is None:
        return "not installed"
    out = subprocess.run([binary, "--version"], capture_output=True, timeout=10, check=False)
    return out.stdout.decode().strip()
