"""Replication benchmark: catch-up speed and replication lag under steady load.

    python -m bench.replication_bench [--catch-up-mb 300] [--rate 100000] [--seconds 10]
                                      [--size 100] [--out bench/replication_results.json]

1. Catch-up, for 100-byte and 1 KiB messages, about ``--catch-up-mb`` of
   segments each (MB/s of segment bytes, msgs/s):
   - paused: a follower is paused (SIGSTOP) while the leader takes the
     messages, then resumed (SIGCONT); timed from SIGCONT until its HEAD
     holds them all;
   - new: a follower with an empty data dir is started once the leader holds
     them; timed from the spawn of its process (Python start-up included),
     and also from when it listens (start-up left out); three of them in
     turn, the median reported.
   Beside them, the disk's ceiling: ``os.write`` of 1 MiB blocks to a file
   in the same temp dir, then ``fdatasync`` (a follower at ``--fsync
   always`` makes every round durable before it ACKs, so it cannot go
   faster than that). Then the same runs again with every data dir on
   tmpfs (``/dev/shm``, when there is one), where there is no disk to wait
   for: what logd's own replication path can do.
2. Lag: a producer writes ``--rate`` msgs/s for ``--seconds`` in batches
   every 10 ms; a tail on the follower notes when each batch's last id becomes
   visible there. Lag = that time minus the time the leader acknowledged the
   batch (one clock: same process). Prints p50/p99/max.

Both servers run with --fsync always on 127.0.0.1. Every process is stopped
by its pid; a paused one is resumed in a finally.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from logd import protocol

NEW_RUNS = 3  # new followers timed per message size; the median is reported
LISTEN_RE = re.compile(rb"logd listening on 127\.0\.0\.1:(\d+)")
REPO_ROOT = Path(__file__).resolve().parent.parent


class Proc:
    """A `logd serve` child."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "logd.cli", "serve", "--port", "0", "--data-dir", str(data_dir),
             "--log-level", "warning", *args],
            stdout=subprocess.PIPE, stderr=open(str(data_dir) + ".stderr", "wb"), cwd=REPO_ROOT,
        )
        assert self.proc.stdout is not None
        m = LISTEN_RE.search(self.proc.stdout.readline())
        if not m:
            self.stop()
            raise RuntimeError(f"logd did not start, see {data_dir}.stderr")
        self.port = int(m.group(1))
        self.data_dir = data_dir

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _command(port: int, cmd: bytes) -> list[bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(cmd)
        buf = b""
        while not buf.endswith(b"\r\n"):
            buf += s.recv(65536)
        if buf.startswith(b"OK ") and cmd == b"STATS\r\n":
            n = int(buf.split(b"\r\n", 1)[0][3:])
            while buf.count(b"\r\n") < n + 1:
                buf += s.recv(65536)
        return buf.split(b"\r\n")[:-1]


def head(port: int) -> int:
    return int(_command(port, b"HEAD\r\n")[0].split()[1])


def log_bytes(port: int) -> int:
    lines = _command(port, b"STATS\r\n")
    return int(dict(line.split(b" ", 1) for line in lines[1:])[b"bytes"])


def wait_head(port: int, target: int, timeout: float) -> float:
    """Poll HEAD until it reaches target; return when (monotonic)."""
    deadline = time.monotonic() + timeout
    while head(port) < target:
        if time.monotonic() > deadline:
            raise RuntimeError(f"HEAD did not reach {target} within {timeout} s")
        time.sleep(0.002)
    return time.monotonic()


def write_bulk(port: int, total: int, size: int, batch: int = 1000) -> None:
    """Pipelined MSGs of ``batch`` messages; waits for every reply."""
    body = b"x" * size
    cmd = b"MSG " + b" ".join([b"%d" % size] * batch) + b"\r\n" + (body + b"\r\n") * batch
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        sent = 0
        replies = 0
        buf = b""
        while replies < total // batch:
            while sent < total // batch and sent - replies < 64:
                s.sendall(cmd)
                sent += 1
            buf += s.recv(65536)
            replies += buf.count(b"\n")
            buf = buf[buf.rfind(b"\n") + 1 :]


def bench_catch_up(tmp: Path, mb: int, size: int) -> dict[str, Any]:
    """Both catch-up cases for one message size (see the module docstring)."""
    messages = (mb << 20) // (size + 30) // 1000 * 1000
    leader = Proc(tmp / f"catchup-leader-{size}")
    paused_follower = Proc(tmp / f"catchup-paused-{size}", "--replica-of", leader.addr)
    new_follower: Proc | None = None
    try:
        wait_head(paused_follower.port, 0, 10)
        paused = True
        os.kill(paused_follower.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            write_bulk(leader.port, messages, size)
            write_s = time.monotonic() - t0
            nbytes = log_bytes(leader.port)
            # Write back what the set-up dirtied, so the kernel's flusher does
            # not compete with the follower for the CPUs during the timing.
            os.sync()
            t1 = time.monotonic()
            os.kill(paused_follower.proc.pid, signal.SIGCONT)
            paused = False
        finally:
            if paused:
                os.kill(paused_follower.proc.pid, signal.SIGCONT)
        paused_s = wait_head(paused_follower.port, messages, 300) - t1
        paused_follower.stop()
        # New followers, one after another, each from an empty data dir: the
        # median of NEW_RUNS, since this VM's page-cache writes vary a lot.
        new_runs: list[tuple[float, float]] = []
        for attempt in range(NEW_RUNS):
            os.sync()
            t2 = time.monotonic()
            new_follower = Proc(tmp / f"catchup-new-{size}-{attempt}", "--replica-of", leader.addr)
            started_s = time.monotonic() - t2  # Python start-up, until it listens
            new_runs.append((wait_head(new_follower.port, messages, 300) - t2, started_s))
            new_follower.stop()
            new_follower = None
            shutil.rmtree(tmp / f"catchup-new-{size}-{attempt}", ignore_errors=True)
        new_s, started_s = sorted(new_runs)[len(new_runs) // 2]
        return {
            "body_bytes": size,
            "messages": messages,
            "bytes": nbytes,
            "leader_write_msgs_per_s": messages / write_s,
            "paused_s": paused_s,
            "paused_msgs_per_s": messages / paused_s,
            "paused_mb_per_s": nbytes / paused_s / 1e6,
            "new_s": new_s,
            "new_msgs_per_s": messages / new_s,
            "new_mb_per_s": nbytes / new_s / 1e6,
            "new_startup_s": started_s,
            "new_streaming_mb_per_s": nbytes / (new_s - started_s) / 1e6,
            "new_runs_mb_per_s": [nbytes / s / 1e6 for s, _ in new_runs],
        }
    finally:
        for p in (new_follower, paused_follower, leader):
            if p is not None:
                p.stop()


def write_ceiling(tmp: Path, mb: int) -> float:
    """MB/s of ``os.write`` of 1 MiB blocks, then one ``fdatasync``, on ``tmp``'s file system."""
    block = os.urandom(1 << 20)
    path = tmp / "ceiling.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        t0 = time.perf_counter()
        for _ in range(mb):
            os.write(fd, block)
        os.fdatasync(fd)
        secs = time.perf_counter() - t0
    finally:
        os.close(fd)
        path.unlink()
    return (mb << 20) / secs / 1e6


class Tail(threading.Thread):
    """A READ tail on the follower: notes when each id becomes visible there."""

    def __init__(self, port: int, wanted: set[int]) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.wanted = wanted
        self.seen: dict[int, float] = {}
        self.stop_at = 0

    def run(self) -> None:
        client = protocol.ClientProtocol()
        self.sock.sendall(client.send(protocol.Read(1, 0)))
        try:
            while True:
                data = self.sock.recv(1 << 20)
                now = time.monotonic()
                if not data:
                    return
                for rep in client.receive_data(data):
                    if type(rep) is protocol.Record:
                        if rep.id in self.wanted:
                            self.seen[rep.id] = now
                        if self.stop_at and rep.id >= self.stop_at:
                            return
        except OSError:
            return


def bench_lag(tmp: Path, rate: int, seconds: float, size: int) -> dict[str, float]:
    leader = Proc(tmp / "lag-leader")
    follower = Proc(tmp / "lag-follower", "--replica-of", leader.addr)
    batch = max(1, rate // 100)  # one MSG every 10 ms
    rounds = int(seconds * 100)
    acked: dict[int, float] = {}
    wanted = {batch * (k + 1) for k in range(rounds)}
    tail = Tail(follower.port, wanted)
    tail.start()
    body = b"y" * size
    cmd = b"MSG " + b" ".join([b"%d" % size] * batch) + b"\r\n" + (body + b"\r\n") * batch
    behind = 0
    try:
        with socket.create_connection(("127.0.0.1", leader.port), timeout=60) as s:
            buf = b""
            replies = 0

            def reader() -> None:
                nonlocal buf, replies
                while replies < rounds:
                    chunk = s.recv(65536)
                    now = time.monotonic()
                    if not chunk:
                        return
                    buf += chunk
                    *lines, buf = buf.split(b"\r\n")
                    for line in lines:
                        acked[int(line.split()[1])] = now
                        replies += 1

            rt = threading.Thread(target=reader, daemon=True)
            rt.start()
            start = time.monotonic()
            for k in range(rounds):
                due = start + k / 100
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)  # pacing the load, not synchronisation
                else:
                    behind += 1
                s.sendall(cmd)
            rt.join(60)
            elapsed = time.monotonic() - start
        tail.stop_at = batch * rounds
        tail.join(60)
        lags = sorted((tail.seen[i] - acked[i]) * 1000 for i in wanted if i in tail.seen and i in acked)
        if not lags:
            raise RuntimeError("no lag samples")
        return {
            "target_msgs_per_s": rate,
            "achieved_msgs_per_s": batch * rounds / elapsed,
            "late_batches": behind,
            "samples": len(lags),
            "lag_p50_ms": lags[len(lags) // 2],
            "lag_p99_ms": lags[min(len(lags) - 1, len(lags) * 99 // 100)],
            "lag_max_ms": lags[-1],
        }
    finally:
        tail.sock.close()
        follower.stop()
        leader.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catch-up-mb", type=int, default=300, help="segment MB per catch-up run")
    ap.add_argument("--rate", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--size", type=int, default=100, help="message body bytes for the lag run")
    ap.add_argument("--out", default="bench/replication_results.json")
    args = ap.parse_args()
    roots = {"disk": Path(tempfile.mkdtemp(prefix="logd-repl-bench-"))}
    if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > (args.catch_up_mb << 22):
        roots["tmpfs"] = Path(tempfile.mkdtemp(prefix="logd-repl-bench-", dir="/dev/shm"))
    catch: dict[str, list[dict[str, Any]]] = {}
    try:
        for where, tmp in roots.items():
            catch[where] = [bench_catch_up(tmp, args.catch_up_mb, size) for size in (100, 1024)]
            shutil.rmtree(tmp, ignore_errors=True)  # give the memory back before the next runs
            tmp.mkdir()
        ceiling = write_ceiling(roots["disk"], args.catch_up_mb)
        lag = bench_lag(roots["disk"], args.rate, args.seconds, args.size)
    finally:
        for tmp in roots.values():
            shutil.rmtree(tmp, ignore_errors=True)
    for where, runs in catch.items():
        for c in runs:
            for case in ("paused", "new"):
                each = "/".join(f"{v:.0f}" for v in c["new_runs_mb_per_s"])
                extra = (f"  (median of {each}; {c['new_startup_s']:.2f} s of start-up, "
                         f"{c['new_streaming_mb_per_s']:.0f} MB/s without it)" if case == "new" else "")
                print(f"catch-up {where:<5} {case:<6} {c['body_bytes']:>5} B {c['messages']:>10,} msgs "
                      f"{c['bytes'] / 1e6:>6.1f} MB {c[case + '_s']:>6.2f} s {c[case + '_msgs_per_s']:>11,.0f} msgs/s "
                      f"{c[case + '_mb_per_s']:>7.1f} MB/s{extra}")
    print(f"disk ceiling (os.write of 1 MiB blocks + fdatasync): {ceiling:,.0f} MB/s")
    print(f"{'lag':<12} {lag['achieved_msgs_per_s']:>10,.0f} msgs/s (target {lag['target_msgs_per_s']:,})  "
          f"p50 {lag['lag_p50_ms']:.2f} ms  p99 {lag['lag_p99_ms']:.2f} ms  max {lag['lag_max_ms']:.2f} ms  "
          f"({lag['samples']} samples, {lag['late_batches']} late sends)")
    result = {"catch_up": catch, "write_ceiling_mb_per_s": ceiling, "lag": lag, "cpus": os.cpu_count(),
              "lag_body_bytes": args.size}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
