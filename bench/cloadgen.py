"""The C load generator (bench/fanin.c): built with the machine's gcc at bench time, run per measurement.

Scenarios 1, 2 and 4 drive both servers through it: one Python thread
driving 50 connections cost as much CPU per message as the server and was
the limit (issue 12). The binary runs its own warm-up, prints "measuring"
when the measured phase starts (the server's CPU is sampled then) and one
JSON object at the end, with its own user + system CPU over that phase
(getrusage), which is reported as the client's CPU.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from array import array
from pathlib import Path
from typing import Any

from .loadgen import Meter, Run
from .wire import SOCK_TIMEOUT_S, LoadError

SOURCE = Path(__file__).resolve().parent / "fanin.c"
CFLAGS = ("-O2", "-Wall", "-Wextra")
GCC_HOWTO = (
    "gcc not found: the benchmark builds its C load generator (bench/fanin.c) with gcc. "
    "Install it (`apt-get install -y gcc` on Debian/Ubuntu), or run with `--loadgen python` "
    "(the Python generator, which can be the bottleneck of scenarios 1, 2 and 4)."
)
EXIT_GRACE_S = 10.0  # after its own deadline, how long the generator may take to exit


class BuildError(RuntimeError):
    """bench/fanin.c could not be compiled."""


def gcc() -> str | None:
    """Path of gcc, or None."""
    return shutil.which("gcc")


def gcc_version() -> str:
    """The first line of ``gcc --version``."""
    path = gcc()
    if path is None:
        return "not installed"
    out = subprocess.run([path, "--version"], capture_output=True, timeout=30, check=False)
    return out.stdout.decode("utf-8", "replace").splitlines()[0] if out.stdout else "?"


class CLoadgen:
    """A compiled bench/fanin.c in a temporary directory; `close` removes it."""

    def __init__(self) -> None:
        path = gcc()
        if path is None:
            raise BuildError(GCC_HOWTO)
        self.workdir = Path(tempfile.mkdtemp(prefix="logd-bench-fanin-"))
        self.binary = self.workdir / "fanin"
        cmd = [path, *CFLAGS, "-o", str(self.binary), str(SOURCE)]
        out = subprocess.run(cmd, capture_output=True, timeout=120, check=False)
        if out.returncode != 0:
            self.close()
            raise BuildError(f"{' '.join(cmd)} failed:\n{out.stderr.decode('utf-8', 'replace')}")
        self.description = f"bench/fanin.c, {gcc_version()} {' '.join(CFLAGS)}"

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def run(
        self,
        addr: tuple[str, int],
        cmd: bytes,
        lines: int,
        *,
        conns: int,
        depth: int,
        warmup: float,
        seconds: float,
        max_cmds: int,
        meter: Meter,
        per_cmd: int = 1,
    ) -> Run:
        """``conns`` connections with ``depth`` commands in flight each; warm-up, then a measured run."""
        cmd_path, lat_path = self.workdir / "command", self.workdir / "latencies"
        cmd_path.write_bytes(cmd)
        lat_path.unlink(missing_ok=True)
        argv = [
            str(self.binary),
            "--host", addr[0],
            "--port", str(addr[1]),
            "--command", str(cmd_path),
            "--lines", str(lines),
            "--conns", str(conns),
            "--depth", str(depth),
            "--per-command", str(per_cmd),
            "--warmup", str(warmup),
            "--seconds", str(seconds),
            "--max-commands", str(max_cmds),
            "--timeout", str(SOCK_TIMEOUT_S),
            "--latencies", str(lat_path),
        ]  # fmt: skip
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()  # bounded: the generator fails itself after its timeout
            if first == b"measuring\n":
                meter.start()
            budget = warmup + seconds + 2 * SOCK_TIMEOUT_S + EXIT_GRACE_S
            rest, err = proc.communicate(timeout=budget)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        summary = _summary(first + rest, err, proc.returncode)
        child_cpu = float(summary["cpu_user_s"]) + float(summary["cpu_sys_s"])
        run = meter.stop(Run(int(summary["messages"]), float(summary["seconds"])), child_cpu_s=child_cpu)
        run.generator = "c"
        run.warmup_messages = int(summary["warmup_messages"])
        run.latencies_ns = array("q")
        run.latencies_ns.frombytes(lat_path.read_bytes())
        # The split shows where the generator's time goes: mostly the kernel's TCP work.
        run.extra["client_user_cpu_pct"] = 100 * float(summary["cpu_user_s"]) / max(run.seconds, 1e-9)
        if depth * per_cmd > 1:
            run.extra["in_flight"] = depth * per_cmd
        return run


def _summary(stdout: bytes, stderr: bytes, status: int | None) -> dict[str, Any]:
    """The generator's JSON summary; its error as a LoadError."""
    last = stdout.strip().splitlines()[-1] if stdout.strip() else b""
    try:
        doc = json.loads(last)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise LoadError(f"fanin exited with {status}: {stdout[-300:]!r} {stderr[-300:]!r}")
    if "error" in doc or status != 0:
        raise LoadError(f"fanin: {doc.get('error', f'exit status {status}')}")
    return doc
