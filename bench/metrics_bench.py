"""The cost of the metrics endpoint on the append path (issue 17): the same load with metrics off and on.

    python -m bench.metrics_bench [--rounds 3] [--out bench/metrics_results.json]

Each run starts a fresh `logd serve` (``--metrics-port 0`` when on, with a
process scraping /metrics every 0.2 s, far more often than a Prometheus
would) and runs two loads, counting only what the server acknowledged:

- pipelined: pre-encoded MSGs of 1000 x 100-byte messages from one
  connection (``--fsync interval:1000``): the per-message path.
- group commit: 16 connections, each sending one 100-byte message and
  waiting for its OK, under ``--fsync always``: one fsync and one histogram
  observation per round.

Runs alternate off/on, ``--rounds`` times; the table shows the median.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from logd.protocol import encode_msg

REPO = Path(__file__).resolve().parent.parent
BODY = b"x" * 100
LISTEN = re.compile(rb"listening on ([\d.]+):(\d+)")
METRICS = re.compile(rb"logd metrics on (http://\S+)")


@contextmanager
def server(root: Path, fsync: str, metrics: bool) -> Iterator[tuple[str, int]]:
    """A fresh logd; with ``metrics``, a thread scrapes it every 0.2 s while it runs."""
    data = Path(tempfile.mkdtemp(dir=root))
    args = ["--metrics-port", "0"] if metrics else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "logd.cli", "serve", "--port", "0", "--data-dir", str(data), "--fsync", fsync,
         "--log-level", "warning", *args],
        cwd=REPO, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    scraper: subprocess.Popen[bytes] | None = None
    try:
        assert proc.stdout is not None
        m = LISTEN.search(proc.stdout.readline())
        if not m:
            raise RuntimeError("logd did not start")
        if metrics:
            url = METRICS.search(proc.stdout.readline())
            assert url is not None
            # In its own process, so it takes no CPU time from the load generator's threads.
            scraper = subprocess.Popen([sys.executable, "-c", SCRAPER, url.group(1).decode()])
        yield m.group(1).decode(), int(m.group(2))
    finally:
        if scraper is not None:
            scraper.terminate()
            scraper.wait(30)
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(data, ignore_errors=True)


SCRAPER = """
import sys, time, urllib.request
while True:
    with urllib.request.urlopen(sys.argv[1], timeout=10) as resp:
        resp.read()
    time.sleep(0.2)
"""


def pipelined(addr: tuple[str, int], n: int) -> float:
    """Messages per second of pre-encoded 1000-message MSGs on one connection."""
    sock = socket.create_connection(addr)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = encode_msg([BODY] * 1000)
    batches = n // 1000

    def count() -> None:
        got = 0
        while got < batches:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise RuntimeError("server closed the connection")
            got += chunk.count(b"\n")

    reader = threading.Thread(target=count)
    t0 = time.perf_counter()
    reader.start()
    for _ in range(batches):
        sock.sendall(msg)
    reader.join()
    elapsed = time.perf_counter() - t0
    sock.close()
    return batches * 1000 / elapsed


def group_commit(addr: tuple[str, int], clients: int, each: int) -> float:
    """Messages per second from ``clients`` connections each waiting for every OK (fsync=always)."""
    one = encode_msg([BODY])

    def client() -> None:
        with socket.create_connection(addr) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(each):
                sock.sendall(one)
                reply = b""
                while not reply.endswith(b"\n"):
                    chunk = sock.recv(64)
                    if not chunk:
                        raise RuntimeError("server closed the connection")
                    reply += chunk

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return clients * each / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--messages", type=int, default=300_000, help="messages per pipelined run")
    ap.add_argument("--out", default=str(REPO / "bench" / "metrics_results.json"))
    opts = ap.parse_args()
    results: dict[str, dict[str, list[float]]] = {
        "pipelined msg/s": {"off": [], "on": []},
        "group commit msg/s": {"off": [], "on": []},
    }
    root = Path(tempfile.mkdtemp(prefix="logd-metrics-bench-"))
    try:
        for _ in range(opts.rounds):
            for mode in ("off", "on"):
                with server(root, "interval:1000", mode == "on") as addr:
                    results["pipelined msg/s"][mode].append(pipelined(addr, opts.messages))
                with server(root, "always", mode == "on") as addr:
                    results["group commit msg/s"][mode].append(group_commit(addr, 16, 500))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'load':<22}{'metrics off':>14}{'metrics on':>14}{'on/off':>9}   (median of {opts.rounds})")
    summary = {}
    for load, runs in results.items():
        off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
        summary[load] = {"off": round(off), "on": round(on), "ratio": round(on / off, 3), "runs": runs}
        print(f"{load:<22}{off:>14,.0f}{on:>14,.0f}{on / off:>9.3f}")
    Path(opts.out).write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(),
                                          "results": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
