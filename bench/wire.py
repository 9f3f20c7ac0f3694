"""How each server spells the benchmark's operations, and a plain control connection.

Commands are encoded once, up front; the load loops only send these bytes.
Payloads are lowercase letters and digits, so they never contain CR, LF, "T"
(the tail-latency stamp marker) or "ERR".
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable, Sequence

SOCK_TIMEOUT_S = 30.0
ALPHABET = b"abcdefghijklmnopqrstuvwxyz0123456789"


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


def wait_for(cond: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > deadline:
            raise LoadError("condition not met in time")
        time.sleep(0.02)
