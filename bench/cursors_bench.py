"""The cost of creating named cursors (issue 22, finding 9): COMMIT must not cost O(cursors).

    python -m bench.cursors_bench [--cursors 66000] [--fsync F ...] [--out FILE] [--repo CHECKOUT]

For each ``--fsync`` policy (default: interval:1000, then always) it starts a
fresh `logd serve`, appends one message, then one client creates
``--cursors`` cursors (``COMMIT c-<k> 1``, pipelined, 256 in flight) while a
second client sends one PING every 20 ms and times each PONG. The table shows
the time per thousand cursors over the run (flat when a COMMIT costs O(1),
growing when it walks every cursor) and the PING latency; JSON gets every
figure. Measured, not asserted: speed belongs here, not in the tests. Under
``always`` each COMMIT waits for its own fsync (cursor commands act only once
every earlier reply is known, protocol.md 3.1), so that row measures the disk.
``--repo`` runs another checkout's logd, to compare before and after.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LISTEN = re.compile(rb"listening on ([\d.]+):(\d+)")
WINDOW = 256  # COMMITs in flight
PING_EVERY_S = 0.02


def _lines(sock: socket.socket, buf: bytearray, n: int) -> list[bytes]:
    """Read ``n`` reply lines."""
    out: list[bytes] = []
    while len(out) < n:
        i = buf.find(b"\r\n")
        if i < 0:
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
            continue
        out.append(bytes(buf[:i]))
        del buf[: i + 2]
    return out


def _pinger(addr: tuple[str, int], stop: threading.Event, samples: list[float]) -> None:
    with socket.create_connection(addr, timeout=60) as sock:
        buf = bytearray()
        while not stop.is_set():
            t0 = time.perf_counter()
            sock.sendall(b"PING\r\n")
            assert _lines(sock, buf, 1) == [b"PONG"]
            samples.append(time.perf_counter() - t0)
            stop.wait(PING_EVERY_S)


def run(cursors: int, fsync: str, repo: Path = REPO) -> dict[str, object]:
    data = Path(tempfile.mkdtemp(prefix="logd-cursors-bench-"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "logd.cli", "serve", "--port", "0", "--data-dir", str(data), "--fsync", fsync,
         "--log-level", "warning"],
        cwd=repo, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        m = LISTEN.search(proc.stdout.readline())
        if not m:
            raise RuntimeError("logd did not start")
        addr = (m.group(1).decode(), int(m.group(2)))
        pings: list[float] = []
        stop = threading.Event()
        with socket.create_connection(addr, timeout=120) as sock:
            buf = bytearray()
            sock.sendall(b"MSG 1\r\nx\r\n")
            assert _lines(sock, buf, 1) == [b"OK 1"]
            pinger = threading.Thread(target=_pinger, args=(addr, stop, pings), daemon=True)
            pinger.start()
            per_thousand: list[float] = []
            start = mark = time.perf_counter()
            sent = done = 0
            while done < cursors:
                batch = b"".join(b"COMMIT c-%d 1\r\n" % k for k in range(sent, min(cursors, done + WINDOW)))
                n = batch.count(b"\n")
                sock.sendall(batch)
                sent += n
                replies = _lines(sock, buf, n)
                assert all(r == b"OK" for r in replies), replies[:3]
                before, done = done, done + n
                if done // 1000 > before // 1000:
                    now = time.perf_counter()
                    per_thousand.append(now - mark)
                    mark = now
            total = time.perf_counter() - start
            stop.set()
            pinger.join(30)
        first, last = per_thousand[:5], per_thousand[-5:]
        return {
            "cursors": cursors,
            "fsync": fsync,
            "seconds": round(total, 3),
            "cursors_per_s": round(cursors / total),
            "ms_per_1000_first": round(statistics.median(first) * 1000, 1),
            "ms_per_1000_last": round(statistics.median(last) * 1000, 1),
            "ping_p50_ms": round(statistics.median(pings) * 1000, 2),
            "ping_max_ms": round(max(pings) * 1000, 2),
            "pings": len(pings),
        }
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cursors", type=int, default=66000)
    ap.add_argument("--fsync", action="append", help="a policy to run (repeat for several)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "cursors_results.json",
                    help="write the figures as JSON here")
    ap.add_argument("--repo", type=Path, default=REPO, help="the checkout whose logd to run (to compare two)")
    args = ap.parse_args()
    print(f"{'cursors':>8} {'fsync':>14} {'seconds':>8} {'per s':>8} {'ms/1000 first':>14} {'ms/1000 last':>13}"
          f" {'PING p50 ms':>12} {'PING max ms':>12}")
    rows = []
    for fsync in args.fsync or ["interval:1000", "always"]:
        row = run(args.cursors, fsync, args.repo)
        rows.append(row)
        print(f"{row['cursors']:>8} {row['fsync']:>14} {row['seconds']:>8} {row['cursors_per_s']:>8}"
              f" {row['ms_per_1000_first']:>14} {row['ms_per_1000_last']:>13} {row['ping_p50_ms']:>12}"
              f" {row['ping_max_ms']:>12}", flush=True)
    out = {"rows": rows, "repo": str(args.repo),
           "machine": {"python": platform.python_version(), "arch": platform.machine()}}
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
