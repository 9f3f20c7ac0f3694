"""``python -m bench``: logd vs Redis Streams, side by side, in one run."""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import matplotlib
import psutil

from . import report
from .cloadgen import BuildError, CLoadgen
from .plan import FULL, QUICK
from .scenarios import Bench
from .servers import (
    FSYNC_MODES,
    REDIS_HOWTO,
    install_redis,
    logd_available,
    redis_binary,
    redis_version,
)

BENCH_DIR = Path(__file__).resolve().parent
ALL_SCENARIOS = {1, 2, 3, 4, 5, 6, 7}
C_SCENARIOS = {1, 2, 4}  # driven by the C load generator (bench/fanin.c) unless --loadgen python
MIN_FILES = 4096  # 1,000 idle connections + the rest, on both sides


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark logd against Redis Streams on this machine, in one run.",
    )
    ap.add_argument("--quick", action="store_true", help="small counts, every scenario touched once (< 60 s); for CI")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where RESULTS.md, latency.png and results.json go (default: bench/, or a temp dir with --quick)",
    )
    ap.add_argument("--only", default="", help="comma-separated scenario numbers to run, e.g. 1,5 (default: all)")
    ap.add_argument("--servers", default="logd,redis", help="which servers to run: logd,redis (default both)")
    ap.add_argument(
        "--seconds", type=float, default=None, help="measured seconds per write run (default 2, or 0.8 with --quick)"
    )
    ap.add_argument(
        "--no-pin", action="store_true", help="do not pin the servers to one CPU and the load generator to another"
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before starting each pair of servers, wait up to this long for other processes to go quiet",
    )
    ap.add_argument(
        "--loadgen",
        choices=("c", "python"),
        default="c",
        help="load generator of scenarios 1, 2 and 4: c (bench/fanin.c, built with gcc; default) or python",
    )
    ap.add_argument(
        "--install-redis", action="store_true", help="apt-get install redis-server if it is missing (root only)"
    )
    ap.add_argument(
        "--no-sink",
        action="store_true",
        help="skip the `logd sink` rows (bench.sink_bench: rows/s into SQLite, PostgreSQL, ClickHouse)",
    )
    return ap.parse_args(argv)


def log(msg: str) -> None:
    print(msg, flush=True)


def warn(msg: str) -> None:
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)


def raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < MIN_FILES:
        target = MIN_FILES if hard == resource.RLIM_INFINITY else min(MIN_FILES, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_begin = time.monotonic()
    plan = QUICK if args.quick else FULL
    if args.seconds:
        plan = replace(plan, seconds=args.seconds)
    only = {int(x) for x in args.only.split(",") if x.strip()} or set(ALL_SCENARIOS)
    kinds = [k.strip() for k in args.servers.split(",") if k.strip()]
    warnings: list[str] = []

    if "redis" in kinds and redis_binary() is None:
        if not (args.install_redis and install_redis()):
            warn(REDIS_HOWTO)
            warnings.append(REDIS_HOWTO)
            kinds.remove("redis")
    if "logd" in kinds:
        ok, why = logd_available()
        if not ok:
            print(f"error: cannot run `logd serve`: {why}", file=sys.stderr)
            return 2
    if not kinds:
        print("error: no server to benchmark", file=sys.stderr)
        return 2

    cgen: CLoadgen | None = None
    if args.loadgen == "c" and only & C_SCENARIOS:
        try:
            cgen = CLoadgen()
        except BuildError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    raise_file_limit()
    cpus = sorted(os.sched_getaffinity(0))
    pin = not args.no_pin and len(cpus) >= 2
    server_cpu = cpus[0] if pin else None
    if pin:
        os.sched_setaffinity(0, {cpus[1]})  # the load generator; servers get cpus[0]
    out = args.out or (Path(tempfile.gettempdir()) / "logd-bench-quick" if args.quick else BENCH_DIR)

    meta: dict[str, Any] = {
        "date": report.now_iso(),
        "quick": args.quick,
        "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        "machine": report.machine(),
        "disk_fdatasync_us": report.disk_fdatasync_us(),
        "pinned": {"server_cpu": cpus[0], "loadgen_cpu": cpus[1]} if pin else None,
        "servers": kinds,
        "scenarios": sorted(only),
        "fsync_modes": {m: {"logd": a, "redis": b} for m, (a, b) in FSYNC_MODES.items()},
        "plan": asdict(plan),
        "versions": {
            "redis_server": redis_version(),
            "psutil": psutil.__version__,
            "matplotlib": matplotlib.__version__,
        },
        "warnings": warnings,
        "loadgen": {
            "scenarios_1_2_4": cgen.description if cgen else "python (bench/loadgen.py, one thread)",
            "other_scenarios": "python (bench/loadgen.py, bench/readers.py, one thread)",
        },
    }
    log(
        f"logd vs Redis benchmark ({'quick' if args.quick else 'full'}), "
        f"servers: {', '.join(kinds)}, scenarios: {','.join(map(str, sorted(only)))}"
    )
    bench = Bench(plan, tuple(kinds), server_cpu, log, args.wait_quiet, cgen)
    status = 0
    try:
        bench.run(only)
    except Exception as e:  # report what was measured, then fail
        traceback.print_exc()
        meta["error"] = f"{type(e).__name__}: {e}"
        warnings.append(f"the run stopped early: {meta['error']}")
        status = 1
    finally:
        if cgen:
            cgen.close()
    meta["versions"].update(bench.versions)
    if bench.errors:
        status = 1
        warnings.extend(f"failed: {e}" for e in bench.errors)
    meta["wall_seconds"] = round(time.monotonic() - t_begin, 1)
    text = report.write_all(out, meta, bench.results)
    print()
    print(text)
    log(f"wrote {out / 'RESULTS.md'}, {out / 'latency.png'}, {out / 'results.json'} in {meta['wall_seconds']} s")
    if not args.no_sink:
        run_sink_bench(args.quick, out)
    return status


def run_sink_bench(quick: bool, out: Path) -> None:
    """The `logd sink` rows: their own table and sink_results.json (a missing database is a warning here)."""
    from . import sink_bench
    from .databases import DatabaseMissing

    log("\nlogd sink: rows/s into SQLite, PostgreSQL and ClickHouse (bench.sink_bench)")
    try:
        sink_bench.main([*(["--quick"] if quick else []), "--out", str(out / "sink_results.json")])
    except DatabaseMissing as exc:
        warn(f"the sink rows are skipped: {exc}")


if __name__ == "__main__":
    sys.exit(main())
