"""The Python load generator, the same for both servers: raw sockets, pre-encoded commands.

Scenarios 1, 2 and 4 use the C generator (`cloadgen`, bench/fanin.c) unless
``--loadgen python`` is given; the meters here serve both.

The hot loops never parse a reply in Python. Every reply the benchmark
expects is a known number of lines, and no payload contains CR or LF
(payloads are lowercase letters and digits), so counting b"\\n" in whole
received chunks is an exact count of reply lines, for logd and Redis alike.
What the servers really stored is checked after each run (HEAD / XLEN), and
reads are checked byte for byte (logd) or entry for entry (Redis).

Every loop is bounded by a message count and a deadline; every socket has a
timeout.
"""

from __future__ import annotations

import resource
import select
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

from .wire import SOCK_TIMEOUT_S, LoadError, connect

RECV_BYTES = 1 << 20
ERR_MARK = b"ERR"  # logd "ERR <CODE>" and Redis "-ERR ..." both contain it


# --------------------------------------------------------------------------- meters


@dataclass
class Run:
    """What one measured run did."""

    messages: int
    seconds: float
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    other_cpu_s: float = 0.0  # busy CPU of the whole machine, minus server and client
    steal_s: float = 0.0  # CPU time the hypervisor took away
    latencies_ns: array = field(default_factory=lambda: array("q"))
    payload_bytes: int = 0  # message bodies moved
    wire_bytes: int = 0  # bytes on the wire in the measured direction
    extra: dict[str, float] = field(default_factory=dict)
    generator: str = "python"  # which load generator drove the run: "python" (here) or "c" (fanin.c)
    warmup_messages: int = 0  # acknowledged before the measured phase by the same run (C generator)


def client_cpu() -> float:
    """CPU seconds (user + system) this process has used."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine, all CPUs."""
    t = psutil.cpu_times()
    # Interrupt time is left out: loopback TCP work of the client and server shows
    # up there, and it is not someone else's load.
    return t.user + t.nice + t.system, getattr(t, "steal", 0.0)


class Meter:
    """Client, server and everyone else's CPU over a measured interval."""

    def __init__(self, server_cpu: Callable[[], float]) -> None:
        self.server_cpu = server_cpu
        self.c0 = self.s0 = self.m0 = self.st0 = 0.0

    def start(self) -> None:
        self.c0, self.s0 = client_cpu(), self.server_cpu()
        self.m0, self.st0 = machine_cpu()

    def stop(self, run: Run, child_cpu_s: float = 0.0) -> Run:
        """Close the interval; ``child_cpu_s`` is a child load generator's CPU over it."""
        run.client_cpu_s = client_cpu() - self.c0 + child_cpu_s
        run.server_cpu_s = self.server_cpu() - self.s0
        busy, steal = machine_cpu()
        run.other_cpu_s = max(0.0, busy - self.m0 - run.client_cpu_s - run.server_cpu_s)
        run.steal_s = steal - self.st0
        return run


def check_chunk(chunk: bytes) -> None:
    if ERR_MARK in chunk:
        raise LoadError(f"server error reply: {chunk[:200]!r}")


# --------------------------------------------------------------------------- write loops


def closed_loop(addr: tuple[str, int], cmd: bytes, lines: int, seconds: float, max_n: int, meter: Meter) -> Run:
    """One client, one command per round trip; a latency sample per command."""
    sock = connect(addr)
    recv, send, now = sock.recv, sock.sendall, time.perf_counter_ns
    lat = array("q")
    meter.start()
    t_start = now()
    end = t_start + int(seconds * 1e9)
    n = 0
    t1 = t_start
    try:
        while n < max_n and t1 < end:
            t0 = now()
            send(cmd)
            got = 0
            while got < lines:
                chunk = recv(65536)
                if not chunk or ERR_MARK in chunk:
                    raise LoadError(f"server closed the connection or failed: {chunk[:200]!r}")
                got += chunk.count(b"\n")
            t1 = now()
            lat.append(t1 - t0)
            n += 1
            if got != lines:
                raise LoadError(f"expected {lines} reply lines, got {got}: {chunk[:200]!r}")
    finally:
        sock.close()
    run = Run(n, (t1 - t_start) / 1e9, latencies_ns=lat)
    return meter.stop(run)


def pipelined(
    addr: tuple[str, int],
    cmd: bytes,
    lines: int,
    msgs_per_cmd: int,
    depth: int,
    seconds: float,
    max_cmds: int,
    meter: Meter | None = None,
) -> Run:
    """One client keeping ``depth`` commands in flight; throughput only.

    A reply is ``lines`` lines; after each received chunk as many commands are
    sent as replies were completed, cut from one pre-built block.
    """
    sock = connect(addr)
    recv, send, now = sock.recv, sock.sendall, time.perf_counter_ns
    block = memoryview(cmd * depth)
    size = len(cmd)
    if meter:
        meter.start()
    t_start = now()
    end = t_start + int(seconds * 1e9)
    first = min(depth, max_cmds)
    send(block[: first * size])
    sent, done, pending = first, 0, 0
    last_chunk = b""
    t = t_start
    try:
        while done < sent:
            chunk = recv(RECV_BYTES)
            if not chunk:
                raise LoadError("server closed the connection")
            if ERR_MARK in chunk:
                check_chunk(chunk)
            pending += chunk.count(b"\n")
            r = pending // lines
            if r:
                pending -= r * lines
                done += r
                last_chunk = chunk
                t = now()
                if t < end and sent < max_cmds:
                    k = min(r, max_cmds - sent)
                    send(block[: k * size])
                    sent += k
    finally:
        sock.close()
    check_chunk(last_chunk)
    if pending:
        raise LoadError(f"{pending} stray reply lines: {last_chunk[-200:]!r}")
    run = Run(done * msgs_per_cmd, (t - t_start) / 1e9)
    run.extra["in_flight"] = depth * msgs_per_cmd
    return meter.stop(run) if meter else run


def fan_in(
    addr: tuple[str, int],
    cmd: bytes,
    lines: int,
    clients: int,
    seconds: float,
    max_n: int,
    meter: Meter,
) -> Run:
    """``clients`` connections, each one command per round trip, one epoll loop."""
    socks = [connect(addr) for _ in range(clients)]
    ep = select.epoll()
    index: dict[int, int] = {}
    for i, s in enumerate(socks):
        s.setblocking(False)
        index[s.fileno()] = i
        ep.register(s.fileno(), select.EPOLLIN)
    recvs = [s.recv for s in socks]
    sends = [s.send for s in socks]
    got = [0] * clients
    sent_at = [0] * clients
    lat = array("q")
    now = time.perf_counter_ns
    size = len(cmd)
    meter.start()
    t_start = now()
    end = t_start + int(seconds * 1e9)
    deadline = time.monotonic() + seconds + SOCK_TIMEOUT_S
    for i in range(clients):
        sent_at[i] = now()
        if sends[i](cmd) != size:
            raise LoadError("short send")
    sent = outstanding = clients
    done = 0
    t = t_start
    last_chunk = b""
    try:
        while outstanding:
            events = ep.poll(1.0)
            if not events and time.monotonic() > deadline:
                raise LoadError(f"fan-in: {outstanding} replies never came")
            for fd, _ev in events:
                i = index[fd]
                chunk = recvs[i](65536)
                if not chunk or ERR_MARK in chunk:
                    raise LoadError(f"server closed the connection or failed: {chunk[:200]!r}")
                g = got[i] + chunk.count(b"\n")
                if g < lines:
                    got[i] = g
                    continue
                if g > lines:
                    raise LoadError(f"unexpected reply: {chunk[:200]!r}")
                got[i] = 0
                t = now()
                lat.append(t - sent_at[i])
                done += 1
                last_chunk = chunk
                if t < end and sent < max_n:
                    sent_at[i] = t
                    if sends[i](cmd) != size:
                        raise LoadError("short send")
                    sent += 1
                else:
                    outstanding -= 1
    finally:
        ep.close()
        for s in socks:
            s.close()
    check_chunk(last_chunk)
    return meter.stop(Run(done, (t - t_start) / 1e9, latencies_ns=lat))
