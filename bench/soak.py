"""Soak: a leader and a follower under a mixed load for minutes; does anything grow? (issue 29)

    python -m bench.soak [--minutes 10] [--rate 15000] [--sample-s 5] [--out bench/soak_results.json]

The leader runs with ``--fsync always``, 8 MiB segments, 256 MiB retention,
``--retention-keep-cursors`` and metrics on; one follower replicates it.
The load, each client a process of its own (bench/soak_load.py, logd's
Python client):

- 8 writers, ``--rate`` messages/s in all, MSGs of 10 x 100 B, each
  reconnecting after 100-1000 MSGs;
- 4 tails from id 1 checking that every id follows the last, one of them on
  the follower and one resuming at its last id + 1 every 30 s;
- 2 Consumers on server cursors, committing every batch;
- 20 short-lived connections a second (PING, HEAD or STATS), to both servers;
- a scrape of both servers' /metrics every 2 s.

Every ``--sample-s`` it samples, for leader and follower: RSS (and its
anonymous part), descriptors (sockets apart), threads, STATS ``connections``
and ``tails``. It prints the slope of each over the second half of the load
(least squares, per minute). When the load stops, the writers stop; once the
follower has caught up and every tail and consumer waits at the head, they
are killed (clients that exit while they wait on a quiet log); then the
sockets and connections of both must come back to their baseline from
before the load (the shared segment read handles and mapped indexes, at most
32, may stay open), every acknowledged message must be in the log and every
tail must have seen every id in order. Writes JSON.
Processes are stopped by pid.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import soak_load

REPO = Path(__file__).resolve().parent.parent
LISTEN = re.compile(rb"logd listening on ([\d.]+):(\d+)")
METRICS = re.compile(rb"logd metrics on (http://\S+)")
MiB = 1 << 20
LEADER_ARGS = ["--fsync", "always", "--segment-bytes", str(8 * MiB), "--retention-bytes", str(256 * MiB),
               "--retention-keep-cursors", "--metrics-port", "0"]
FOLLOWER_ARGS = ["--fsync", "always", "--segment-bytes", str(8 * MiB), "--retention-bytes", str(256 * MiB),
                 "--metrics-port", "0"]
WRITERS, BATCH, CHURN = 8, 10, (100, 1000)
RESUME_S = 30.0
PINGS_PER_S = 20.0
SCRAPE_S = 2.0
FILE_CACHES = 32  # segment read handles (16) and mapped closed indexes (16) a server may keep open
SETTLE_S = 60.0  # after the load: how long sockets and connections may take to come back
ACCEPT_SLOPE_MB_PER_MIN = 0.1


class Server:
    """A `logd serve` child process and a connection for STATS."""

    def __init__(self, name: str, workdir: Path, args: list[str]) -> None:
        self.name = name
        data = workdir / name
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOGD_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "logd.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--data-dir",
             str(data), "--log-level", "warning", *args],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=open(workdir / f"{name}.stderr", "wb"),
        )  # fmt: skip
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        m = LISTEN.search(first)
        if not m:
            self.stop()
            raise RuntimeError(f"{name} did not start: {first!r}; see {workdir / f'{name}.stderr'}")
        self.port = int(m.group(2))
        self.url = f"logd://127.0.0.1:{self.port}"
        m = METRICS.search(self.proc.stdout.readline())
        self.metrics_url = m.group(1).decode() if m else ""
        self.monitor = socket.create_connection(("127.0.0.1", self.port), timeout=30)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def command(self, line: bytes) -> list[bytes]:
        """One command on the monitor connection; the reply's lines (all of them for STATS/CURSORS)."""
        self.monitor.sendall(line)
        buf = b""
        while True:
            chunk = self.monitor.recv(1 << 16)
            if not chunk:
                raise ConnectionError(f"{self.name} closed the monitor connection")
            buf += chunk
            lines = buf.split(b"\r\n")
            first = lines[0]
            if len(lines) > 1 and not (first.startswith(b"OK ") and line in (b"STATS\r\n", b"CURSORS\r\n")):
                return lines[:1]
            if len(lines) > 1 and len(lines) - 1 > int(first[3:]):
                return lines[: int(first[3:]) + 1]

    def stats(self) -> dict[str, str]:
        return dict(x.decode().split(" ", 1) for x in self.command(b"STATS\r\n")[1:])

    def cursors(self) -> dict[str, str]:
        return dict(x.decode().split(" ", 1) for x in self.command(b"CURSORS\r\n")[1:])

    def sample(self) -> dict[str, float]:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{self.pid}/status").read_text().splitlines())
        fds = os.listdir(f"/proc/{self.pid}/fd")
        sockets = 0
        for fd in fds:
            try:
                sockets += os.readlink(f"/proc/{self.pid}/fd/{fd}").startswith("socket:")
            except OSError:
                pass  # closed meanwhile
        stats = self.stats()
        return {
            "rss_mb": int(status["VmRSS"].split()[0]) / 1024,
            "anon_mb": int(status["RssAnon"].split()[0]) / 1024,
            "fds": len(fds),
            "sockets": sockets,
            "threads": int(status["Threads"]),
            "connections": int(stats["connections"]),
            "tails": int(stats["tails"]),
            "head": int(stats["log_head"]),
        }

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per minute."""
    n = len(points)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return 0.0 if var == 0 else 60.0 * sum((t - mt) * (v - mv) for t, v in points) / var


def start_clients(leader: Server, follower: Server, rate: float, workdir: Path) -> tuple[Any, list[Any], list[Any]]:
    """The load's processes: (stop event, those stopped by the event, those killed at the end)."""
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    out = workdir / "clients"
    out.mkdir()
    stopped = [
        ctx.Process(target=soak_load.writer, name=f"writer{i}",
                    args=(leader.url, i, rate / WRITERS, BATCH, CHURN, stop, out / f"writer{i}.json"))
        for i in range(WRITERS)
    ]  # fmt: skip
    stopped.append(ctx.Process(target=soak_load.pinger, name="pinger",
                               args=([leader.url, follower.url], PINGS_PER_S, stop, out / "pinger.json")))
    stopped.append(ctx.Process(target=soak_load.scraper, name="scraper",
                               args=([leader.metrics_url, follower.metrics_url], SCRAPE_S, stop, out / "scraper.json")))
    killed = [
        ctx.Process(target=soak_load.tail, name="tail0-resumes", args=(leader.url, RESUME_S, out / "tail0.json")),
        ctx.Process(target=soak_load.tail, name="tail1", args=(leader.url, 0.0, out / "tail1.json")),
        ctx.Process(target=soak_load.tail, name="tail2", args=(leader.url, 0.0, out / "tail2.json")),
        ctx.Process(target=soak_load.tail, name="tail3-follower", args=(follower.url, 0.0, out / "tail3.json")),
        ctx.Process(target=soak_load.consumer, name="consumer-a", args=(leader.url, "soak-a", out / "ca.json")),
        ctx.Process(target=soak_load.consumer, name="consumer-b", args=(leader.url, "soak-b", out / "cb.json")),
    ]  # fmt: skip
    for p in stopped + killed:
        p.start()
    return stop, stopped, killed


def read_counters(workdir: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path in sorted((workdir / "clients").glob("*.json")):
        try:
            out[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            out[path.stem] = {"unreadable": True}
    return out


def settle(
    servers: list[Server], baseline: dict[str, dict[str, float]], t0: float
) -> tuple[float | None, dict[str, Any]]:
    """Wait for sockets and connections to come back to the baseline; (seconds since ``t0``, or None;
    the last samples)."""
    last: dict[str, Any] = {}
    while time.monotonic() - t0 < SETTLE_S:
        last = {s.name: s.sample() for s in servers}
        if all(
            last[s.name]["sockets"] == baseline[s.name]["sockets"]
            and last[s.name]["connections"] == baseline[s.name]["connections"]
            and last[s.name]["tails"] == baseline[s.name]["tails"]
            and last[s.name]["fds"] - last[s.name]["sockets"] <= baseline[s.name]["fds"] - baseline[s.name]["sockets"]
            + FILE_CACHES
            for s in servers
        ):
            return time.monotonic() - t0, last
        time.sleep(0.5)  # polling interval
    return None, last


def wait_parked(servers: list[Server], head: int) -> bool:
    """Wait (up to 2 minutes) for the follower to hold ``head`` and every stream to wait at the head."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        figures = [s.stats() for s in servers]
        if all(int(f["log_head"]) == head and f["waiting_tails"] == f["tails"] for f in figures):
            return True
        time.sleep(0.1)  # polling interval
    return False


def run(minutes: float, rate: float, sample_s: float, workdir: Path) -> dict[str, Any]:
    leader = Server("leader", workdir, LEADER_ARGS)
    follower = Server("follower", workdir, [*FOLLOWER_ARGS, "--replica-of", f"127.0.0.1:{leader.port}"])
    servers = [leader, follower]
    try:
        deadline = time.monotonic() + 30
        while follower.stats().get("replication") != "streaming":
            if time.monotonic() > deadline:
                raise RuntimeError("the follower did not start streaming")
            time.sleep(0.1)
        baseline = {s.name: s.sample() for s in servers}
        stop, stopped, killed = start_clients(leader, follower, rate, workdir)
        samples: list[dict[str, Any]] = []
        t0 = time.monotonic()
        end = t0 + minutes * 60
        next_print = t0 + 60
        max_lag = 0
        while (now := time.monotonic()) < end:
            row: dict[str, Any] = {"t": now - t0}
            for s in servers:
                row[s.name] = s.sample()
            max_lag = max(max_lag, row["leader"]["head"] - row["follower"]["head"])
            samples.append(row)
            if now >= next_print:
                next_print += 60
                lead, fol = row["leader"], row["follower"]
                print(f"  {row['t'] / 60:5.1f} min  head {lead['head']:>10,}  leader RSS {lead['rss_mb']:6.1f} MB "
                      f"conns {lead['connections']:3d}  follower RSS {fol['rss_mb']:6.1f} MB "
                      f"lag {lead['head'] - fol['head']}", flush=True)
            time.sleep(max(0.0, min(sample_s, end - time.monotonic())))  # the sampling period
        load_s = time.monotonic() - t0
        # The load stops: writers and the rest finish; once tails and consumers wait at the head
        # of a quiet log, they are killed (issue 29: their connections stayed until the next append).
        stop.set()
        for p in stopped:
            p.join(60)
            if p.is_alive():
                p.kill()
                p.join()
        head = int(leader.stats()["log_head"])
        parked = wait_parked(servers, head)
        killed_at = time.monotonic()
        for p in killed:
            p.kill()
        for p in killed:
            p.join(60)
        settled_s, after = settle(servers, baseline, killed_at)
        counters = read_counters(workdir)
        written = sum(c.get("messages", 0) for name, c in counters.items() if name.startswith("writer"))
        checks = {
            "follower_caught_up_and_tails_at_the_head": parked,
            "every_acknowledged_message_in_the_log": written == head,  # only the writers append
            "no_gaps_in_tails": all(c.get("gaps", 0) == 0 for n, c in counters.items() if n.startswith("tail")),
            "no_client_errors": all(c.get("errors", 0) == 0 for c in counters.values()),
            "cursors_replicated": leader.cursors() == follower.cursors(),
            "sockets_and_connections_back_to_baseline": settled_s is not None,
        }
        second_half = [r for r in samples if r["t"] >= load_s / 2]
        slopes = {
            s.name: {k: slope_per_min([(r["t"], r[s.name][k]) for r in second_half])
                     for k in ("rss_mb", "anon_mb", "fds", "sockets", "threads", "connections", "tails")}
            for s in servers
        }  # fmt: skip
        checks["rss_slope_under_0.1_mb_per_min"] = all(
            slopes[s.name]["rss_mb"] < ACCEPT_SLOPE_MB_PER_MIN for s in servers
        )
        return {
            "minutes": minutes,
            "load_s": load_s,
            "rate_target_msgs_per_s": rate,
            "messages": head,
            "msgs_per_s": head / load_s,
            "max_follower_lag_messages": max_lag,
            "baseline": baseline,
            "after_load": after,
            "settled_s": settled_s,
            "slopes_per_min_second_half": slopes,
            "checks": checks,
            "clients": counters,
            "samples": samples,
            "exit_status": {s.name: s.stop() for s in (follower, leader)},
        }
    finally:
        for s in (follower, leader):
            s.stop()


def report(result: dict[str, Any]) -> None:
    print(f"\n{result['messages']:,} messages in {result['load_s'] / 60:.1f} min ({result['msgs_per_s']:,.0f} msg/s), "
          f"follower lag at most {result['max_follower_lag_messages']:,} messages")
    first, last = result["samples"][0], result["samples"][-1]
    print(f"\n{'':10} {'metric':12} {'start':>9} {'end':>9} {'slope/min, 2nd half':>21}")
    for name in ("leader", "follower"):
        for key in ("rss_mb", "anon_mb", "fds", "sockets", "threads", "connections", "tails"):
            slope = result["slopes_per_min_second_half"][name][key]
            print(f"{name:10} {key:12} {first[name][key]:9.1f} {last[name][key]:9.1f} {slope:+21.3f}")
    print("\nafter the load (baseline -> now):")
    for name in ("leader", "follower"):
        b, a = result["baseline"][name], result["after_load"].get(name, {})
        print(f"  {name:9} " + ", ".join(f"{k} {b[k]:.0f} -> {a.get(k, float('nan')):.0f}"
                                          for k in ("fds", "sockets", "connections", "tails")))
    settled = result["settled_s"]
    print("  back to baseline (tails and consumers killed at the head of the quiet log): "
          f"{f'after {settled:.1f} s' if settled is not None else f'NO, not within {SETTLE_S:g} s'}")
    print("\nchecks:")
    for name, ok in result["checks"].items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="how long the load runs")
    ap.add_argument("--rate", type=float, default=15000.0, help="messages/s from all writers together")
    ap.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "soak_results.json")
    ap.add_argument("--keep", action="store_true", help="keep the data directories and logs")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="logd-soak-"))
    print(f"soak: {args.minutes:g} min at {args.rate:,.0f} msg/s; working in {workdir}", flush=True)
    try:
        result = run(args.minutes, args.rate, args.sample_s, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                         "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    report(result)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")
    if not all(result["checks"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
