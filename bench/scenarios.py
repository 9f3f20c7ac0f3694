"""The scenarios of issue 6, run against logd and Redis alternately on fresh servers.

Results are flat records: one per (scenario, variant, durability, payload,
server), with the figures in ``metrics``. ``report.py`` pairs them up.
"""

from __future__ import annotations

import gc
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from . import loadgen as lg
from . import readers as rd
from . import wire as wr
from .cloadgen import CLoadgen
from .plan import BATCH, MAX_RUN_BYTES, SMALL, Plan, curve, metrics, noisy, p99, wait_quiet
from .servers import FSYNC_MODES, Server, ServerError, start_logd, start_redis

IDLE_CPU_WINDOW_S = 1.0  # how long scenario 7 watches the server with idle tails


class Bench:
    """Runs the plan and collects result records."""

    def __init__(
        self,
        plan: Plan,
        kinds: tuple[str, ...],
        server_cpu: int | None,
        log: Callable[[str], None],
        quiet_wait: float = 0.0,
        cgen: CLoadgen | None = None,
    ):
        self.plan = plan
        self.cgen = cgen  # drives scenarios 1, 2 and 4 when given; else the Python loops do
        self.quiet_wait = quiet_wait
        self.kinds = kinds
        self.server_cpu = server_cpu  # every server is pinned to this CPU (None: not pinned)
        self.log = log
        self.results: list[dict[str, Any]] = []
        self.versions: dict[str, str] = {}
        self.errors: list[str] = []  # measurements that failed

    # ----------------------------------------------------------------- plumbing

    @contextmanager
    def servers(self, mode: str) -> Iterator[dict[str, Server]]:
        """Fresh servers (one per kind) for a durability mode, stopped afterwards."""
        started: dict[str, Server] = {}
        cpu = self.server_cpu
        if self.quiet_wait:
            wait_quiet(self.quiet_wait, self.log)
        try:
            for kind in self.kinds:
                fsync = FSYNC_MODES[mode][0 if kind == "logd" else 1]
                t0 = time.monotonic()
                srv = start_logd(fsync, cpu) if kind == "logd" else start_redis(fsync, cpu)
                started[kind] = srv
                self._version(srv)
                self.log(f"  started {kind} ({fsync}) pid {srv.pid} port {srv.port} in {time.monotonic() - t0:.2f}s")
            yield started
        finally:
            for srv in started.values():
                if not srv.alive():
                    self.log(f"  WARNING: {srv.kind} died:\n{srv.output_tail()}")
                srv.stop()

    def _version(self, srv: Server) -> None:
        if srv.kind in self.versions:
            return
        with wr.Control(srv.addr) as ctl:
            if srv.kind == "logd":
                self.versions["logd"] = ctl.logd_stats().get("version", "?")
            else:
                self.versions["redis"] = ctl.redis_info(b"server").get("redis_version", "?")

    def record(
        self,
        scenario: int,
        name: str,
        mode: str,
        srv: Server,
        run: lg.Run,
        payload: int = SMALL,
        variant: str = "",
        with_curve: bool = False,
    ) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "scenario": scenario,
            "name": name,
            "variant": variant,
            "mode": mode,
            "payload": payload,
            "server": srv.kind,
            "fsync": srv.fsync,
            "generator": run.generator,
            "metrics": metrics(run),
        }
        if with_curve:
            rec["curve"] = curve(run.latencies_ns)
        self.results.append(rec)
        m = rec["metrics"]
        lat = f" p50 {m['p50_us']}us p99 {m['p99_us']}us p999 {m['p999_us']}us" if "p50_us" in m else ""
        mb = f" {m['mb_per_s']} MB/s" if "mb_per_s" in m else ""
        self.log(
            f"    {srv.kind:5} {m['msgs_per_s']:>12,.0f} msg/s{mb}{lat}"
            f"  (server cpu {m['server_cpu_pct']}%, client cpu {m['client_cpu_pct']}% [{run.generator}])"
        )
        return rec

    def checked_write(self, srv: Server, wire: wr.Wire, fn: Callable[[], lg.Run]) -> lg.Run:
        """Run a write load and check the server committed exactly what was acknowledged."""
        with wr.Control(srv.addr) as ctl:
            before = wire.stored(ctl)
            run = fn()
            after = wire.stored(ctl)
        acked = run.messages + run.warmup_messages
        if after - before != acked:
            raise wr.LoadError(f"{srv.kind}: acknowledged {acked} messages but stored {after - before}")
        return run

    def meter(self, srv: Server) -> lg.Meter:
        return lg.Meter(srv.cpu_seconds)

    def compare(
        self,
        srvs: dict[str, Server],
        fn: Callable[[Server], lg.Run],
        rounds: int,
        scenario: int,
        name: str,
        mode: str,
        payload: int = SMALL,
        variant: str = "",
        with_curve: bool = False,
        by: Callable[[lg.Run], float] | None = None,
    ) -> None:
        """Run ``fn`` on each server ``rounds`` times, alternating which goes first
        (A B B A ...), and record each server's median round by messages/s (or ``by``)."""
        runs: dict[str, list[lg.Run]] = {k: [] for k in srvs}
        order = list(srvs.values())
        retried = dict.fromkeys(srvs, 0)
        failed: set[str] = set()
        for r in range(rounds):
            for srv in order if r % 2 == 0 else order[::-1]:
                if srv.kind in failed:
                    continue
                try:
                    run = fn(srv)
                    for _ in range(self.plan.noisy_retries):  # someone else used the machine: once more
                        if not noisy(run):
                            break
                        retried[srv.kind] += 1
                        run = fn(srv)
                except (OSError, wr.LoadError, ServerError) as exc:
                    # One failed measurement must not cost the others: note it, go on.
                    failed.add(srv.kind)
                    what = f"{scenario}. {name} {variant} {payload} B [{mode}] on {srv.kind}"
                    self.errors.append(f"{what}: {type(exc).__name__}: {exc}")
                    self.log(f"    {srv.kind:5} FAILED: {type(exc).__name__}: {exc}")
                    continue
                runs[srv.kind].append(run)
        for srv in order:
            if not runs[srv.kind]:
                continue
            done = sorted(runs[srv.kind], key=by or (lambda x: x.messages / max(x.seconds, 1e-9)))
            run = done[(len(done) - 1) // 2]
            if rounds > 1:
                run.extra["rounds"] = rounds
            if retried[srv.kind]:
                run.extra["noisy_retries"] = retried[srv.kind]
            rec = self.record(scenario, name, mode, srv, run, payload, variant, with_curve)
            if rounds > 1:
                rec["metrics"]["rounds_msgs_per_s"] = [round(x.messages / max(x.seconds, 1e-9)) for x in runs[srv.kind]]
                if run.latencies_ns:
                    rec["metrics"]["rounds_p99_us"] = [round(p99(x) / 1000, 1) for x in runs[srv.kind]]

    # ----------------------------------------------------------------- scenarios

    def write_scenarios(self, mode: str, only: set[int]) -> None:
        """Scenarios 1-4 and 6 on one pair of fresh servers."""
        p = self.plan
        body = wr.payload(SMALL)
        run_13 = mode in p.modes
        rounds = p.rounds
        with self.servers(mode) as srvs:
            if 1 in only and run_13:
                self.log(f"  1. latency, one client, one {SMALL} B message per round trip [{mode}]")

                def single(srv: Server) -> lg.Run:
                    wire = wr.wire_for(srv.kind)
                    cmd = wire.write(body)
                    fn = partial(self._round_trips, srv, cmd, wire.write_lines, 1, p.seconds, p.latency_max)
                    return self.checked_write(srv, wire, fn)

                self.compare(srvs, single, rounds, 1, "latency", mode, with_curve=True)
                self.log("  1. round-trip floor: PING, one client, one per round trip")

                def ping(srv: Server) -> lg.Run:
                    return self._round_trips(srv, b"PING\r\n", 1, 1, p.seconds / 2, p.latency_max)

                self.compare(srvs, ping, rounds, 1, "latency", mode, payload=0, variant="PING")
            if 2 in only and run_13:
                for depth in p.depths:
                    self.log(f"  2. pipelined, one client, {depth} commands in flight [{mode}]")

                    def pipe(srv: Server, depth: int = depth) -> lg.Run:
                        wire = wr.wire_for(srv.kind)
                        return self._pipelined(srv, wire, wire.write(body), wire.write_lines, 1, depth)

                    self.compare(srvs, pipe, rounds, 2, "pipelined", mode, variant=f"depth {depth}")
            if 3 in only and run_13:
                for size in p.batch_payloads:
                    self.log(f"  3. batched, {BATCH} x {size} B per batch, one batch in flight [{mode}]")

                    def batched(srv: Server, size: int = size) -> lg.Run:
                        wire = wr.wire_for(srv.kind)
                        cmd, lines = wire.batch([wr.payload(size)] * BATCH)
                        run = self._pipelined(srv, wire, cmd, lines, BATCH, 1, size)
                        run.payload_bytes = run.messages * size
                        if srv.kind == "redis" and size > 4096:
                            with wr.Control(srv.addr) as ctl:  # give the RAM back
                                ctl.redis_call(wr.resp(b"UNLINK", b"bench"))
                        return run

                    self.compare(srvs, batched, rounds, 3, "batched", mode, payload=size)
            if 4 in only and mode in p.fanin_modes:
                n = p.fanin_clients
                self.log(f"  4. fan-in, {n} clients, one message per round trip each [{mode}]")

                def fan(srv: Server) -> lg.Run:
                    wire = wr.wire_for(srv.kind)
                    cmd = wire.write(body)
                    fn = partial(self._round_trips, srv, cmd, wire.write_lines, n, p.seconds, p.write_max)
                    return self.checked_write(srv, wire, fn)

                self.compare(srvs, fan, rounds, 4, "fan-in", mode, variant=f"{n} clients", with_curve=True)
            if 6 in only and mode in p.tail_modes:
                self.log(f"  6. tail latency, writer at {p.tail_rate:,} msg/s, one tailing reader [{mode}]")

                def tail(srv: Server) -> lg.Run:
                    m = self.meter(srv)
                    return rd.tail_latency(srv.kind, srv.addr, p.tail_rate, p.tail_seconds, p.warmup, SMALL, m)

                self.compare(srvs, tail, p.tail_rounds, 6, "tail", mode, with_curve=True, by=p99)

    def _round_trips(self, srv: Server, cmd: bytes, lines: int, conns: int, seconds: float, max_n: int) -> lg.Run:
        """``conns`` connections, one command in flight each: warm-up, then a measured run (scenarios 1, 4)."""
        p, m = self.plan, self.meter(srv)
        if self.cgen:
            return self.cgen.run(
                srv.addr, cmd, lines, conns=conns, depth=1, warmup=p.warmup, seconds=seconds, max_cmds=max_n, meter=m
            )
        if conns == 1:
            warm = lg.closed_loop(srv.addr, cmd, lines, p.warmup, max_n, m)
            run = lg.closed_loop(srv.addr, cmd, lines, seconds, max_n, m)
        else:
            warm = lg.fan_in(srv.addr, cmd, lines, conns, p.warmup, max_n, m)
            run = lg.fan_in(srv.addr, cmd, lines, conns, seconds, max_n, m)
        run.warmup_messages = warm.messages  # stored too: checked_write counts them
        return run

    def _pipelined(
        self,
        srv: Server,
        wire: wr.Wire,
        cmd: bytes,
        lines: int,
        per_cmd: int,
        depth: int,
        size: int = SMALL,
    ) -> lg.Run:
        """Warm up, then a checked pipelined run (the C generator for single-message commands)."""
        p = self.plan
        max_cmds = max(depth, min(p.write_max, MAX_RUN_BYTES // size) // per_cmd)
        if self.cgen and per_cmd == 1:
            m = self.meter(srv)
            cfn = partial(
                self.cgen.run, srv.addr, cmd, lines,
                conns=1, depth=depth, warmup=p.warmup, seconds=p.seconds, max_cmds=max_cmds, meter=m,
            )  # fmt: skip
            return self.checked_write(srv, wire, cfn)
        lg.pipelined(srv.addr, cmd, lines, per_cmd, depth, p.warmup, max_cmds // 10)
        m = self.meter(srv)
        fn = partial(lg.pipelined, srv.addr, cmd, lines, per_cmd, depth, p.seconds, max_cmds, m)
        return self.checked_write(srv, wire, fn)

    def catchup(self) -> None:
        """Scenario 5: load N messages, then read them all from the start."""
        p = self.plan
        with self.servers("interval") as srvs:
            for size, count in p.catchup:
                per = min(1000, max(1, (1 << 20) // size))  # messages per load command
                count = -(-count // per) * per
                key = b"catchup:%d" % size
                self.log(f"  5. bulk load of {count:,} x {size} B ({per} per batch, 4 batches in flight)")
                starts: dict[str, int] = {}

                def load(
                    srv: Server,
                    per: int = per,
                    count: int = count,
                    key: bytes = key,
                    size: int = size,
                    starts: dict[str, int] = starts,
                ) -> lg.Run:
                    wire = wr.wire_for(srv.kind, key)
                    cmd, lines = wire.batch([wr.payload(size)] * per)
                    with wr.Control(srv.addr) as ctl:
                        starts[srv.kind] = ctl.logd_head() + 1 if srv.kind == "logd" else 0
                    fn = partial(lg.pipelined, srv.addr, cmd, lines, per, 4, 600.0, count // per, self.meter(srv))
                    run = self.checked_write(srv, wire, fn)
                    if run.messages != count:
                        raise wr.LoadError(f"loaded {run.messages} of {count}")
                    run.payload_bytes = count * size
                    return run

                self.compare(srvs, load, 1, 5, "bulk load", "interval", payload=size, variant="load")
                self.log(f"  5. catch-up read of {count:,} x {size} B (logd READ vs Redis XRANGE COUNT 1000)")

                def read(
                    srv: Server, count: int = count, key: bytes = key, size: int = size, starts: dict[str, int] = starts
                ) -> lg.Run:
                    m = self.meter(srv)
                    if srv.kind == "logd":
                        run = rd.read_logd(srv.addr, starts["logd"], count, size, 300.0, m)
                    else:
                        run = rd.read_redis(srv.addr, key, count, size, 1000, 300.0, m)
                    run.extra["rss_mb_after_load"] = srv.rss_bytes() / 1e6
                    return run

                self.compare(srvs, read, p.read_repeats, 5, "catch-up read", "interval", payload=size)

    def footprint(self) -> None:
        """Scenario 7: server RSS idle, with idle connections, with tails."""
        p = self.plan
        with self.servers("interval") as srvs:
            self.log(f"  7. footprint: RSS with {p.idle_conns} idle connections, {p.tails} tails")
            for srv in srvs.values():
                # Tails first: the fewer connections, so what a server keeps after
                # they close barely changes the 1,000-connection figure.
                socks: list[socket.socket] = []
                try:
                    base = srv.rss_bytes()
                    socks = rd.open_tails(srv.addr, srv.kind, p.tails)
                    tails = srv.rss_bytes()
                    for s in socks:
                        s.close()
                    socks = rd.open_idle(srv.addr, srv.kind, p.idle_conns)
                    idle = srv.rss_bytes()
                    for s in socks:
                        s.close()
                    # Idle tails must cost no CPU (issue 3): park many, watch the server.
                    socks = rd.open_tails(srv.addr, srv.kind, p.idle_conns)
                    cpu0, t0 = srv.cpu_seconds(), time.perf_counter()
                    time.sleep(IDLE_CPU_WINDOW_S)  # a measuring window, not synchronisation
                    idle_tails_cpu = (srv.cpu_seconds() - cpu0) / (time.perf_counter() - t0) * 100
                except (OSError, wr.LoadError) as exc:
                    self.errors.append(f"7. footprint on {srv.kind}: {type(exc).__name__}: {exc}")
                    self.log(f"    {srv.kind:5} FAILED: {type(exc).__name__}: {exc}")
                    continue
                finally:
                    for s in socks:
                        s.close()
                mm: dict[str, float] = {
                    "rss_mb_base": round(base / 1e6, 2),
                    "rss_mb_idle_conns": round(idle / 1e6, 2),
                    "rss_mb_tails": round(tails / 1e6, 2),
                    "kb_per_idle_conn": round((idle - base) / p.idle_conns / 1e3, 2),
                    "cpu_pct_idle_tails": round(idle_tails_cpu, 2),
                    "idle_conns": p.idle_conns,
                    "tails": p.tails,
                }
                rec = {
                    "scenario": 7,
                    "name": "footprint",
                    "variant": "",
                    "mode": "interval",
                    "payload": 0,
                    "server": srv.kind,
                    "fsync": srv.fsync,
                    "metrics": mm,
                }
                self.results.append(rec)
                self.log(
                    f"    {srv.kind:5} RSS {mm['rss_mb_base']} MB idle server, "
                    f"{mm['rss_mb_idle_conns']} MB with {p.idle_conns} connections, "
                    f"{mm['rss_mb_tails']} MB with {p.tails} tails; "
                    f"{mm['cpu_pct_idle_tails']}% CPU with {p.idle_conns} idle tails"
                )

    def run(self, only: set[int]) -> None:
        """Every selected scenario; GC is off during the measurements."""
        gc.collect()
        gc.disable()
        try:
            for mode in FSYNC_MODES:
                wanted = {1, 2, 3, 4, 6} & only
                if not wanted:
                    break
                self.log(
                    f"durability {mode}: logd --fsync {FSYNC_MODES[mode][0]} "
                    f"vs Redis appendfsync {FSYNC_MODES[mode][1]}"
                )
                self.write_scenarios(mode, only)
                gc.collect()
            if 5 in only:
                self.catchup()
                gc.collect()
            if 7 in only:
                self.footprint()
        finally:
            gc.enable()
