"""``python -m bench.tls_bench``: what TLS costs logd, next to what it costs Redis 7 (``--tls-port``).

For each server (logd, redis-server) it starts one plain and one TLS
instance on 127.0.0.1 (certificates made now with trustme, TLS 1.2+,
ECDSA P-256 as trustme issues them) and measures, with the same asyncio
load generator over plain and TLS sockets:

- batched write: one connection, 100 messages of 100 bytes per batch (logd:
  one MSG; Redis: a pipeline of 100 XADD), 8 batches in flight;
- fan-in: 32 connections, one single-message write in flight each;
- catch-up read: 200,000 stored messages of 100 bytes read from the start
  (logd: one ``READ 1 200000``; Redis: ``XRANGE`` pages of 10,000).

Durability is the same for both and made cheap (logd ``--fsync interval:1000``,
Redis ``appendfsync everysec``), so what differs is the transport. It prints
a table and writes ``bench/tls_results.json``. Servers are stopped by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import trustme

from .servers import REPO_ROOT, _logd_env, _ping, free_port, logd_command, redis_binary, redis_version

BENCH_DIR = Path(__file__).resolve().parent
BODY = b"x" * 100
BATCH = 100
IN_FLIGHT = 8
FAN_IN = 32
READ_COUNT = 200_000
REDIS_PAGE = 10_000


@dataclass
class Row:
    server: str
    transport: str  # "plain" or "tls"
    scenario: str
    messages_per_s: float
    mb_per_s: float
    seconds: float


# --- servers ------------------------------------------------------------------------------


@dataclass
class Proc:
    kind: str
    transport: str
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def make_certs(d: Path) -> tuple[Path, Path, Path]:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    leaf.private_key_and_cert_chain_pem.write_to_path(str(d / "server.pem"))
    leaf.private_key_pem.write_to_path(str(d / "server.key"))
    leaf.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    return d / "ca.pem", d / "cert.pem", d / "server.key"


def start_logd(tls: tuple[Path, Path, Path] | None) -> Proc:
    workdir = Path(tempfile.mkdtemp(prefix="logd-tlsbench-"))
    cmd = [*logd_command(), "serve", "--host", "127.0.0.1", "--port", "0", "--data-dir", str(workdir / "data"),
           "--fsync", "interval:1000", "--log-level", "warning"]
    if tls is not None:
        cmd += ["--tls-cert", str(tls[1]), "--tls-key", str(tls[2])]
    with open(workdir / "stdout", "wb") as out, open(workdir / "stderr", "wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_logd_env(), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=err, start_new_session=True)
    deadline = time.monotonic() + 20
    while b"listening on" not in (workdir / "stdout").read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"logd did not start: {(workdir / 'stderr').read_text()}")
        time.sleep(0.02)
    port = int((workdir / "stdout").read_bytes().split(b":")[-1])
    return Proc("logd", "tls" if tls else "plain", port, proc, workdir)


def start_redis(binary: str, tls: tuple[Path, Path, Path] | None) -> Proc:
    workdir = Path(tempfile.mkdtemp(prefix="redis-tlsbench-"))
    port = free_port()
    cmd = [binary, "--bind", "127.0.0.1", "--dir", str(workdir), "--appendonly", "yes", "--appendfsync", "everysec",
           "--save", "", "--auto-aof-rewrite-percentage", "0", "--daemonize", "no", "--loglevel", "warning",
           "--logfile", str(workdir / "redis.log")]
    if tls is None:
        cmd += ["--port", str(port)]
    else:
        cmd += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls[1]), "--tls-key-file",
                str(tls[2]), "--tls-ca-cert-file", str(tls[0]), "--tls-auth-clients", "no"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    p = Proc("redis", "tls" if tls else "plain", port, proc, workdir)
    if tls is None:
        _ping(("127.0.0.1", port), b"PING\r\n", b"+PONG", time.monotonic() + 20)
    else:
        deadline = time.monotonic() + 20
        while True:
            try:
                asyncio.run(_tls_ping(port, tls[0]))
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    p.stop()
                    log = (workdir / "redis.log").read_text()
                    raise RuntimeError(f"redis --tls-port did not start: {log}") from None
                time.sleep(0.05)
    return p


async def _tls_ping(port: int, ca: Path) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl.create_default_context(cafile=ca))
    writer.write(b"PING\r\n")
    await reader.readline()
    writer.close()


# --- load -------------------------------------------------------------------------------------


def resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


class Lines(asyncio.Protocol):
    """Counts reply lines; ``on_lines`` decides what to send next."""

    def __init__(self, on_lines: Callable[[Lines, int], None]) -> None:
        self.on_lines = on_lines
        self.transport: asyncio.Transport | None = None
        self.lines = 0
        self.bytes = 0
        self.tail = b""
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.bytes += len(data)
        self.tail = (self.tail + data)[-16:]
        n = data.count(b"\n")
        self.lines += n
        self.on_lines(self, n)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"lost: {exc}"))


async def connect(port: int, ctx: ssl.SSLContext | None, on_lines: Callable[[Lines, int], None]) -> Lines:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: Lines(on_lines), "127.0.0.1", port, ssl=ctx,
                                            server_hostname="127.0.0.1" if ctx else None)
    return proto


def write_cmds(kind: str) -> tuple[bytes, int, bytes, int]:
    """(one write, its reply lines, one batch, its reply lines)."""
    if kind == "logd":
        one = b"MSG %d\r\n%s\r\n" % (len(BODY), BODY)
        batch = b"MSG " + b" ".join([b"%d" % len(BODY)] * BATCH) + b"\r\n" + (BODY + b"\r\n") * BATCH
        return one, 1, batch, 1
    one = resp(b"XADD", b"w", b"*", b"d", BODY)
    return one, 2, one * BATCH, 2 * BATCH


async def batched(kind: str, port: int, ctx: ssl.SSLContext | None, seconds: float) -> tuple[int, float]:
    _one, _l, batch, per = write_cmds(kind)
    state = {"acked": 0, "sent": 0, "stop": False}

    def more(p: Lines, _n: int) -> None:
        acked = p.lines // per
        state["acked"] = acked
        assert p.transport is not None
        while not state["stop"] and state["sent"] - acked < IN_FLIGHT:
            p.transport.write(batch)
            state["sent"] += 1
        if state["stop"] and acked == state["sent"] and not p.done.done():
            p.done.set_result(None)

    p = await connect(port, ctx, more)
    t0 = time.perf_counter()
    more(p, 0)
    await asyncio.sleep(seconds)
    state["stop"] = True
    if state["acked"] < state["sent"]:
        await p.done
    elapsed = time.perf_counter() - t0
    assert p.transport is not None
    p.transport.close()
    return state["acked"] * BATCH, elapsed


async def fan_in(kind: str, port: int, ctx: ssl.SSLContext | None, seconds: float) -> tuple[int, float]:
    one, per, _b, _l = write_cmds(kind)
    stop = [False]

    def again(p: Lines, n: int) -> None:
        if p.lines % per == 0 and n:
            assert p.transport is not None
            if stop[0]:
                if not p.done.done():
                    p.done.set_result(None)
            else:
                p.transport.write(one)

    conns = [await connect(port, ctx, again) for _ in range(FAN_IN)]
    t0 = time.perf_counter()
    for p in conns:
        assert p.transport is not None
        p.transport.write(one)
    await asyncio.sleep(seconds)
    stop[0] = True
    await asyncio.gather(*(p.done for p in conns))
    elapsed = time.perf_counter() - t0
    for p in conns:
        assert p.transport is not None
        p.transport.close()
    return sum(p.lines // per for p in conns), elapsed


async def prefill(kind: str, port: int, ctx: ssl.SSLContext | None) -> None:
    """READ_COUNT messages to read back (Redis: key r with ids 1-0 .. N-0, so reply sizes are known)."""
    if kind == "logd":
        _o, _l, batch, per = write_cmds(kind)
        chunks = [batch] * (READ_COUNT // BATCH)
    else:
        chunks = [b"".join(resp(b"XADD", b"r", b"%d-0" % i, b"d", BODY) for i in range(j, j + BATCH))
                  for j in range(1, READ_COUNT + 1, BATCH)]
        per = 2 * BATCH
    want = len(chunks) * per

    def check(p: Lines, _n: int) -> None:
        if p.lines >= want and not p.done.done():
            p.done.set_result(None)

    p = await connect(port, ctx, check)
    assert p.transport is not None
    for c in chunks:
        p.transport.write(c)
    await p.done
    p.transport.close()


def redis_page_bytes(first: int, count: int) -> int:
    entry = sum(len(b"*2\r\n$%d\r\n%d-0\r\n*2\r\n$1\r\nd\r\n$%d\r\n" % (len(b"%d-0" % i), i, len(BODY)))
                + len(BODY) + 2 for i in range(first, first + count))
    return len(b"*%d\r\n" % count) + entry


async def catch_up(kind: str, port: int, ctx: ssl.SSLContext | None) -> tuple[int, float, int]:
    if kind == "logd":
        def ended(p: Lines, _n: int) -> None:
            if p.tail.endswith(b"+EOF\r\n") and not p.done.done():
                p.done.set_result(None)

        p = await connect(port, ctx, ended)
        t0 = time.perf_counter()
        assert p.transport is not None
        p.transport.write(b"READ 1 %d\r\n" % READ_COUNT)
        await p.done
        elapsed = time.perf_counter() - t0
        p.transport.close()
        return READ_COUNT, elapsed, p.bytes
    sizes = [redis_page_bytes(s, min(REDIS_PAGE, READ_COUNT - s + 1)) for s in range(1, READ_COUNT + 1, REDIS_PAGE)]
    state = {"page": 0, "need": sizes[0]}

    def page(p: Lines, _n: int) -> None:
        assert p.transport is not None
        while p.bytes >= state["need"]:
            state["page"] += 1
            if state["page"] == len(sizes):
                if not p.done.done():
                    p.done.set_result(None)
                return
            start = 1 + state["page"] * REDIS_PAGE
            end = min(READ_COUNT, start + REDIS_PAGE - 1)
            p.transport.write(resp(b"XRANGE", b"r", b"%d-0" % start, b"%d-0" % end))
            state["need"] += sizes[state["page"]]

    p = await connect(port, ctx, page)
    t0 = time.perf_counter()
    assert p.transport is not None
    p.transport.write(resp(b"XRANGE", b"r", b"1-0", b"%d-0" % min(REDIS_PAGE, READ_COUNT)))
    await p.done
    elapsed = time.perf_counter() - t0
    p.transport.close()
    return READ_COUNT, elapsed, p.bytes


async def measure(srv: Proc, ctx: ssl.SSLContext | None, seconds: float) -> list[Row]:
    rows = []
    n, t = await batched(srv.kind, srv.port, ctx, seconds)
    rows.append(Row(srv.kind, srv.transport, "batched write", n / t, n * len(BODY) / t / 1e6, t))
    n, t = await fan_in(srv.kind, srv.port, ctx, seconds)
    rows.append(Row(srv.kind, srv.transport, f"fan-in ({FAN_IN} conns)", n / t, n * len(BODY) / t / 1e6, t))
    await prefill(srv.kind, srv.port, ctx)
    n, t, nbytes = await catch_up(srv.kind, srv.port, ctx)
    rows.append(Row(srv.kind, srv.transport, "catch-up read", n / t, nbytes / t / 1e6, t))
    return rows


def redis_has_tls(binary: str) -> tuple[bool, str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False)
    linked = "libssl" in out.stdout
    return linked, "linked against libssl (ldd)" if linked else "not built with TLS (no libssl in ldd)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.tls_bench", description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="measured time per write run")
    ap.add_argument("--out", type=Path, default=BENCH_DIR / "tls_results.json")
    args = ap.parse_args(argv)
    import uvloop

    certdir = Path(tempfile.mkdtemp(prefix="logd-tlsbench-certs-"))
    files = make_certs(certdir)
    client_ctx = ssl.create_default_context(cafile=str(files[0]))
    binary = redis_binary()
    notes = {"redis": redis_version() if binary else "not installed"}
    kinds = ["logd"]
    if binary:
        ok, why = redis_has_tls(binary)
        notes["redis_tls"] = why
        if ok:
            kinds.append("redis")
    rows: list[Row] = []
    for kind in kinds:
        for tls in (None, files):
            assert binary is not None or kind == "logd"
            srv = start_logd(tls) if kind == "logd" else start_redis(binary or "", tls)
            try:
                rows += uvloop.run(measure(srv, client_ctx if tls else None, args.seconds))
            finally:
                srv.stop()
    print(f"{'server':7} {'scenario':22} {'plain msg/s':>12} {'TLS msg/s':>12} {'TLS/plain':>9} {'TLS MB/s':>9}")
    for kind in kinds:
        for scenario in dict.fromkeys(r.scenario for r in rows if r.server == kind):
            plain = next(r for r in rows if (r.server, r.scenario, r.transport) == (kind, scenario, "plain"))
            tls_row = next(r for r in rows if (r.server, r.scenario, r.transport) == (kind, scenario, "tls"))
            print(f"{kind:7} {scenario:22} {plain.messages_per_s:12,.0f} {tls_row.messages_per_s:12,.0f} "
                  f"{tls_row.messages_per_s / plain.messages_per_s:9.2f} {tls_row.mb_per_s:9.1f}")
    for k, v in notes.items():
        print(f"{k}: {v}")
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "openssl": ssl.OPENSSL_VERSION,
                    "platform": platform.platform()},
        "notes": notes,
        "settings": {"body_bytes": len(BODY), "batch": BATCH, "in_flight": IN_FLIGHT, "fan_in": FAN_IN,
                     "read_count": READ_COUNT, "seconds": args.seconds, "logd_fsync": "interval:1000",
                     "redis_appendfsync": "everysec"},
        "rows": [asdict(r) for r in rows],
    }
    shutil.rmtree(certdir, ignore_errors=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
