"""What idle, stalled and parked readers cost the writer (issue 12, findings 7-9).

    python -m bench.tails_bench [--baseline DIR] [--seconds 4] [--out bench/tails_results.json]

For each logd tree (this one, and with ``--baseline`` another checkout, e.g.
a ``git worktree`` of an older commit, run side by side in the same run), on
a fresh server with ``--fsync interval:1000``:

- batched writes (MSG of 100 x 100 B, 8 in flight) with no readers;
- the same with 200 tails that stopped reading (a 32 MiB log to send them);
- the same with 9,000 tails parked on a far-future id;
- STATS round trips with 5,000 idle connections open.

Prints a table and writes JSON. Every loop is bounded by a deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .servers import LISTEN_RE, REPO_ROOT

BODY = b"x" * 100
BATCH = 100
IN_FLIGHT = 8
MSG = b"MSG " + b" ".join([b"100"] * BATCH) + b"\r\n" + (BODY + b"\r\n") * BATCH


def start(tree: Path, workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOGD_")}
    env["PYTHONPATH"] = str(tree)
    out = open(workdir / "stdout", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "logd.cli", "serve", "--port", "0", "--data-dir", str(workdir / "data"),
         "--fsync", "interval:1000", "--log-level", "warning", "--max-connections", "12000"],
        cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = LISTEN_RE.search((workdir / "stdout").read_bytes())
        if m:
            return proc, int(m.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError(f"logd from {tree} did not start: {(workdir / 'stdout').read_bytes()[-2000:]!r}")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def connect(port: int, rcvbuf: int = 0) -> socket.socket:
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    s.settimeout(30)
    return s


def write_rate(port: int, seconds: float) -> float:
    """Messages per second from one writer keeping IN_FLIGHT batches in flight."""
    s = connect(port)
    for _ in range(IN_FLIGHT):
        s.sendall(MSG)
    done = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while time.perf_counter() < deadline:
        n = s.recv(65536).count(b"\n")
        done += n
        for _ in range(n):
            s.sendall(MSG)
    elapsed = time.perf_counter() - t0
    s.close()
    return done * BATCH / elapsed


def fill(port: int, nbytes: int) -> None:
    s = connect(port)
    batches = nbytes // len(MSG) + 1
    for _ in range(batches):
        s.sendall(MSG)
    got = 0
    while got < batches:
        got += s.recv(65536).count(b"\n")
    s.close()


def stats(s: socket.socket) -> bytes:
    """Send STATS and return the lines after its ``OK <n>`` line, once all n have arrived."""
    s.sendall(b"STATS\r\n")
    buf = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("logd closed the connection before answering STATS")
        buf += chunk
        head, _, rest = buf.partition(b"\r\n")
        if head.startswith(b"OK ") and rest.count(b"\r\n") >= int(head[3:]):
            return rest


def settle_output(port: int, timeout: float = 30.0) -> None:
    """Wait until the server's unsent output (STATS output_bytes) stops growing: the tails are full."""
    s = connect(port)
    last, steady = -1, 0
    deadline = time.monotonic() + timeout
    while steady < 3 and time.monotonic() < deadline:
        rest = stats(s)
        now = int(dict(line.split(b" ", 1) for line in rest.split(b"\r\n") if b" " in line).get(b"output_bytes", 0))
        steady = steady + 1 if now == last and now > 0 else 0
        last = now
        time.sleep(0.05)  # the polling interval of a condition with a deadline
    s.close()


def stats_rtt_us(port: int, count: int = 300) -> float:
    s = connect(port)
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        stats(s)
        times.append((time.perf_counter() - t0) * 1e6)
    s.close()
    return statistics.median(times)


def run_tree(tree: Path, seconds: float) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in ("alone", "stalled_tails", "parked_tails", "stats"):
        with tempfile.TemporaryDirectory(prefix="logd-tails-bench-") as tmp:
            proc, port = start(tree, Path(tmp))
            held: list[socket.socket] = []
            try:
                if name == "alone":
                    out["write_alone"] = write_rate(port, seconds)
                elif name == "stalled_tails":
                    fill(port, 32 << 20)
                    for _ in range(200):
                        s = connect(port, rcvbuf=4096)
                        s.sendall(b"READ 1\r\n")
                        held.append(s)
                    settle_output(port)  # every tail holds its budget before the writer starts
                    out["write_200_stalled"] = write_rate(port, seconds)
                    out["rss_mb_200_stalled"] = rss_mb(proc.pid)
                elif name == "parked_tails":
                    for _ in range(9000):
                        s = connect(port)
                        s.sendall(b"READ 1000000000\r\n")
                        held.append(s)
                    out["write_9000_parked"] = write_rate(port, seconds)
                else:
                    out["stats_us_alone"] = stats_rtt_us(port)
                    for _ in range(5000):
                        held.append(connect(port))
                    out["stats_us_5000_idle"] = stats_rtt_us(port)
            finally:
                for s in held:
                    s.close()
                proc.kill()
                proc.wait()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, help="another logd checkout to run side by side")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "tails_results.json")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 12000:
        sys.exit(f"needs 12000 file descriptors (hard limit {hard})")
    trees = {"this": REPO_ROOT}
    if args.baseline:
        trees = {"baseline": args.baseline.resolve(), "this": REPO_ROOT}
    results = {name: run_tree(tree, args.seconds) for name, tree in trees.items()}
    rows = [
        ("batched write, no readers (msg/s)", "write_alone"),
        ("batched write, 200 tails not reading (msg/s)", "write_200_stalled"),
        ("server RSS with 200 tails not reading (MB)", "rss_mb_200_stalled"),
        ("batched write, 9,000 tails parked far ahead (msg/s)", "write_9000_parked"),
        ("STATS round trip p50, 1 connection (us)", "stats_us_alone"),
        ("STATS round trip p50, 5,000 idle connections (us)", "stats_us_5000_idle"),
    ]
    names = list(results)
    print(f"{'':52}" + "".join(f"{n:>14}" for n in names) + ("  this/baseline" if len(names) == 2 else ""))
    for label, key in rows:
        vals = [results[n][key] for n in names]
        ratio = f"  {vals[1] / vals[0]:.2f}x" if len(vals) == 2 and vals[0] else ""
        print(f"{label:52}" + "".join(f"{v:14.1f}" for v in vals) + ratio)
    args.out.write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "trees": {k: str(v) for k, v in trees.items()},
        "results": results,
    }, indent=2) + "\n")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
