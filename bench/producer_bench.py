"""Client-side throughput (issue 5): the producers and `logd append`, end to end.

    python -m bench.producer_bench [--messages 2000000] [--file-mib 1024] [--out bench/producer_results.json]

Each run gets a fresh `logd serve --fsync interval:1000` on an ephemeral
port and counts only what the server acknowledged (its HEAD is checked
afterwards). Runs:

- raw pipelined MSG: pre-encoded MSGs of 1000 x 100-byte messages written by
  one thread while another counts the replies; no per-message client work.
  The peer in this run: the ceiling the server and the wire allow.
- Producer (sync) / AsyncProducer (uvloop): one ``send(body)`` per 100-byte
  message, each returning a future of its id; then ``flush()``.
- `logd append < FILE` as a subprocess, for a file of 100-byte lines and one
  of 1000-byte lines (the bar is not drawn: stderr is not a terminal).

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
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import uvloop

import logd
from logd.protocol import encode_msg

REPO = Path(__file__).resolve().parent.parent
BODY = b"x" * 100


@contextmanager
def server(root: Path, name: str) -> Iterator[str]:
    """A fresh logd with --fsync interval:1000; yields its URL."""
    data = root / name
    proc = subprocess.Popen(
        [sys.executable, "-m", "logd.cli", "serve", "--port", "0", "--data-dir", str(data),
         "--fsync", "interval:1000", "--log-level", "warning"],
        cwd=REPO, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(rb"listening on ([\d.]+):(\d+)", line)
        if not m:
            raise RuntimeError(f"logd did not start: {line!r}")
        yield f"logd://{m.group(1).decode()}:{m.group(2).decode()}"
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(data, ignore_errors=True)


def head_of(url: str) -> int:
    with logd.connect(url) as c:
        return c.head()


def timed(url: str, expect: int, fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - t0
    head = head_of(url)
    if head != expect:
        raise RuntimeError(f"server holds {head} messages, expected {expect}")
    return elapsed


def run_raw(url: str, n: int) -> None:
    host, port = logd.client.parse_url(url)
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    batch = 1000
    msg = encode_msg([BODY] * batch)
    batches = n // batch

    def count_replies() -> None:
        got = 0
        while got < batches:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise RuntimeError("server closed the connection")
            got += chunk.count(b"\n")

    reader = threading.Thread(target=count_replies)
    reader.start()
    for _ in range(batches):
        sock.sendall(msg)
    reader.join()
    sock.close()


def run_sync_producer(url: str, n: int) -> None:
    with logd.Producer(url) as producer:
        send = producer.send
        for _ in range(n):
            last = send(BODY)
        producer.flush()
    last.result()


def run_async_producer(url: str, n: int) -> None:
    async def go() -> None:
        async with logd.AsyncProducer(url) as producer:
            send = producer.send
            for _ in range(n):
                last = await send(BODY)
            await producer.flush()
        await last

    uvloop.run(go())


def make_file(path: Path, mib: int, line_bytes: int) -> int:
    """``mib`` MiB of ``line_bytes``-byte lines (newline included); returns the line count."""
    line = b"y" * (line_bytes - 1) + b"\n"
    block = line * ((1 << 20) // line_bytes)
    lines_per_block = len(block) // line_bytes
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(block)
    return lines_per_block * mib


def run_cli_append(url: str, path: Path) -> None:
    with open(path, "rb") as stdin:
        proc = subprocess.run([sys.executable, "-m", "logd.cli", "append", "-q", "--url", url],
                              stdin=stdin, cwd=REPO, capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.decode())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=2_000_000, help="100-byte messages per producer run")
    ap.add_argument("--file-mib", type=int, default=1024, help="size of each file piped to `logd append`")
    ap.add_argument("--out", default=str(REPO / "bench" / "producer_results.json"))
    args = ap.parse_args()
    n = args.messages - args.messages % 1000
    root = Path(tempfile.mkdtemp(prefix="logd-producer-bench-"))
    rows: list[dict[str, object]] = []
    try:
        for name, fn in (
            ("raw pipelined MSG x1000 (peer)", run_raw),
            ("Producer (sync, futures)", run_sync_producer),
            ("AsyncProducer (uvloop, futures)", run_async_producer),
        ):
            with server(root, "p") as url:
                seconds = timed(url, n, lambda fn=fn, url=url: fn(url, n))  # type: ignore[misc]
            rows.append({"run": name, "messages": n, "bytes": n * len(BODY), "seconds": seconds,
                         "messages_per_s": n / seconds, "mb_per_s": n * len(BODY) / seconds / 1e6})
        for line_bytes in (100, 1000):
            path = root / f"lines{line_bytes}"
            lines = make_file(path, args.file_mib, line_bytes)
            size = path.stat().st_size
            with server(root, "a") as url:
                seconds = timed(url, lines, lambda url=url, path=path: run_cli_append(url, path))  # type: ignore[misc]
            path.unlink()
            rows.append({"run": f"logd append < {args.file_mib} MiB of {line_bytes}-byte lines",
                         "messages": lines, "bytes": size, "seconds": seconds,
                         "messages_per_s": lines / seconds, "mb_per_s": size / seconds / 1e6})
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"{'run':<46} {'messages':>10} {'seconds':>8} {'msg/s':>11} {'MB/s':>8}")
    for r in rows:
        print(f"{r['run']:<46} {r['messages']:>10} {r['seconds']:>8.2f} {r['messages_per_s']:>11,.0f} "
              f"{r['mb_per_s']:>8.1f}")
    result = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "server": "logd serve --fsync interval:1000 (fresh per run)",
        "runs": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
