"""Running under systemd: READY=1 on a real NOTIFY_SOCKET, SIGHUP reload, the unit file verified."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from logd import systemd
from logd.config import resolve

from .conftest import LISTENING, ServerProcess, _readline_with_deadline, wait_for

ROOT = Path(__file__).resolve().parents[2]


def notify_socket(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(20)  # a deadline for the message, not a wait for something to settle
    return sock


def messages(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines() if "=" in line)


@pytest.mark.parametrize("abstract", [False, True])
def test_ready_and_stopping_on_notify_socket(start_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            abstract: bool) -> None:  # type: ignore[no-untyped-def]
    if abstract:
        name = f"logd-test-{os.getpid()}-{tmp_path.name}"
        sock = notify_socket("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    else:
        path = str(tmp_path / "notify.sock")
        sock = notify_socket(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
    with sock:
        srv: ServerProcess = start_server()
        ready = messages(sock)
        assert ready["READY"] == "1"
        assert ready["MAINPID"] == str(srv.pid)
        assert ready["STATUS"] == f"listening on 127.0.0.1:{srv.port}"
        srv.connect().close()  # it does listen
        assert srv.terminate() == 0
        assert messages(sock)["STOPPING"] == "1"


def test_notify_without_socket_does_nothing_and_a_dead_socket_is_no_failure(tmp_path: Path) -> None:
    assert systemd.notify("READY=1", env={}) is False
    assert systemd.notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "nobody")}) is False


def _serve(config: Path, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    err = tmp_path / "stderr"
    with open(err, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "logd.cli", "serve", "--port", "0", "--config", str(config),
                                 "--data-dir", str(tmp_path / "data")],
                                stdout=subprocess.PIPE, stderr=f, stdin=subprocess.DEVNULL, cwd=ROOT)
    assert LISTENING.search(_readline_with_deadline(proc, 20)), err.read_text()
    return proc, err


def test_sighup_rereads_the_log_level(tmp_path: Path) -> None:
    config = tmp_path / "logd.toml"
    config.write_text('log-level = "warning"\n')
    proc, err = _serve(config, tmp_path)
    try:
        config.write_text('log-level = "bogus"\n')  # a bad edit: logged, the server goes on as it was
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload_failed" in err.read_text(), 20, "reload_failed")
        config.write_text('log-level = "info"\n')
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "config_reloaded" in err.read_text(), 20, "config_reloaded")
        assert "stopping" not in err.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # "stopping" is logged at info level: seen only because the reload lowered the level from warning.
    assert "stopping" in err.read_text()


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is not installed (.ci/run installs systemd)"
    logd_bin = shutil.which("logd", path=os.path.dirname(sys.executable))
    assert logd_bin is not None
    unit = (ROOT / "contrib" / "logd.service").read_text()
    assert "ExecStart=/usr/local/bin/logd " in unit
    # verify checks that ExecStart's program exists: point it at this installation's logd.
    copy = tmp_path / "logd.service"
    copy.write_text(unit.replace("ExecStart=/usr/local/bin/logd ", f"ExecStart={logd_bin} "))
    proc = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip() and not proc.stdout.strip(), proc.stderr + proc.stdout
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ReadWritePaths=/var/lib/logd", "User=logd"):
        assert line in unit.splitlines()


def test_sample_config_file_is_valid() -> None:
    r = resolve({}, {}, str(ROOT / "contrib" / "logd.toml"))
    assert r.config.data_dir == "/var/lib/logd" and r.config.metrics_port == 9774
