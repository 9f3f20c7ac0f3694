"""What the sink tests share: filling a log, reading it back, running `logd sink` as a child process."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
from pathlib import Path

from logd.client import Client, Retry
from logd.errors import LogdError
from logd.sink.source import POLL_S
from tests.e2e.conftest import ServerProcess
from tests.e2e.helpers import url_of


def fill(server: ServerProcess, bodies: list[bytes], batch: int = 10_000) -> None:
    """Append ``bodies`` to the log, ``batch`` per MSG."""
    with Client(server.host, server.port) as client:
        for _ in client.append_batches(bodies[i : i + batch] for i in range(0, len(bodies), batch)):
            pass


def log_records(server: ServerProcess) -> list[tuple[int, bytes]]:
    """The whole log as (id, body), from the oldest record to the head."""
    out: list[tuple[int, bytes]] = []
    with Client(server.host, server.port) as client:
        head = client.head()
        nxt = 1
        while nxt <= head:
            batch = client.read(nxt, 10_000)
            out += [(r.id, r.body) for r in batch]
            nxt = batch[-1].id + 1
    return out


def sink_command(target_url: str, table: str, *flags: str) -> list[str]:
    return [sys.executable, "-m", "logd.cli", "sink", target_url, "--table", table, *flags]


def run_sink(server: ServerProcess | None, target_url: str, table: str, *flags: str,
             timeout: float = 60.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `logd sink` to completion (add --once); its exit status and output. No server: a port nobody uses.

    ``env``: more environment variables (TLS files, a token).
    """
    env = dict(os.environ, LOGD_URL=url_of(server) if server is not None else "logd://127.0.0.1:9", **(env or {}))
    return subprocess.run(sink_command(target_url, table, *flags), env=env, capture_output=True, text=True,
                          timeout=timeout)


def start_sink(server: ServerProcess, target_url: str, table: str, *flags: str,
               stderr: Path | None = None) -> subprocess.Popen[bytes]:
    """Start `logd sink` as a child process (stop it by its pid)."""
    env = dict(os.environ, LOGD_URL=url_of(server))
    err = open(stderr, "ab") if stderr is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(sink_command(target_url, table, *flags), env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
    finally:
        if stderr is not None:
            err.close()  # type: ignore[union-attr]


def waiting_in_its_tail(pid: int) -> bool:
    """Whether the sink ``pid``'s main thread is in its tail's short wait for records (Linux /proc).

    `LogSource` waits for records in a poll of at most `POLL_S`; its other calls to logd
    (the head for a status line, every 5 s) wait up to ``--timeout``, far longer. On
    x86-64 /proc/<pid>/syscall shows poll's timeout (its third argument, in ms), which
    tells the two apart; elsewhere only that it waits in a poll. Whatever had arrived on
    the tail's socket before that wait is in the batch the wait returns to.
    """
    try:
        wchan = Path(f"/proc/{pid}/wchan").read_text()
        syscall = Path(f"/proc/{pid}/syscall").read_text().split()
    except OSError:
        return False
    if platform.machine() == "x86_64":
        # 7: poll; a timeout of 0 only looks whether a connection has something (any connection).
        return len(syscall) > 3 and syscall[0] == "7" and 0 < int(syscall[3], 16) <= POLL_S * 1000
    return "poll" in wchan


class Writer(threading.Thread):
    """Appends numbered messages in small batches, ``pause`` s apart, until stopped or at ``limit`` (a live writer)."""

    def __init__(self, server: ServerProcess, limit: int, batch: int = 10, prefix: bytes = b"m",
                 tolerate_errors: bool = False, pause: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.tolerate_errors = tolerate_errors
        self.pause = pause
        self.server, self.limit, self.batch, self.prefix = server, limit, batch, prefix
        self.written = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            with Client(self.server.host, self.server.port, timeout=30, retry=Retry(attempts=None)) as client:
                while not self._halt.is_set() and self.written < self.limit:
                    n = min(self.batch, self.limit - self.written)
                    try:
                        client.append(*[b"%s%09d" % (self.prefix, self.written + i) for i in range(n)])
                    except LogdError:
                        if not self.tolerate_errors:
                            raise
                    self.written += n  # sent: appended or (logd was killed) maybe not; the log says which
                    self._halt.wait(self.pause)  # pacing: a steady writer, not a burst
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc

    def stop(self) -> int:
        """Stop and return how many messages were written; raise what the writer hit."""
        self._halt.set()
        self.join(30)
        if self.error is not None:
            raise self.error
        return self.written
