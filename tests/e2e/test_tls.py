"""TLS (issue 14) on real `logd serve` processes: logds:// clients and followers, client certificates,
and clean refusals of bad certificates and plain-TCP clients. Certificates are made at test time (trustme)."""

from __future__ import annotations

import filecmp
import os
import ssl
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from logd import errors
from logd.client import NO_RETRY, Client
from logd.tls import client_context

from .conftest import new_token, wait_for


@dataclass
class Certs:
    ca: Path  # signs the server's and the good client's certificates
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from another CA
    rogue_key: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    d = tmp_path_factory.mktemp("certs")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("replica.logd.test")
    rogue = other.issue_cert("rogue.logd.test")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    server.cert_chain_pems[0].write_to_path(str(d / "server.pem"))
    server.private_key_pem.write_to_path(str(d / "server.key"))
    client.cert_chain_pems[0].write_to_path(str(d / "client.pem"))
    client.private_key_pem.write_to_path(str(d / "client.key"))
    rogue.cert_chain_pems[0].write_to_path(str(d / "rogue.pem"))
    rogue.private_key_pem.write_to_path(str(d / "rogue.key"))
    return Certs(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key",
                 d / "rogue.pem", d / "rogue.key")


def tls_args(c: Certs, client_certs: bool = True) -> list[str]:
    args = ["--tls-cert", str(c.server_cert), "--tls-key", str(c.server_key)]
    return args + (["--tls-ca", str(c.ca)] if client_certs else [])


def good_context(c: Certs) -> ssl.SSLContext:
    return client_context(str(c.ca), str(c.client_cert), str(c.client_key))


def test_follower_over_tls_with_a_replicate_token_is_byte_identical(start_server, certs: Certs,
                                                                    tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    auth = tmp_path / "cluster.auth"
    writer, replica, reader = (new_token(auth, n, r) for n, r in
                               (("app", "write"), ("replica", "replicate"), ("ops", "read")))
    common = ["--auth-file", str(auth), *tls_args(certs), "--segment-bytes", "64KiB"]
    leader = start_server(*common)
    follower = start_server(*common, "--replica-of", f"logds://:{replica}@127.0.0.1:{leader.port}")
    url = f"logds://127.0.0.1:{leader.port}"
    with Client.from_url(url, token=writer, ssl_context=good_context(certs)) as client:
        for i in range(40):
            client.append(*[b"batch %d message %d " % (i, j) + b"x" * (i * 7 % 300) for j in range(50)])
        head = client.head()
    assert head == 2000
    with Client.from_url(f"logds://:{reader}@127.0.0.1:{follower.port}", ssl_context=good_context(certs)) as f:
        wait_for(lambda: f.stats()["log_head"] == str(head), what="the follower caught up")
    leader.terminate()
    follower.terminate()
    segments = sorted(p.name for p in leader.data_dir.glob("*.log"))
    assert len(segments) > 3
    assert sorted(p.name for p in follower.data_dir.glob("*.log")) == segments
    for name in segments:  # closed segments and their indexes are byte-identical (cmp)
        for suffix in (".log", ".idx"):
            ours, theirs = leader.data_dir / (name[:-4] + suffix), follower.data_dir / (name[:-4] + suffix)
            assert filecmp.cmp(ours, theirs, shallow=False), ours


def test_follower_takes_its_token_from_logd_replica_token(start_server, certs: Certs, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    auth = tmp_path / "a.auth"
    replica, writer = new_token(auth, "replica", "replicate"), new_token(auth, "app", "write")
    leader = start_server("--auth-file", str(auth), *tls_args(certs))
    monkeypatch.setenv("LOGD_REPLICA_TOKEN", replica)
    follower = start_server(*tls_args(certs), "--replica-of", f"logds://127.0.0.1:{leader.port}")
    monkeypatch.delenv("LOGD_REPLICA_TOKEN")
    Client(leader.host, leader.port, token=writer, ssl_context=good_context(certs)).append("one", "two")
    with Client(follower.host, follower.port, ssl_context=good_context(certs)) as f:
        wait_for(lambda: f.head() == 2, what="replicated")


def test_follower_takes_its_token_from_replica_token_file(start_server, certs: Certs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    auth = tmp_path / "a.auth"
    replica, writer = new_token(auth, "replica", "replicate"), new_token(auth, "app", "write")
    leader = start_server("--auth-file", str(auth), *tls_args(certs))
    token_file = tmp_path / "replica.token"
    token_file.write_text(replica + "\n")
    token_file.chmod(0o600)
    follower = start_server(*tls_args(certs), "--replica-of", f"logds://127.0.0.1:{leader.port}",
                            "--replica-token-file", str(token_file))
    Client(leader.host, leader.port, token=writer, ssl_context=good_context(certs)).append("one", "two")
    with Client(follower.host, follower.port, ssl_context=good_context(certs)) as f:
        wait_for(lambda: f.head() == 2, what="replicated")
    assert "visible to other users" not in follower.stderr()


def test_a_follower_with_a_read_token_stops_with_status_4(start_server, certs: Certs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    auth = tmp_path / "a.auth"
    reader = new_token(auth, "ops", "read")
    leader = start_server("--auth-file", str(auth), *tls_args(certs))
    follower = start_server(*tls_args(certs), "--replica-of", f"logds://:{reader}@127.0.0.1:{leader.port}")
    assert follower.proc.wait(timeout=30) == 4
    assert "role read may not send REPLICATE" in follower.stderr()


def test_bad_certificates_and_plain_clients_are_refused_cleanly(start_server, certs: Certs) -> None:  # type: ignore[no-untyped-def]
    leader = start_server(*tls_args(certs))
    plain = Client(leader.host, leader.port, timeout=5, retry=NO_RETRY)
    with pytest.raises(errors.ConnectionError):
        plain.ping()
    attempts = {
        "a certificate from another CA": client_context(str(certs.ca), str(certs.rogue_cert), str(certs.rogue_key)),
        "no client certificate": client_context(str(certs.ca)),
        "a server it cannot verify": client_context(None, str(certs.client_cert), str(certs.client_key)),
    }
    for what, ctx in attempts.items():
        client = Client(leader.host, leader.port, ssl_context=ctx, timeout=5,
                        retry=NO_RETRY)
        with pytest.raises(errors.ConnectionError) as caught:
            client.ping()
        assert "Traceback" not in str(caught.value), what
    # The server logged each refusal, one line each, with the peer, and no traceback; it still serves.
    assert Client(leader.host, leader.port, ssl_context=good_context(certs)).ping()
    log = wait_for(lambda: (lambda t: t if t.count("tls_handshake_failed") >= 4 else None)(leader.stderr()),
                   what="handshake failures logged")
    assert "Traceback" not in log and "peer=127.0.0.1:" in log
    assert leader.proc.poll() is None


def test_cli_over_tls_with_client_certificate_and_token(start_server, certs: Certs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    auth = tmp_path / "a.auth"
    admin = new_token(auth, "root", "admin")
    srv = start_server("--auth-file", str(auth), *tls_args(certs))
    env = {**os.environ, "LOGD_CLIENT_TLS_CA": str(certs.ca), "LOGD_CLIENT_TLS_CERT": str(certs.client_cert),
           "LOGD_CLIENT_TLS_KEY": str(certs.client_key), "LOGD_TOKEN": admin}
    base = [sys.executable, "-m", "logd.cli"]
    url = f"logds://127.0.0.1:{srv.port}"
    out = subprocess.run([*base, "append", "--url", url, "a", "b"], capture_output=True, env=env, timeout=60)
    assert out.returncode == 0 and out.stdout == b"1\n2\n", out
    out = subprocess.run([*base, "read", "--url", url], capture_output=True, env=env, timeout=60)
    assert out.stdout == b"a\nb\n", out
    out = subprocess.run([*base, "demote", url], capture_output=True, env=env, timeout=60)
    assert out.returncode == 0, out
    out = subprocess.run([*base, "promote", url], capture_output=True, env=env, timeout=60)
    assert out.returncode == 0, out
    # Plain logd:// against the TLS port: a one-line failure, exit 1.
    out = subprocess.run([*base, "head", "--url", f"logd://127.0.0.1:{srv.port}", "--timeout", "3"],
                         capture_output=True, env=env, timeout=60)
    assert out.returncode == 1 and out.stderr.startswith(b"logd: ") and b"Traceback" not in out.stderr, out

