"""The blocking client's connection set-up (TCP, TLS handshake, AUTH) runs under one deadline."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
# A trickling peer sends one handshake byte this often: far inside any per-read timeout.
TRICKLE_S = 0.02


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


def _trickling_peer(listener: socket.socket, ctx: ssl.SSLContext, stop: threading.Event, sent: list[int]) -> None:
    """Accept one client and answer its handshake as a real TLS server would, but one byte every TRICKLE_S."""
    try:
        conn, _addr = listener.accept()
        with conn:
            conn.setblocking(False)
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = ctx.wrap_bio(incoming, outgoing, server_side=True)
            backlog = b""
            while not stop.is_set():
                try:
                    tls.do_handshake()
                except ssl.SSLWantReadError:
                    pass
                backlog += outgoing.read()
                if backlog:
                    conn.sendall(backlog[:1])
                    backlog = backlog[1:]
                    sent[0] += 1
                try:
                    data = conn.recv(4096)
                    if not data:
                        return
                    incoming.write(data)
                except BlockingIOError:
                    pass
                stop.wait(TRICKLE_S)  # the hostile pace under test, not synchronisation
    except (OSError, ssl.SSLError):
        pass  # the client gave up and closed: what the test expects


@contextmanager
def _tls_peer(tmp_path: Path, peer: Callable[..., None], *args: object) -> Iterator[tuple[int, ssl.SSLContext]]:
    """Run ``peer(listener, server context, stop, *args)`` on a thread; yield its port and a client context."""
    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    stop = threading.Event()
    thread = threading.Thread(target=peer, args=(listener, server_ctx, stop, *args), daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], client_context(str(tmp_path / "ca.pem"))
    finally:
        stop.set()
        listener.close()
        thread.join(15)


@pytest.fixture
def slow_tls_peer(tmp_path: Path) -> Iterator[tuple[int, ssl.SSLContext]]:
    with _tls_peer(tmp_path, _slow_peer) as peer:
        yield peer


def test_connect_handshake_and_auth_share_one_deadline(slow_tls_peer: tuple[int, ssl.SSLContext]) -> None:
    # Review finding: each step got a fresh timeout, so a set-up could take N x the timeout.
    port, ctx = slow_tls_peer
    client = Client("127.0.0.1", port, timeout=None, connect_timeout=TIMEOUT_S, retry=NO_RETRY,
                    token="a-token", ssl_context=ctx)
    with pytest.raises((errors.TimeoutError, errors.ConnectionError)):
        client.ping()
    client.close()


def test_a_handshake_trickled_byte_by_byte_ends_at_the_deadline(tmp_path: Path) -> None:
    # Review finding: a per-read timeout would let a peer that sends a byte
    # every TRICKLE_S stretch the handshake without end; the deadline is a total.
    sent = [0]
    with _tls_peer(tmp_path, _trickling_peer, sent) as (port, ctx):
        client = Client("127.0.0.1", port, timeout=30 * TIMEOUT_S, connect_timeout=TIMEOUT_S, retry=NO_RETRY,
                        ssl_context=ctx)
        began = time.monotonic()
        with pytest.raises(errors.ConnectionError) as caught:
            client.ping()
        took = time.monotonic() - began
        client.close()
    assert str(caught.value) == f"TLS handshake with 127.0.0.1:{port} failed: timed out"
    assert sent[0] >= 5, "the peer was trickling the handshake all along"
    # Far under the 30 s a per-read timeout ran (the peer trickles that long), with room
    # for a loaded machine.
    assert took < 10 * TIMEOUT_S
