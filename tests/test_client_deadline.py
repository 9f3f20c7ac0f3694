"""The blocking client's connection set-up (TCP, TLS handshake, AUTH) runs under one deadline."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from logd import errors
from logd.client import Client
from logd.client.commands import NO_RETRY
from logd.tls import client_context

TIMEOUT_S = 1.0
# A peer this slow at each of two steps is within the timeout per step, but not for both together.
STEP_DELAY_S = 0.6 * TIMEOUT_S


def _slow_peer(listener: socket.socket, ctx: ssl.SSLContext, stop: threading.Event) -> None:
    """Accept one client; delay the TLS handshake and the AUTH reply by STEP_DELAY_S each, then answer PING."""
    try:
        conn, _addr = listener.accept()
        with conn:
            conn.settimeout(10)
            stop.wait(STEP_DELAY_S)  # the slow step under test, not synchronisation
            with ctx.wrap_socket(conn, server_side=True) as tls:
                buf = b""
                while b"\r\n" not in buf:
                    buf += tls.recv(4096) or b"\r\n"
                stop.wait(STEP_DELAY_S)
                tls.sendall(b"OK\r\n")
                while b"\r\n" not in buf.split(b"\r\n", 1)[1]:
                    buf += tls.recv(4096) or b"\r\n"
                tls.sendall(b"PONG\r\n")
    except OSError:
        pass  # the client gave up first: what the test expects


@pytest.fixture
def slow_tls_peer(tmp_path: Path) -> Iterator[tuple[int, ssl.SSLContext]]:
    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    stop = threading.Event()
    thread = threading.Thread(target=_slow_peer, args=(listener, server_ctx, stop), daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], client_context(str(tmp_path / "ca.pem"))
    finally:
        stop.set()
        listener.close()
        thread.join(15)


def test_connect_handshake_and_auth_share_one_deadline(slow_tls_peer: tuple[int, ssl.SSLContext]) -> None:
    # Review finding: each step got a fresh timeout, so a set-up could take N x the timeout.
    port, ctx = slow_tls_peer
    client = Client("127.0.0.1", port, timeout=None, connect_timeout=TIMEOUT_S, retry=NO_RETRY,
                    token="a-token", ssl_context=ctx)
    with pytest.raises((errors.TimeoutError, errors.ConnectionError)):
        client.ping()
    client.close()
