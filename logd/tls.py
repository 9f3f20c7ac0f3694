"""TLS for logd (``--tls-cert/--tls-key/--tls-ca``, ``logds://``): contexts, and the server's handshake.

The server's own accept loop (`listener.Listener`) hands each accepted
socket to ``loop.connect_accepted_socket(ssl=...)`` rather than giving an SSL
context to ``create_server``: that way a failed handshake (a bad or missing
client certificate, a client speaking plain logd, a port scanner) reaches our
code, which logs one line with the peer's address, and no traceback. uvloop
itself only reports such failures in debug mode; and ``start_tls`` on a
connection ``create_server`` accepted would race uvloop, which starts reading
as soon as ``connection_made`` returns.
"""

from __future__ import annotations

import ssl

import structlog

log = structlog.get_logger("logd.tls")


def server_context(cert: str, key: str, ca: str | None = None) -> ssl.SSLContext:
    """TLS 1.2 or later with our certificate; with ``ca``, clients must present one it signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if ca is not None:
        ctx.load_verify_locations(ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """Verify the server against ``ca`` (else the system's trust store, or SSL_CERT_FILE);
    present ``cert``/``key`` when the server asks for a client certificate."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def unchecked_context(cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """TLS that does not check the server's certificate, presenting ``cert``/``key`` if given.

    Only for `logd ping --local` (a health check): it reaches the server on its
    own machine, where the certificate, which names the server's public host,
    could not be checked against 127.0.0.1, and it sends no secret (PING needs
    no token), so it has nothing a false server could take.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def describe(exc: BaseException) -> str:
    """A one-line reason for a failed handshake."""
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower()
    if isinstance(exc, TimeoutError):
        return "handshake timed out"
    return str(exc) or type(exc).__name__
