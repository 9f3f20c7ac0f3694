"""`logd ping --local`, the Docker image's health check (issue 23): it reads the server's own LOGD_* settings,
so it works on a server with TLS, client certificates and an auth file, where a plain-TCP PING cannot."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from logd.config import Config, ConfigError
from logd.health import local_target

from .conftest import ServerProcess, new_token

LOGD = [sys.executable, "-m", "logd.cli"]


@dataclass
class Pems:
    server_cert: Path  # signed by the server CA, for 127.0.0.1
    server_key: Path
    client_ca: Path  # the CA a server with --tls-ca requires of its clients
    client_cert: Path  # signed by client_ca
    client_key: Path


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> Pems:
    d = tmp_path_factory.mktemp("health-certs")
    server_ca, client_ca = trustme.CA(), trustme.CA()
    server = server_ca.issue_cert("127.0.0.1")
    client = client_ca.issue_cert("probe.logd.test")
    server.cert_chain_pems[0].write_to_path(str(d / "server.pem"))
    server.private_key_pem.write_to_path(str(d / "server.key"))
    client_ca.cert_pem.write_to_path(str(d / "client-ca.pem"))
    client.cert_chain_pems[0].write_to_path(str(d / "client.pem"))
    client.private_key_pem.write_to_path(str(d / "client.key"))
    return Pems(d / "server.pem", d / "server.key", d / "client-ca.pem", d / "client.pem", d / "client.key")


def ping(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`logd ping ARGS` in a process whose LOGD_* variables are exactly ``env`` (as in a container)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LOGD_")}
    return subprocess.run([*LOGD, "ping", *args], capture_output=True, text=True, timeout=60, env={**clean, **env})


def server_env(srv: ServerProcess, **settings: str | Path) -> dict[str, str]:
    """The LOGD_* variables that describe ``srv``: its port and ``settings`` (tls_cert=... -> LOGD_TLS_CERT)."""
    return {"LOGD_PORT": str(srv.port), **{f"LOGD_{k.upper()}": str(v) for k, v in settings.items()}}


def test_local_pings_a_plain_server_at_its_port(start_server) -> None:  # type: ignore[no-untyped-def]
    srv = start_server()
    done = ping("--local", env=server_env(srv))
    assert (done.returncode, done.stdout) == (0, "PONG\n"), done.stderr


def test_local_speaks_tls_with_auth_and_client_certificates(start_server, pems: Pems,
                                                             tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    auth = tmp_path / "logd.auth"
    new_token(auth, "app", "write")
    tls = {"tls_cert": pems.server_cert, "tls_key": pems.server_key, "tls_ca": pems.client_ca}
    srv = start_server("--auth-file", str(auth), *(a for k, v in tls.items() for a in (f"--{k.replace('_', '-')}",
                                                                                       str(v))))
    env = server_env(srv, auth_file=auth, **tls)
    # A plain-TCP PING, what the image's health check sent before, gets no PONG from a TLS server.
    plain = ping("--url", f"logd://127.0.0.1:{srv.port}", "--timeout", "5", env={})
    assert plain.returncode == 1 and plain.stdout == ""
    # The server's own certificate is not signed by the client CA: the local check needs a client
    # certificate of its own, from the client-side variables, and says so with exit 1 without one.
    refused = ping("--local", "--timeout", "5", env=env)
    assert refused.returncode == 1 and refused.stdout == "" and refused.stderr.count("\n") == 1, refused.stderr
    assert f"requires one signed by {pems.client_ca}, and this check presented {pems.server_cert}" in refused.stderr
    with_client = {**env, "LOGD_CLIENT_TLS_CERT": str(pems.client_cert), "LOGD_CLIENT_TLS_KEY": str(pems.client_key)}
    done = ping("--local", env=with_client)
    assert (done.returncode, done.stdout) == (0, "PONG\n"), done.stderr
    # No token is sent: a wrong one in the environment changes nothing (PING needs none).
    done = ping("--local", env={**with_client, "LOGD_TOKEN": "not-a-token"})
    assert (done.returncode, done.stdout) == (0, "PONG\n"), done.stderr


def test_local_presents_the_servers_certificate_when_its_ca_signed_it(start_server, pems: Pems,
                                                                       tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # One CA for the server and its clients (as a cluster's): the server's own certificate does as the
    # health check's client certificate.
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key, ca_pem = tmp_path / "s.pem", tmp_path / "s.key", tmp_path / "ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_pem))
    srv = start_server("--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(ca_pem))
    done = ping("--local", env=server_env(srv, tls_cert=cert, tls_key=key, tls_ca=ca_pem))
    assert (done.returncode, done.stdout) == (0, "PONG\n"), done.stderr


def test_local_reads_the_config_file_as_serve_does(start_server, pems: Pems,
                                                    tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = start_server("--tls-cert", str(pems.server_cert), "--tls-key", str(pems.server_key))
    config = tmp_path / "logd.toml"
    config.write_text(f'port = {srv.port}\ntls-cert = "{pems.server_cert}"\ntls-key = "{pems.server_key}"\n')
    done = ping("--local", env={"LOGD_CONFIG": str(config)})
    assert (done.returncode, done.stdout) == (0, "PONG\n"), done.stderr


def test_local_failures_exit_1_with_one_line(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv = start_server()
    port = srv.port
    assert srv.terminate() == 0
    down = ping("--local", "--timeout", "5", env={"LOGD_PORT": str(port)})
    assert down.returncode == 1 and down.stdout == ""
    assert down.stderr.startswith("logd: cannot connect to 127.0.0.1") and down.stderr.count("\n") == 1
    # Docker reserves a health check's exit status 2: settings it cannot use are an unhealthy 1 too.
    for env, says in (({"LOGD_PORT": "0"}, "port is 0"), ({"LOGD_PORT": "many"}, "LOGD_PORT"),
                      ({"LOGD_CONFIG": str(tmp_path / "missing.toml")}, "does not exist")):
        done = ping("--local", env=env)
        assert done.returncode == 1 and says in done.stderr and done.stderr.count("\n") == 1, done.stderr
    both = ping("--local", "--url", "logd://127.0.0.1:1", env={})
    assert both.returncode == 2 and "--url and --local" in both.stderr


@pytest.mark.parametrize("listen, reached", [("0.0.0.0", "127.0.0.1"), ("::", "::1"), ("127.0.0.1", "127.0.0.1"),
                                             ("10.1.2.3", "10.1.2.3"), ("db1.internal", "db1.internal")])
def test_a_wildcard_address_is_reached_through_the_loopback(listen: str, reached: str) -> None:
    target = local_target(Config(host=listen, port=1774))
    assert (target.host, target.port, target.ssl_context) == (reached, 1774, None)


def test_port_0_cannot_be_checked() -> None:
    with pytest.raises(ConfigError, match="port is 0"):
        local_target(Config(port=0))
