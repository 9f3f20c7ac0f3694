"""What to run and how to judge a run: the plan (full and quick), noise checks, figures."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import loadgen as lg

SMALL = 100  # bytes: the message size of every scenario unless said otherwise
BATCH = 100  # messages per batch in scenario 3
MAX_RUN_BYTES = 1_500_000_000  # cap on bodies written by one run (Redis keeps them in RAM)
NOISY_OTHER = 0.25  # share of a core used by other processes that makes a run noisy
NOISY_STEAL = 0.10  # ... or taken by the hypervisor


@dataclass(frozen=True)
class Plan:
    """How much of each scenario to run; FULL and QUICK below."""

    seconds: float  # measured time of each write run
    warmup: float  # unmeasured time before it
    modes: tuple[str, ...]  # durability pairs for scenarios 1-3
    fanin_modes: tuple[str, ...]  # ... for scenario 4
    depths: tuple[int, ...]  # scenario 2
    batch_payloads: tuple[int, ...]  # scenario 3
    fanin_clients: int
    catchup: tuple[tuple[int, int], ...]  # scenario 5: (body bytes, messages)
    read_repeats: int  # scenario 5: median of n reads
    tail_modes: tuple[str, ...]  # scenario 6
    tail_rate: int  # messages/s
    tail_seconds: float
    tail_rounds: int  # median of this many rounds by p99
    idle_conns: int  # scenario 7
    tails: int
    rounds: int  # scenarios 1-4: median of this many alternating rounds per server
    noisy_retries: int  # a run disturbed by other load is repeated up to this many times
    latency_max: int = 200_000  # cap on round trips in scenario 1
    write_max: int = 20_000_000  # cap on messages in other write runs


FULL = Plan(
    seconds=2.0,
    warmup=0.5,
    modes=("always", "interval"),
    fanin_modes=("always", "interval"),
    depths=(16, 128),
    batch_payloads=(100, 1024, 65536),
    fanin_clients=50,
    catchup=((100, 2_000_000), (1024, 500_000), (65536, 16_000)),
    read_repeats=3,
    tail_modes=("interval", "always"),
    tail_rate=50_000,
    tail_seconds=4.0,
    tail_rounds=3,
    idle_conns=1000,
    tails=100,
    rounds=3,
    noisy_retries=2,
)

# Every scenario touched once, with small counts: CI keeps the harness working.
QUICK = replace(
    FULL,
    seconds=0.8,
    warmup=0.2,
    modes=("interval",),
    depths=(16,),
    batch_payloads=(100, 65536),
    catchup=((100, 200_000), (65536, 2_000)),
    read_repeats=1,
    tail_modes=("interval",),
    tail_seconds=2.0,
    tail_rounds=1,
    rounds=1,
    noisy_retries=0,
)


def noisy(run: lg.Run) -> bool:
    """Whether other processes or other guests took a sizeable share of the machine."""
    secs = max(run.seconds, 1e-9)
    return run.other_cpu_s / secs > NOISY_OTHER or run.steal_s / secs > NOISY_STEAL


def wait_quiet(seconds: float, log: Callable[[str], None]) -> bool:
    """Wait up to ``seconds`` for a 1-second window with little CPU used by anyone."""
    deadline = time.monotonic() + seconds
    said = False
    while True:
        b0, s0 = lg.machine_cpu()
        time.sleep(1.0)
        b1, s1 = lg.machine_cpu()
        if b1 - b0 < NOISY_OTHER and s1 - s0 < NOISY_STEAL:
            return True
        if time.monotonic() > deadline:
            log(f"  WARNING: the machine is busy ({100 * (b1 - b0):.0f}% of a core used by others); going on")
            return False
        if not said:
            log(f"  waiting up to {seconds:.0f}s for the machine to be quiet ({100 * (b1 - b0):.0f}% busy)")
            said = True


def p99(run: lg.Run) -> float:
    """The 99th percentile latency of a run (ns), for picking the median round."""
    return float(np.percentile(np.frombuffer(run.latencies_ns, dtype=np.int64), 99)) if run.latencies_ns else 0.0


def percentiles(lat_ns: Any) -> dict[str, float]:
    """p50/p99/p999/max in microseconds."""
    if len(lat_ns) == 0:
        return {}
    a = np.frombuffer(lat_ns, dtype=np.int64) / 1000.0
    p50, p99, p999 = np.percentile(a, [50, 99, 99.9])
    return {
        "p50_us": round(float(p50), 1),
        "p99_us": round(float(p99), 1),
        "p999_us": round(float(p999), 1),
        "max_us": round(float(a.max()), 1),
        "mean_us": round(float(a.mean()), 1),
        "samples": int(len(a)),
    }


def curve(lat_ns: Any, points: int = 121) -> list[list[float]]:
    """The latency distribution as [percentile, us] pairs, dense towards the tail."""
    if len(lat_ns) == 0:
        return []
    a = np.frombuffer(lat_ns, dtype=np.int64) / 1000.0
    top = min(5.0, float(np.log10(len(a))))  # no percentile finer than the data
    qs = 100.0 * (1.0 - 10.0 ** -np.linspace(0.0, top, points))
    vals = np.percentile(a, qs)
    return [[round(float(q), 5), round(float(v), 1)] for q, v in zip(qs, vals, strict=True)]


def metrics(run: lg.Run) -> dict[str, float]:
    """Figures of one run: rates, CPU, latency percentiles."""
    secs = max(run.seconds, 1e-9)
    m: dict[str, float] = {
        "messages": run.messages,
        "seconds": round(run.seconds, 3),
        "msgs_per_s": round(run.messages / secs, 1),
        "server_cpu_pct": round(100 * run.server_cpu_s / secs, 1),
        "client_cpu_pct": round(100 * run.client_cpu_s / secs, 1),
        # Everything else on the machine (other processes, interrupts), and time the
        # hypervisor gave to other guests: high values mean a noisy measurement.
        "other_cpu_pct": round(100 * run.other_cpu_s / secs, 1),
        "steal_pct": round(100 * run.steal_s / secs, 1),
    }
    if run.messages:
        # CPU per message: less sensitive than msg/s to other load taking turns on the CPUs.
        m["server_cpu_us_per_msg"] = round(1e6 * run.server_cpu_s / run.messages, 2)
        m["client_cpu_us_per_msg"] = round(1e6 * run.client_cpu_s / run.messages, 2)
    if run.payload_bytes:
        m["mb_per_s"] = round(run.payload_bytes / secs / 1e6, 1)
        m["wire_mb_per_s"] = round(run.wire_bytes / secs / 1e6, 1)
    m.update(percentiles(run.latencies_ns))
    m.update({k: round(v, 1) for k, v in run.extra.items()})
    return m
