"""Issue 13's property: damage on disk never loses, reuses or hides silently.

A stopped server's segments and indexes get a random byte range corrupted
(XOR), zero-filled, or the file truncated. Then `logd check` runs and the
server restarts. Either it refuses to start naming the damage (and check
reports a problem), or it starts with every acknowledged id: each record is
served intact or refused with an error (never other bytes), the next MSG
gets the next id (none is handed out twice), and check reports a problem
exactly when a record could not be served (a damaged index that the server
rebuilds at open is the one problem it may fix by itself).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from logd.client import Client, Retry
from logd.errors import LogdError

from .conftest import START_TIMEOUT, ServerProcess, _readline_with_deadline

COUNT = 60
SEGMENT = "2KiB"


def body_of(id: int) -> bytes:
    return b"%d:" % id + bytes((id * 31 + k) % 251 for k in range(40 + id % 90))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("damage") / "template"
    srv = ServerProcess(d, ["--segment-bytes", SEGMENT]).start()
    try:
        with Client(srv.host, srv.port) as client:
            for id in range(1, COUNT + 1):
                assert client.append(body_of(id)) == [id]
    finally:
        assert srv.terminate() == 0
    assert len(list(d.glob("*.log"))) >= 3  # closed segments and an active one
    return d


DAMAGE = st.tuples(
    st.sampled_from(["flip", "zero", "truncate"]),
    st.integers(min_value=0, max_value=10_000),  # file choice, taken modulo the number of files
    st.floats(min_value=0, max_value=1, exclude_max=True),  # where in the file
    st.integers(min_value=1, max_value=64),  # how many bytes
    st.integers(min_value=1, max_value=255),  # the XOR mask of a flip
)


def damage(d: Path, how: tuple[str, int, float, int, int]) -> str:
    kind, pick, where, length, mask = how
    files = sorted(p for p in d.iterdir() if p.suffix in (".log", ".idx") and p.stat().st_size)
    path = files[pick % len(files)]
    size = path.stat().st_size
    offset = int(where * size)
    if kind == "truncate":
        os.truncate(path, offset)
    else:
        with open(path, "r+b") as f:
            f.seek(offset)
            old = f.read(min(length, size - offset))
            f.seek(offset)
            f.write(bytes(b ^ mask for b in old) if kind == "flip" else bytes(len(old)))
    return f"{kind} {path.name} at {offset} ({length} bytes)"


def start(d: Path) -> tuple[ServerProcess | None, str]:
    """Start `logd serve` on ``d``: the server, or None and what it said when it refused."""
    srv = ServerProcess(d, [])
    srv.stderr_path = d.parent / f"{d.name}.stderr"
    with open(srv.stderr_path, "wb") as err:
        srv.proc = subprocess.Popen(
            [sys.executable, "-m", "logd.cli", "serve", "--port", "0", "--data-dir", str(d), "--log-level", "warning"],
            stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL,
        )
    line = _readline_with_deadline(srv.proc, START_TIMEOUT)
    if not line:
        status = srv.proc.wait(timeout=30)
        return None, f"status {status}: {srv.stderr()}"
    host, port = line.decode().rsplit(" ", 1)[1].strip().split(":")
    srv.host, srv.port = host, int(port)
    return srv, ""


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(how=DAMAGE)
def test_damage_is_refused_or_every_acknowledged_record_is_served(template: Path, how) -> None:  # type: ignore[no-untyped-def]
    d = template.parent / uuid.uuid4().hex
    shutil.copytree(template, d)
    try:
        what = damage(d, how)
        check = subprocess.run([sys.executable, "-m", "logd.cli", "check", str(d)], capture_output=True, text=True,
                               timeout=60)
        assert check.returncode in (0, 1), (what, check.stdout, check.stderr)
        problems = [line for line in check.stdout.splitlines()[:-1] if " note: " not in line]
        srv, refusal = start(d)
        if srv is None:
            # Refused: with the distinct status, naming a segment file, and check agrees.
            assert refusal.startswith("status 6:") and "Traceback" not in refusal, (what, refusal)
            assert str(d / "0000") in refusal and "offset" in refusal and "id" in refusal, (what, refusal)
            assert check.returncode == 1, (what, refusal, check.stdout)
            event("refused to start")
            return
        unreadable = []
        try:
            with Client(srv.host, srv.port, timeout=10, retry=Retry(attempts=1)) as client:
                assert client.head() == COUNT, what  # nothing acknowledged went missing
                for id in range(1, COUNT + 1):
                    try:
                        (record,) = client.read(id, 1, wait=True)
                    except LogdError:
                        unreadable.append(id)  # refused, never served as other bytes
                    else:
                        assert (record.id, record.body) == (id, body_of(id)), what
                assert client.append(b"next") == [COUNT + 1], what  # no id handed out twice
        finally:
            assert srv.terminate() == 0
        assert "Traceback" not in srv.stderr(), (what, srv.stderr())
        event("started, some records refused" if unreadable else "started, every record served")
        if unreadable:
            assert check.returncode == 1, (what, unreadable, check.stdout)
        else:
            # Served whole: check found nothing, or only an index the server rebuilt at open.
            assert all(".idx:" in line for line in problems), (what, check.stdout)
    finally:
        shutil.rmtree(d, ignore_errors=True)
