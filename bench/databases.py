"""Start and stop real PostgreSQL 15 and ClickHouse servers for the sink tests and benchmark.

Each server runs from a fresh temporary directory on a free 127.0.0.1 port,
and is stopped by the pids this module started (SIGTERM, then SIGKILL after
a deadline); nothing here signals a process it did not start. PostgreSQL
refuses to run as root, so when we are root it runs as the ``postgres``
user of the Debian package (the temporary directory is handed to it).
A missing binary raises `DatabaseMissing`: tests fail on it, they do not skip.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"  # created by the Debian postgresql package
START_TIMEOUT_S = 120.0  # only bounds a failure: a first ClickHouse start on a loaded 2-core VM is slow
STOP_TIMEOUT_S = 15.0
INSTALL_HINT = "install it with `apt-get install -y postgresql clickhouse-server` (.ci/run does)"


class DatabaseMissing(RuntimeError):
    """The database server is not installed, or would not start."""


def free_ports(n: int) -> list[int]:
    """``n`` different TCP ports on 127.0.0.1 that nothing listens on right now.

    All ``n`` sockets stay bound until every port is picked, so the kernel
    cannot hand the same port out twice (ClickHouse needs an HTTP and a TCP port).
    """
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def _wait(cond: object, timeout: float, what: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not cond():  # type: ignore[operator]
        if proc.poll() is not None:
            raise DatabaseMissing(f"{what} exited with status {proc.returncode}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise DatabaseMissing(f"{what} did not start in {timeout} s:\n{_tail(log)}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-2000:]
    except OSError:
        return ""


def _stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    """Stop a process we started, and the children it started (PostgreSQL backends), by pid."""
    if proc is None or proc.poll() is not None:
        return
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.send_signal(sig)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for child in children:  # after a SIGTERM they are gone already; after SIGKILL they are orphans
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def _status(proc: psutil.Process) -> str:
    try:
        return str(proc.status())
    except psutil.NoSuchProcess:
        return "gone"


@dataclass
class Postgres:
    """A PostgreSQL 15 server in a temporary directory; `url` reaches its ``postgres`` database."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="logd-pg-")))
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_owner(self) -> dict[str, object]:
        """Popen arguments that run PostgreSQL as ``postgres`` when we are root."""
        if os.geteuid() != 0:
            return {}
        try:
            pw = pwd.getpwnam(PG_USER)
        except KeyError:
            raise DatabaseMissing(f"no user {PG_USER} to run PostgreSQL as; {INSTALL_HINT}") from None
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def init(self) -> Postgres:
        if not (PG_BIN / "initdb").exists():
            raise DatabaseMissing(f"PostgreSQL 15 is not installed ({PG_BIN}); {INSTALL_HINT}")
        if os.geteuid() == 0:
            pw = pwd.getpwnam(PG_USER)
            os.chown(self.workdir, pw.pw_uid, pw.pw_gid)
        out = subprocess.run(
            [str(PG_BIN / "initdb"), "-D", str(self.workdir / "data"), "-U", "postgres", "--auth=trust",
             "-E", "UTF8", "--no-sync", "--no-instructions"],
            capture_output=True, cwd=self.workdir, **self._as_owner(),  # type: ignore[call-overload]
        )
        if out.returncode != 0:
            raise DatabaseMissing(f"initdb failed: {out.stderr.decode(errors='replace')}")
        return self

    def start(self) -> Postgres:
        """Start (or restart, on the same port and data) the server; return when it accepts connections."""
        self.port = self.port or free_port()
        log = self.workdir / "postgres.log"
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                [str(PG_BIN / "postgres"), "-D", str(self.workdir / "data"), "-p", str(self.port),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.workdir}",
                 "-c", "max_connections=40", "-c", "shared_buffers=64MB"],
                stdout=err, stderr=err, stdin=subprocess.DEVNULL, cwd=self.workdir, **self._as_owner(),
            )
        _wait(self.ready, START_TIMEOUT_S, "postgres", self.proc, log)
        return self

    def ready(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self.url, connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend it started (a crash; recovery runs at the next start)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        # Stop the postmaster first: a backend it forked between listing its children and
        # the SIGKILL would live on holding the shared memory, and the next start would
        # refuse with "pre-existing shared memory block is still in use". A stopped
        # postmaster forks nothing, so the list taken once it is stopped is complete.
        postmaster = psutil.Process(self.proc.pid)
        postmaster.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _status(postmaster) not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE, "gone"):
            if time.monotonic() > deadline:
                break  # SIGKILL it anyway; wait_procs below still waits for every child listed
            time.sleep(0.001)  # the signal is delivered asynchronously: poll until it took effect
        children = postmaster.children(recursive=True)
        self.proc.kill()
        self.proc.wait()
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        # Only once every backend is gone (or a zombie: it holds no shared memory) may the restart begin.
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while alive := [c.pid for c in children if _status(c) not in (psutil.STATUS_ZOMBIE, "gone")]:
            if time.monotonic() > deadline:
                raise DatabaseMissing(f"postgres backends {alive} outlived SIGKILL for {STOP_TIMEOUT_S} s")
            time.sleep(0.001)

    def stop(self) -> None:
        _stop(self.proc, signal.SIGINT)  # "fast" shutdown: disconnects clients, then exits

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


CLICKHOUSE_CONFIG = """<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><console>1</console></logger>
  <listen_host>127.0.0.1</listen_host>
  <http_port>{http_port}</http_port>
  <tcp_port>{tcp_port}</tcp_port>
  <path>{path}/data/</path>
  <tmp_path>{path}/tmp/</tmp_path>
  <users_config>users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>5368709120</mark_cache_size>
</yandex>
"""

CLICKHOUSE_USERS = """<?xml version="1.0"?>
<yandex>
  <profiles><default></default></profiles>
  <users>
    <default>
      <password></password>
      <networks><ip>127.0.0.1</ip></networks>
      <profile>default</profile>
      <quota>default</quota>
    </default>
    <sinker>
      <password>s3cret pass</password>
      <networks><ip>127.0.0.1</ip></networks>
      <profile>default</profile>
      <quota>default</quota>
    </sinker>
  </users>
  <quotas><default></default></quotas>
</yandex>
"""


@dataclass
class ClickHouse:
    """A clickhouse-server in a temporary directory; `url` is its HTTP interface, database ``default``."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="logd-ch-")))
    http_port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"clickhouse://127.0.0.1:{self.http_port}/default"

    def start(self) -> ClickHouse:
        binary = shutil.which("clickhouse-server") or shutil.which("clickhouse-server", path="/usr/sbin:/usr/bin")
        if binary is None:
            raise DatabaseMissing(f"clickhouse-server is not installed; {INSTALL_HINT}")
        # Both picked together (never the same port twice); a restart keeps its HTTP port, which
        # the kernel may hand out again now, hence three to choose from.
        ports = [port for port in free_ports(3) if port != self.http_port]
        self.http_port = self.http_port or ports[0]
        tcp_port = ports[1]
        config = self.workdir / "config.xml"
        config.write_text(CLICKHOUSE_CONFIG.format(http_port=self.http_port, tcp_port=tcp_port, path=self.workdir))
        (self.workdir / "users.xml").write_text(CLICKHOUSE_USERS)
        log = self.workdir / "clickhouse.log"
        with open(log, "ab") as err:
            self.proc = subprocess.Popen([binary, f"--config-file={config}"], stdout=err, stderr=err,
                                         stdin=subprocess.DEVNULL, cwd=self.workdir)
        _wait(self.ready, START_TIMEOUT_S, "clickhouse-server", self.proc, log)
        return self

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/ping", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def query(self, sql: str) -> bytes:
        """Run one statement over HTTP; its output."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}/", data=sql.encode(), method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            return bytes(r.read())

    def stop(self) -> None:
        _stop(self.proc)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
