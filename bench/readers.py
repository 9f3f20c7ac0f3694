"""Read load: catch-up reads, tail latency, and connections held open for footprint.

Like the write loops, these count and size replies instead of parsing them in
Python: a logd READ reply is checked against its exact expected size and its
``+EOF``, a Redis XRANGE page against its line count.
"""

from __future__ import annotations

import re
import select
import socket
import time
from array import array

from .loadgen import RECV_BYTES, Meter, Run, check_chunk
from .wire import SOCK_TIMEOUT_S, Control, LoadError, connect, payload, resp, stamped, wait_for, wire_for

# Tail messages start with "T" + 19-digit send time (perf_counter_ns); "T" is
# never in a payload, a logd record header or a Redis reply frame.
STAMP_RE = re.compile(rb"T(\d{19})")


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


def read_logd(addr: tuple[str, int], start: int, count: int, body_len: int, seconds: float, meter: Meter) -> Run:
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
        wait_for(lambda: int(ctl.redis_info(b"clients")["blocked_clients"]) >= 1, 10.0)
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
                try:
                    del out[: writer.send(out)]
                except BlockingIOError:
                    pass  # the server is not reading: the backlog counts in the latency
            elif t >= end and tr.seen >= sent:
                break
            if time.monotonic() > deadline:
                break  # reported as undelivered
            for fd, _ev in ep.poll(0.0005 if t < end else 0.05):
                if fd == writer.fileno():
                    chunk = writer.recv(RECV_BYTES)
                    if not chunk:
                        raise LoadError("writer connection closed")
                    check_chunk(chunk)
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
                        reader.sendall(resp(b"XREAD", b"BLOCK", b"0", b"STREAMS", b"tail", last))
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
    # Rate over the whole writing time; latency samples only after the warm-up.
    run = Run(sent, (end - t_start) / 1e9, latencies_ns=tr.lat)
    run.extra["drain_ms"] = (t_stop - end) / 1e6
    run.extra["undelivered"] = sent - tr.seen
    run.extra["writer_rate"] = sent / ((end - t_start) / 1e9)
    run.extra["max_writer_lag_msgs"] = max_lag
    return meter.stop(run)


# --------------------------------------------------------------------------- footprint


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
            wait_for(lambda: int(ctl.redis_info(b"clients")["blocked_clients"]) >= n, 20.0)
    return socks
