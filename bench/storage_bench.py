"""Storage engine figures (issue 2), in-process, no network.

    python -m bench.storage_bench [--messages 10000000] [--out bench/storage_results.json]

Prints a table and writes JSON: append throughput (100-byte messages,
batches of 100, fsync=never and fsync=always with one sync per batch),
locate latency of random ids in a log of N messages, and reopen time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import tempfile
import time

from logd.storage import Log


def bench_append(directory: str, total: int, batch: int, fsync: str) -> float:
    bodies = [b"x" * 100] * batch
    log = Log(directory, fsync=fsync)
    t0 = time.perf_counter()
    for _ in range(total // batch):
        log.append(bodies)
        if fsync == "always":
            log.sync()
    elapsed = time.perf_counter() - t0
    log.close()
    return total / elapsed


def bench_locate(log: Log, samples: int) -> list[float]:
    ids = [random.randint(log.first, log.head) for _ in range(samples)]
    out = []
    for i in ids:
        t0 = time.perf_counter_ns()
        log.span(i, 1)
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--messages", type=int, default=10_000_000)
    ap.add_argument("--out", default="bench/storage_results.json")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="logd-storage-bench-")
    try:
        never = bench_append(os.path.join(root, "a"), args.messages, 100, "never")
        always = bench_append(os.path.join(root, "b"), min(args.messages, 200_000), 100, "always")
        t0 = time.perf_counter()
        log = Log(os.path.join(root, "a"), fsync="never")
        reopen_s = time.perf_counter() - t0
        bench_locate(log, 1000)  # warm the index maps
        lat = sorted(bench_locate(log, 100_000))
        segments = log.segment_count
        log.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "messages": args.messages,
        "segments": segments,
        "append_never_msgs_per_s": round(never),
        "append_always_msgs_per_s": round(always),
        "locate_p50_us": round(statistics.median(lat), 2),
        "locate_p99_us": round(lat[int(len(lat) * 0.99)], 2),
        "locate_max_us": round(lat[-1], 2),
        "reopen_s": round(reopen_s, 4),
    }
    print(f"{'figure':<32}{'value':>16}{'goal':>16}")
    print(f"{'append, fsync=never (msg/s)':<32}{result['append_never_msgs_per_s']:>16,}{'>= 1,000,000':>16}")
    print(f"{'append, fsync=always (msg/s)':<32}{result['append_always_msgs_per_s']:>16,}{'(100/sync)':>16}")
    print(f"{'locate p50 (us)':<32}{result['locate_p50_us']:>16}{'< 50':>16}")
    print(f"{'locate p99 (us)':<32}{result['locate_p99_us']:>16}{'< 50':>16}")
    print(f"{'reopen ' + format(args.messages, ',') + ' msgs (s)':<32}{result['reopen_s']:>16}{'< 0.5':>16}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
