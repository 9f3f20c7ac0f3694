"""Results out: results.json (every figure), RESULTS.md (logd vs Redis), latency.png."""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from .plan import NOISY_OTHER, NOISY_STEAL
from .servers import FSYNC_MODES

Result = dict[str, Any]

# metric -> (label, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "msgs_per_s": ("msg/s", True),
    "mb_per_s": ("MB/s", True),
    "p50_us": ("p50 µs", False),
    "p99_us": ("p99 µs", False),
    "p999_us": ("p99.9 µs", False),
    "rss_mb_base": ("RSS MB, idle server", False),
    "rss_mb_idle_conns": ("RSS MB, idle connections", False),
    "rss_mb_tails": ("RSS MB, tails", False),
    "cpu_pct_idle_tails": ("CPU % of a core, idle tails", False),
    "rss_mb_after_load": ("RSS MB, data loaded", False),
    "max_writer_lag_msgs": ("writer behind schedule, max msgs", False),
}

# Which metrics each scenario shows in the table.
SHOWN: dict[tuple[int, str], tuple[str, ...]] = {
    (1, "latency"): ("p50_us", "p99_us", "p999_us", "msgs_per_s"),
    (2, "pipelined"): ("msgs_per_s",),
    (3, "batched"): ("msgs_per_s", "mb_per_s"),
    (4, "fan-in"): ("msgs_per_s", "p50_us", "p99_us", "p999_us"),
    (5, "bulk load"): ("msgs_per_s", "mb_per_s"),
    (5, "catch-up read"): ("msgs_per_s", "mb_per_s", "rss_mb_after_load"),
    (6, "tail"): ("p50_us", "p99_us", "p999_us", "max_writer_lag_msgs"),
    (7, "footprint"): ("rss_mb_base", "rss_mb_idle_conns", "rss_mb_tails", "cpu_pct_idle_tails"),
}


@dataclass(frozen=True)
class Goal:
    """A target of issue 6 or 12, checked on every matching pair of results."""

    text: str
    scenario: int
    name: str
    mode: str | None
    metric: str
    ok: Callable[[float, float, float], bool]  # (ratio logd/redis, logd, redis) -> met


GOALS = (
    Goal("batched write, interval: logd ≥ 2× Redis", 3, "batched", "interval", "msgs_per_s", lambda r, a, b: r >= 2.0),
    Goal("fan-in, fsync always: logd ≥ 1× Redis", 4, "fan-in", "always", "msgs_per_s", lambda r, a, b: r >= 1.0),
    # Issue 12's floors, measured with the C load generator.
    Goal("fan-in, interval: logd ≥ 1× Redis", 4, "fan-in", "interval", "msgs_per_s", lambda r, a, b: r >= 1.0),
    Goal(
        "single-message round trip p50, interval: logd ≤ 1.05× Redis",
        1,
        "latency",
        "interval",
        "p50_us",
        lambda r, a, b: r <= 1.05,
    ),
    Goal("catch-up read: logd ≥ 2× Redis", 5, "catch-up read", None, "msgs_per_s", lambda r, a, b: r >= 2.0),
    Goal("catch-up read 64 KiB: logd ≥ 1 GB/s", 5, "catch-up read", None, "mb_per_s", lambda r, a, b: a >= 1000.0),
    Goal("tail latency p99: logd ≤ Redis", 6, "tail", None, "p99_us", lambda r, a, b: r <= 1.0),
    Goal(
        "single-message latency, interval: logd ≤ 1.3× Redis",
        1,
        "latency",
        "interval",
        "p50_us",
        lambda r, a, b: r <= 1.3,
    ),
    Goal(
        "single-message latency, interval: logd ≤ 1.3× Redis",
        1,
        "latency",
        "interval",
        "p99_us",
        lambda r, a, b: r <= 1.3,
    ),
)


def key(r: Result) -> tuple[Any, ...]:
    return (r["scenario"], r["name"], r["variant"], r["mode"], r["payload"])


def pairs(results: list[Result]) -> list[tuple[Result, Result | None]]:
    """(logd, redis) results of the same measurement, in run order."""
    redis = {key(r): r for r in results if r["server"] == "redis"}
    out = [(r, redis.get(key(r))) for r in results if r["server"] == "logd"]
    if not out:  # a Redis-only run still gets a table
        out = [(r, None) for r in results if r["server"] == "redis"]
    return out


def size_label(n: int) -> str:
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024} KiB"
    return f"{n} B"


def fmt(v: float | None) -> str:
    if v is None:
        return "–"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def durability(mode: str) -> str:
    logd, redis = FSYNC_MODES[mode]
    return f"{logd} / {redis}"


def describe(r: Result) -> str:
    parts = [f"{r['scenario']}. {r['name']}"]
    if r["variant"] and r["variant"] != "load":
        parts.append(r["variant"])
    if r["payload"] and r["scenario"] != 7:
        parts.append(size_label(r["payload"]))
    return ", ".join(parts)


def table(results: list[Result]) -> list[str]:
    """The logd vs Redis table, one line per (measurement, metric)."""
    lines = [
        "| scenario | fsync logd / Redis | metric | logd | Redis | logd ÷ Redis | better |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for a, b in pairs(results):
        for metric in SHOWN.get((a["scenario"], a["name"]), ()):
            va = a["metrics"].get(metric)
            vb = b["metrics"].get(metric) if b else None
            if va is None and vb is None:
                continue
            label, higher = METRICS[metric]
            if a["server"] == "redis":  # Redis-only run
                va, vb = None, va
            ratio = f"{va / vb:.2f}×" if va is not None and vb else "–"
            lines.append(
                f"| {describe(a)} | {durability(a['mode'])} | {label} | {fmt(va)} | {fmt(vb)} "
                f"| {ratio} | {'higher' if higher else 'lower'} |"
            )
    return lines


def goals(results: list[Result]) -> list[dict[str, Any]]:
    """Each goal of the issue, evaluated on every matching measurement."""
    out = []
    for g in GOALS:
        for a, b in pairs(results):
            if a["server"] != "logd" or b is None:
                continue
            if (a["scenario"], a["name"]) != (g.scenario, g.name) or a["variant"] in ("load", "PING"):
                continue
            if g.mode and a["mode"] != g.mode:
                continue
            if "64 KiB" in g.text and a["payload"] != 65536:
                continue
            va, vb = a["metrics"].get(g.metric), b["metrics"].get(g.metric)
            if va is None or not vb:
                continue
            ratio = va / vb
            out.append(
                {
                    "goal": g.text,
                    "measurement": f"{describe(a)} ({durability(a['mode'])}), {METRICS[g.metric][0]}",
                    "metric": g.metric,
                    "logd": va,
                    "redis": vb,
                    "ratio": round(ratio, 3),
                    "met": bool(g.ok(ratio, va, vb)),
                }
            )
    return out


def details(results: list[Result]) -> list[str]:
    """CPU of both sides for every run: is the server (not the client) the bottleneck?"""
    lines = [
        "| scenario | server | fsync | msg/s | server CPU % | client CPU % | load generator "
        "| server CPU µs/msg | other CPU % | steal % | samples |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        m = r["metrics"]
        if "msgs_per_s" not in m:
            continue
        lines.append(
            f"| {describe(r)}{' (load)' if r['variant'] == 'load' else ''} | {r['server']} "
            f"| {r['fsync']} | {fmt(m['msgs_per_s'])} | {m['server_cpu_pct']} "
            f"| {m['client_cpu_pct']} | {r.get('generator', 'python')} | {m.get('server_cpu_us_per_msg', '–')} "
            f"| {m.get('other_cpu_pct', '–')} | {m.get('steal_pct', '–')} "
            f"| {m.get('samples', '–')} |"
        )
    return lines


NOISY_OTHER_PCT = 100 * NOISY_OTHER
NOISY_STEAL_PCT = 100 * NOISY_STEAL


def noisy_runs(results: list[Result]) -> list[str]:
    """Runs during which something else used a sizeable share of the machine."""
    out = []
    for r in results:
        m = r["metrics"]
        if m.get("other_cpu_pct", 0) > NOISY_OTHER_PCT or m.get("steal_pct", 0) > NOISY_STEAL_PCT:
            out.append(f"{describe(r)} {r['server']} {r['fsync']}")
    return out


def method(meta: dict[str, Any]) -> list[str]:
    """How the figures were made, for the reader who doubts them."""
    p = meta["plan"]
    pin = meta["pinned"]
    where = (
        f"servers pinned to CPU {pin['server_cpu']}, load generator to CPU {pin['loadgen_cpu']}"
        if pin
        else "nothing pinned"
    )
    return [
        "## How it was measured",
        "",
        f"- One machine, one run, {where}. Both servers are started by the benchmark on 127.0.0.1 "
        "(ephemeral ports, temporary data directories on the same disk) and stopped by pid; fresh "
        "servers for each durability mode, for scenario 5 and for scenario 7.",
        "- Durability: `always` = logd `--fsync always` vs Redis `appendfsync always`; `interval` = "
        "logd `--fsync interval:1000` vs Redis `appendfsync everysec`. Redis runs with `appendonly "
        'yes`, `save ""` and no automatic AOF rewrite (no fork during a measurement).',
        "- The same load generator for both servers, raw sockets (TCP_NODELAY), commands encoded once, "
        "replies counted by line, not parsed. Scenarios 1, 2 and 4: "
        f"{meta.get('loadgen', {}).get('scenarios_1_2_4', 'python')}; one thread, epoll, non-blocking "
        "sockets, its own warm-up, its CPU (getrusage) over the measured phase is the client CPU. "
        "The other scenarios: one Python process and thread. After every write run the "
        "server's HEAD (logd) or XLEN (Redis) must have grown by exactly the acknowledged count; "
        "catch-up reads are checked for their exact byte size (logd) or entry count (Redis).",
        f"- Write runs (1-4): {p['warmup']} s warm-up, then {p['seconds']} s measured, "
        f"{p['rounds']} round(s) per server alternating which server goes first; the median round "
        "by msg/s is shown (every round's msg/s is in results.json). A run during which other "
        f"processes used more than a quarter of a core is repeated (up to {p['noisy_retries']} times) "
        "and flagged below if it stayed noisy.",
        "- Messages are 100 bytes unless a size is given (letters and digits, same bytes for both). "
        "MB/s counts message bodies, 10^6 bytes.",
        "- 1: one command, wait for the reply, repeat. The PING row is the round trip with no "
        "work on this machine (mostly the cost of waking a process on the other CPU); the rest "
        "of the latency is the server's.",
        "- 2: single-message commands (logd `MSG 100`, Redis `XADD bench * d <body>`), N in flight.",
        "- 3: one batch in flight: logd one `MSG` of 100 messages, Redis 100 pipelined XADDs "
        "(Redis has no multi-message XADD).",
        f"- 4: {p['fanin_clients']} connections, each with one message in flight.",
        "- 5: the messages are loaded (the 'bulk load' rows: batches of up to 1000 messages, 4 in "
        "flight), then read from the first: logd one `READ <first> <n>`, Redis `XRANGE key (<last> + "
        f"COUNT 1000` page after page. Data is in RAM / page cache. Median of {p['read_repeats']} read(s).",
        f"- 6: a writer sends single-message commands at {p['tail_rate']:,} msg/s (in ~1 ms bursts) "
        "on one connection; a reader tails on another (logd `READ <next> 0`; Redis `XREAD BLOCK 0 "
        "STREAMS tail <last id>`, re-issued after each reply). Each body carries its send time; "
        "latency = arrival of the chunk completing the message − send time. "
        f"{p['tail_seconds']} s after a {p['warmup']} s warm-up; median of {p['tail_rounds']} round(s) by p99. "
        "'writer behind schedule' is the most messages the writer ever owed its schedule: a large "
        "value means the generator's loop itself was held up (>= 20 messages = 0.4 ms late) at least once.",
        f"- 7: RSS (psutil) of a fresh, empty server; with {p['idle_conns']:,} connections that each "
        f"got one PING answered; with {p['tails']} tails waiting for new messages; server CPU (% of a core) "
        f"over 1 s with {p['idle_conns']:,} tails waiting.",
        "",
    ]


def markdown(meta: dict[str, Any], results: list[Result], goal_rows: list[dict[str, Any]]) -> str:
    """RESULTS.md."""
    m = meta
    mc = m["machine"]
    out = [
        "# logd vs Redis Streams",
        "",
        f"`{m['command']}`, {m['date']}: {mc['cpu']} ({mc['cpus']} CPUs), {mc['mem_gb']} GB RAM, "
        f"{mc['os']}, kernel {mc['kernel']}, Python {mc['python']}; logd {m['versions'].get('logd', '–')}, "
        f"Redis {m['versions'].get('redis', '–')}. Disk fdatasync p50 {m['disk_fdatasync_us']['p50']} µs, "
        f"p99 {m['disk_fdatasync_us']['p99']} µs. Wall time {m.get('wall_seconds', '?')} s.",
        "",
    ]
    noisy = noisy_runs(results)
    warnings = list(m.get("warnings", []))
    if noisy:
        warnings.append(
            f"{len(noisy)} run(s) shared the machine with other load (other CPU > "
            f"{NOISY_OTHER_PCT:.0f}% or steal > {NOISY_STEAL_PCT:.0f}% of a core): " + "; ".join(noisy)
        )
    out += [f"> **WARNING:** {w}\n" for w in warnings]
    if goal_rows:
        out += ["## Goals", "", "| goal | measurement | logd | Redis | ratio | met |", "|---|---|---:|---:|---:|---|"]
        for g in goal_rows:
            out.append(
                f"| {g['goal']} | {g['measurement']} | {fmt(g['logd'])} | {fmt(g['redis'])} "
                f"| {g['ratio']:.2f}× | {'yes' if g['met'] else '**no**'} |"
            )
        out.append("")
    out += ["## logd vs Redis", ""] + table(results) + [""]
    out += ["![latency distributions](latency.png)", ""]
    out += method(m)
    out += [
        "## CPU per run",
        "",
        "Client CPU is the load generator's (the column after it says which: c = bench/fanin.c, "
        "python = bench/loadgen.py); 100% = one core. A server near 100% is the "
        "bottleneck; the client staying under 100% shows it was not. Other CPU is what the rest "
        "of the machine used meanwhile (other processes) and steal is CPU the hypervisor gave to "
        "other guests: large values mean a noisy figure.",
        "",
    ]
    out += details(results) + [""]
    out += ["Every figure, with machine info, versions and the plan, is in `results.json`.", ""]
    return "\n".join(out)


def plot(results: list[Result], path: Path) -> None:
    """latency.png: percentile curves of the latency-measuring scenarios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (1, "1. one client, one message per round trip"),
        (4, "4. fan-in, 50 clients"),
        (6, "6. tail: append-to-delivery at fixed rate"),
    ]
    panels = [p for p in panels if any(r["scenario"] == p[0] and r.get("curve") for r in results)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), squeeze=False)
    colors = {"logd": "tab:blue", "redis": "tab:red"}
    styles = {"always": "-", "interval": "--"}
    for ax, (scenario, title) in zip(axes[0], panels, strict=True):
        for r in results:
            if r["scenario"] != scenario or not r.get("curve"):
                continue
            qs = [q for q, _ in r["curve"]]
            xs = [1.0 / max(1e-9, 1.0 - q / 100.0) for q in qs]
            ys = [v for _, v in r["curve"]]
            ax.plot(
                xs,
                ys,
                styles.get(r["mode"], "-"),
                color=colors.get(r["server"], "black"),
                label=f"{r['server']} {r['fsync']}",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks([2, 10, 100, 1000, 10000, 100000])
        ax.set_xticklabels(["50%", "90%", "99%", "99.9%", "99.99%", "99.999%"])
        ax.set_xlim(1, None)
        ax.set_xlabel("percentile")
        ax.set_ylabel("latency (µs)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("logd vs Redis Streams: latency distributions (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def disk_fdatasync_us(directory: str | None = None, n: int = 200) -> dict[str, float]:
    """fdatasync latency of the disk holding the temp dirs (write 128 B + sync, n times)."""
    fd, name = tempfile.mkstemp(prefix="logd-bench-fsync-", dir=directory)
    samples = []
    try:
        for _ in range(n):
            os.write(fd, b"x" * 128)
            t = time.perf_counter_ns()
            os.fdatasync(fd)
            samples.append((time.perf_counter_ns() - t) / 1000.0)
    finally:
        os.close(fd)
        os.unlink(name)
    samples.sort()
    return {"p50": round(samples[n // 2], 1), "p99": round(samples[int(n * 0.99)], 1)}


def machine() -> dict[str, Any]:
    """Where the run happened."""
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    os_name = platform.platform()
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return {
        "hostname": socket.gethostname(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "os": os_name,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
    }


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_all(out: Path, meta: dict[str, Any], results: list[Result]) -> str:
    """Write results.json, RESULTS.md and latency.png to ``out``; return the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    goal_rows = goals(results)
    doc = {"meta": meta, "goals": goal_rows, "results": results}
    (out / "results.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    text = markdown(meta, results, goal_rows)
    (out / "RESULTS.md").write_text(text)
    plot(results, out / "latency.png")
    return text
