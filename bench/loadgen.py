"""One load generator for both servers: raw sockets, pre-encoded commands.

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

import random
import re
import resource
import select
import socket
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

SOCK_TIMEOUT_S = 30.0
RECV_BYTES = 1 << 20
ALPHABET = b"abcdefghijklmnopqrstuvwxyz0123456789"
# Tail messages start with "T" + 19-digit send time (perf_counter_ns); "T" is
# never in a payload, a logd record header or a Redis reply frame.
STAMP_RE = re.compile(rb"T(\d{19})")
ERR_MARK = b"ERR"  # logd "ERR <CODE>" and Redis "-ERR ..." both contain it


class LoadError(RuntimeError):
    """A server answered something the benchmark did not expect."""


def payload(size: int, seed: int = 1774) -> bytes:
    """A deterministic ``size``-byte body of lowercase letters and digits."""
    rng = random.Random(seed + size)
    return bytes(rng.choices(ALPHABET, k=size))


def stamped(size: int, ts_ns: int, pad: bytes) -> bytes:
    """A ``size``-byte tail-latency body carrying its send time."""
    return b"T%019d" % ts_ns + pad[: size - 20]


def connect(addr: tuple[str, int], timeout: float = SOCK_TIMEOUT_S) -> socket.socket:
    """A TCP connection with Nagle off (both servers turn it off on their side too)."""
    s = socket.create_connection(addr, timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def resp(*args: bytes) -> bytes:
    """A Redis command in RESP."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


# --------------------------------------------------------------------------- wires


class Wire:
    """How one server spells the benchmark's operations (encoded once, up front)."""

    name: str
    write_lines: int  # reply lines to one single-message write

    def write(self, body: bytes) -> bytes:
        """One command appending one message."""
        raise NotImplementedError

    def batch(self, bodies: Sequence[bytes]) -> tuple[bytes, int]:
        """Bytes appending ``bodies`` as this server batches best, and its reply lines."""
        raise NotImplementedError

    def stored(self, ctl: Control) -> int:
        """How many messages the server has committed (to check a run)."""
        raise NotImplementedError


class LogdWire(Wire):
    """logd: ``MSG <len> [<len> ...]``, replies ``OK <id>``."""

    name = "logd"
    write_lines = 1

    def write(self, body: bytes) -> bytes:
        return b"MSG %d\r\n%s\r\n" % (len(body), body)

    def batch(self, bodies: Sequence[bytes]) -> tuple[bytes, int]:
        line = b"MSG " + b" ".join(b"%d" % len(b) for b in bodies) + b"\r\n"
        return line + b"".join(b + b"\r\n" for b in bodies), 1

    def stored(self, ctl: Control) -> int:
        return ctl.logd_head()


class RedisWire(Wire):
    """Redis Streams: ``XADD key * d <body>`` (auto id), replies a bulk string id."""

    name = "redis"
    write_lines = 2  # "$<n>" then the id

    def __init__(self, key: bytes = b"bench") -> None:
        self.key = key

    def write(self, body: bytes) -> bytes:
        return resp(b"XADD", self.key, b"*", b"d", body)

    def batch(self, bodies: Sequence[bytes]) -> tuple[bytes, int]:
        # Redis has no multi-message XADD: a pipeline of XADDs is its batch.
        return b"".join(self.write(b) for b in bodies), 2 * len(bodies)

    def stored(self, ctl: Control) -> int:
        return ctl.redis_int(resp(b"XLEN", self.key))


def wire_for(kind: str, key: bytes = b"bench") -> Wire:
    return LogdWire() if kind == "logd" else RedisWire(key)


# --------------------------------------------------------------------------- control


class Control:
    """A plain request/response connection for set-up and checks (not a hot path)."""

    def __init__(self, addr: tuple[str, int]) -> None:
        self.sock = connect(addr)
        self.buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise LoadError("server closed the connection")
        self.buf += chunk

    def readline(self) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[: i + 1]).rstrip(b"\r\n")
                del self.buf[: i + 1]
                return line
            self._fill()

    def readexact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def logd_call(self, cmd: bytes) -> bytes:
        self.sock.sendall(cmd)
        line = self.readline()
        if not line.startswith(b"OK"):
            raise LoadError(f"logd answered {cmd!r} with {line!r}")
        return line

    def logd_head(self) -> int:
        return int(self.logd_call(b"HEAD\r\n").split()[1])

    def logd_stats(self) -> dict[str, str]:
        n = int(self.logd_call(b"STATS\r\n").split()[1])
        out = {}
        for _ in range(n):
            name, _, value = self.readline().decode().partition(" ")
            out[name] = value
        return out

    def redis_reply(self) -> object:
        line = self.readline()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise LoadError(f"redis error: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.readexact(n + 2)[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.redis_reply() for _ in range(n)]
        raise LoadError(f"bad redis reply line {line!r}")

    def redis_call(self, cmd: bytes) -> object:
        self.sock.sendall(cmd)
        return self.redis_reply()

    def redis_int(self, cmd: bytes) -> int:
        value = self.redis_call(cmd)
        assert isinstance(value, int)
        return value

    def redis_info(self, section: bytes = b"") -> dict[str, str]:
        args = (b"INFO", section) if section else (b"INFO",)
        text = self.redis_call(resp(*args))
        assert isinstance(text, bytes)
        out = {}
        for line in text.decode().splitlines():
            if ":" in line and not line.startswith("#"):
                k, _, v = line.partition(":")
                out[k] = v
        return out


# --------------------------------------------------------------------------- meters


@dataclass
class Run:
    """What one measured run did."""

    messages: int
    seconds: float
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    latencies_ns: array = field(default_factory=lambda: array("q"))
    payload_bytes: int = 0  # message bodies moved
    wire_bytes: int = 0  # bytes on the wire in the measured direction
    extra: dict[str, float] = field(default_factory=dict)


def client_cpu() -> float:
    """CPU seconds (user + system) this process has used."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Meter:
    """Client and server CPU over a measured interval."""

    def __init__(self, server_cpu: Callable[[], float]) -> None:
        self.server_cpu = server_cpu
        self.c0 = self.s0 = 0.0

    def start(self) -> None:
        self.c0, self.s0 = client_cpu(), self.server_cpu()

    def stop(self, run: Run) -> Run:
        run.client_cpu_s = client_cpu() - self.c0
        run.server_cpu_s = self.server_cpu() - self.s0
        return run


def _check_chunk(chunk: bytes) -> None:
    if ERR_MARK in chunk:
        raise LoadError(f"server error reply: {chunk[:200]!r}")


# --------------------------------------------------------------------------- write loops


def closed_loop(
    addr: tuple[str, int], cmd: bytes, lines: int, seconds: float, max_n: int, meter: Meter
) -> Run:
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
                _check_chunk(chunk)
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
    _check_chunk(last_chunk)
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
    _check_chunk(last_chunk)
    return meter.stop(Run(done, (t - t_start) / 1e9, latencies_ns=lat))


# --------------------------------------------------------------------------- reads


def _digit_sum(lo: int, hi: int) -> int:
    """Total decimal digits of the integers lo..hi-1 (lo >= 1)."""
    total, p, d = 0, 1, 1
    while p <= hi:
        a, b = max(lo, p), min(hi, p * 10)
        if a < b:
            total += (b - a) * d
        p *= 10
        d += 1
    return total


def logd_read_bytes(start: int, count: int, body_len: int) -> int:
    """Exact size of ``OK``, ``count`` records of ``body_len`` bytes from ``start``, ``+EOF``."""
    per_record = 1 + 1 + len(b"%d" % body_len) + 1 + 8 + 2 + body_len + 2
    return 4 + count * per_record + _digit_sum(start, start + count) + 6


def read_logd(
    addr: tuple[str, int], start: int, count: int, body_len: int, seconds: float, meter: Meter
) -> Run:
    """``READ start count`` in one command; the reply is counted, sized and its end checked."""
    expected = logd_read_bytes(start, count, body_len)
    sock = connect(addr)
    buf = bytearray(4 * RECV_BYTES)
    view = memoryview(buf)
    recv_into = sock.recv_into
    total = 0
    tail = b""
    deadline = time.monotonic() + seconds
    meter.start()
    t0 = time.perf_counter_ns()
    try:
        sock.sendall(b"READ %d %d\r\n" % (start, count))
        first = b""
        while total < expected:
            n = recv_into(view)
            if not n:
                raise LoadError(f"connection closed after {total} of {expected} bytes")
            if not first:
                first = bytes(view[:4])
                if first != b"OK\r\n":
                    raise LoadError(f"READ answered {bytes(view[:n][:200])!r}")
            total += n
            tail = (tail + bytes(view[max(0, n - 6) : n]))[-6:]
            if total < expected and time.monotonic() > deadline:
                raise LoadError("catch-up read took too long")
        t1 = time.perf_counter_ns()
    finally:
        sock.close()
    if total != expected or tail != b"+EOF\r\n":
        raise LoadError(f"READ gave {total} bytes ending {tail!r}; expected {expected} + EOF")
    run = Run(count, (t1 - t0) / 1e9, payload_bytes=count * body_len, wire_bytes=total)
    return meter.stop(run)


def read_redis(
    addr: tuple[str, int],
    key: bytes,
    count: int,
    body_len: int,
    page: int,
    seconds: float,
    meter: Meter,
) -> Run:
    """``XRANGE key (<last> + COUNT page`` until ``count`` entries; each page counted.

    An entry is 8 lines (``*2``, ``$n``, id, ``*2``, ``$1``, field, ``$n``,
    value); the page's last id is found next to the end of its buffer.
    """
    sock = connect(addr)
    buf = bytearray(page * (body_len + 128) + RECV_BYTES)
    view = memoryview(buf)
    recv_into = sock.recv_into
    entries = wire = 0
    last = b"-"
    deadline = time.monotonic() + seconds
    tail_marker = b"\r\n*2\r\n$1\r\nd\r\n$"
    meter.start()
    t0 = time.perf_counter_ns()
    try:
        while entries < count:
            if time.monotonic() > deadline:
                raise LoadError("catch-up read took too long")
            sock.sendall(resp(b"XRANGE", key, last, b"+", b"COUNT", b"%d" % page))
            filled = lines = got_n = 0
            need = -1  # lines in this reply, once its header is in
            while True:
                n = recv_into(view[filled:])
                if not n:
                    raise LoadError("connection closed")
                lines += buf.count(b"\n", filled, filled + n)
                filled += n
                if need < 0:
                    nl = buf.find(b"\n", 0, filled)
                    if nl < 0:
                        continue
                    if buf[0:1] != b"*":
                        raise LoadError(f"XRANGE answered {bytes(buf[:200])!r}")
                    got_n = int(buf[1 : nl - 1])
                    need = 1 + 8 * got_n
                if lines >= need:
                    break
            if got_n == 0:
                raise LoadError(f"stream ended after {entries} entries")
            m = buf.rfind(tail_marker, 0, filled)
            idstart = buf.rfind(b"\n", 0, m) + 1
            last = b"(" + bytes(buf[idstart:m])
            entries += got_n
            wire += filled
        t1 = time.perf_counter_ns()
    finally:
        sock.close()
    if entries != count:
        raise LoadError(f"read {entries} entries, expected {count}")
    run = Run(count, (t1 - t0) / 1e9, payload_bytes=count * body_len, wire_bytes=wire)
    return meter.stop(run)


# --------------------------------------------------------------------------- tail latency


class _TailReader:
    """Feeds received bytes through the stamp finder; complete lines only."""

    def __init__(self, measure_from: int) -> None:
        self.carry = b""
        self.lat = array("q")
        self.seen = 0
        self.measure_from = measure_from

    def feed(self, chunk: bytes, t: int) -> None:
        data = self.carry + chunk if self.carry else chunk
        cut = data.rfind(b"\n") + 1
        self.carry = data[cut:]
        stamps = STAMP_RE.findall(data, 0, cut)
        self.seen += len(stamps)
        frm = self.measure_from
        add = self.lat.append
        for s in stamps:
            ts = int(s)
            if ts >= frm:
                add(t - ts)


def tail_latency(
    kind: str,
    addr: tuple[str, int],
    rate: int,
    seconds: float,
    warmup: float,
    body_len: int,
    meter: Meter,
) -> Run:
    """A writer at ``rate`` messages/s (single-message commands, sent every ~1 ms)
    and a tailing reader on its own connection, in one epoll loop. Latency is
    reader receive time minus the send time stamped in each body."""
    wire = wire_for(kind, b"tail")
    pad = payload(body_len)
    ctl = Control(addr)
    reader = connect(addr)
    writer = connect(addr)
    now = time.perf_counter_ns
    if kind == "logd":
        start = ctl.logd_head() + 1
        reader.sendall(b"READ %d 0\r\n" % start)
        ok = b""
        while not ok.endswith(b"\n"):
            ok += reader.recv(16)
        if ok != b"OK\r\n":
            raise LoadError(f"tail READ answered {ok!r}")
    else:
        reader.sendall(resp(b"XREAD", b"BLOCK", b"0", b"STREAMS", b"tail", b"$"))
        _wait_for(lambda: int(ctl.redis_info(b"clients")["blocked_clients"]) >= 1, 10.0)
    reader.setblocking(False)
    writer.setblocking(False)
    ep = select.epoll()
    ep.register(reader.fileno(), select.EPOLLIN)
    ep.register(writer.fileno(), select.EPOLLIN)
    t_start = now()
    tr = _TailReader(t_start + int(warmup * 1e9))
    end = t_start + int((warmup + seconds) * 1e9)
    deadline = time.monotonic() + warmup + seconds + SOCK_TIMEOUT_S
    per_ns = rate / 1e9
    sent = acked_lines = 0
    max_lag = 0
    # Redis: re-issue XREAD after each complete reply, from the last id seen.
    reply = bytearray()
    reply_lines = 0
    need = -1
    out = bytearray()  # writer bytes the kernel did not take yet
    meter.start()
    try:
        while True:
            t = now()
            if t < end:
                due = int((t - t_start) * per_ns) - sent
                if due > 0:
                    max_lag = max(max_lag, due)
                    cmd = wire.write(stamped(body_len, t, pad))
                    out += cmd * due
                    sent += due
            if out:
                k = writer.send(out)
                del out[:k]
            elif t >= end and tr.seen >= sent:
                break
            if time.monotonic() > deadline:
                raise LoadError(f"tail: {sent - tr.seen} messages never delivered")
            for fd, _ev in ep.poll(0.0005 if t < end else 0.05):
                if fd == writer.fileno():
                    chunk = writer.recv(RECV_BYTES)
                    if not chunk:
                        raise LoadError("writer connection closed")
                    _check_chunk(chunk)
                    acked_lines += chunk.count(b"\n")
                    continue
                chunk = reader.recv(RECV_BYTES)
                if not chunk:
                    raise LoadError("reader connection closed")
                tr.feed(chunk, now())
                if kind == "redis":
                    reply += chunk
                    reply_lines += chunk.count(b"\n")
                    if need < 0 and reply_lines >= 5:
                        # *1, *2, $4, "tail", *<n entries>
                        header = bytes(reply).split(b"\r\n", 5)
                        if header[0] != b"*1":
                            raise LoadError(f"XREAD answered {bytes(reply[:200])!r}")
                        need = 5 + 8 * int(header[4][1:])
                    if 0 <= need <= reply_lines:
                        m = reply.rfind(b"\r\n*2\r\n$1\r\nd\r\n$")
                        last = bytes(reply[reply.rfind(b"\n", 0, m) + 1 : m])
                        reader.sendall(
                            resp(b"XREAD", b"BLOCK", b"0", b"STREAMS", b"tail", last)
                        )
                        reply = bytearray()
                        reply_lines, need = 0, -1
        t_stop = now()
    finally:
        ep.close()
        if kind == "logd":
            reader.setblocking(True)
            reader.sendall(b"CLOSE\r\n")
        reader.close()
        writer.close()
        ctl.close()
    run = Run(sent, (t_stop - t_start) / 1e9 - warmup, latencies_ns=tr.lat)
    run.extra["writer_rate"] = sent / ((end - t_start) / 1e9)
    run.extra["max_writer_lag_msgs"] = max_lag
    return meter.stop(run)


# --------------------------------------------------------------------------- footprint


def _wait_for(cond: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise LoadError("condition not met in time")
        time.sleep(0.02)


def open_idle(addr: tuple[str, int], kind: str, n: int) -> list[socket.socket]:
    """``n`` connections, each answered one PING (so the server has set it up)."""
    socks = [connect(addr) for _ in range(n)]
    for s in socks:
        s.sendall(b"PING\r\n")
    for s in socks:
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(64)
            if not chunk:
                raise LoadError("server closed an idle connection")
            data += chunk
        if b"PONG" not in data:
            raise LoadError(f"PING answered {data!r}")
    return socks


def open_tails(addr: tuple[str, int], kind: str, n: int) -> list[socket.socket]:
    """``n`` connections each tailing the log (logd READ tail / Redis XREAD BLOCK)."""
    socks = [connect(addr) for _ in range(n)]
    with Control(addr) as ctl:
        if kind == "logd":
            start = ctl.logd_head() + 1
            for s in socks:
                s.sendall(b"READ %d 0\r\n" % start)
            for s in socks:
                data = b""
                while not data.endswith(b"\n"):
                    data += s.recv(16)
                if data != b"OK\r\n":
                    raise LoadError(f"tail READ answered {data!r}")
        else:
            cmd = resp(b"XREAD", b"BLOCK", b"0", b"STREAMS", b"tail", b"$")
            for s in socks:
                s.sendall(cmd)
            _wait_for(lambda: int(ctl.redis_info(b"clients")["blocked_clients"]) >= n, 20.0)
    return socks
