"""Where a health check finds the server it runs beside: `logd ping --local`.

A container's HEALTHCHECK (Dockerfile) or a local probe should not repeat the
server's settings, which could drift apart from them: it resolves the same
``LOGD_*`` variables and ``LOGD_CONFIG`` file as `logd serve` (`config.resolve`)
and turns them into an address and a TLS context. Pure: no sockets.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from .config import Config, ConfigError
from .tls import unchecked_context

# A wildcard listen address is reached through the loopback of its family.
LOOPBACK_OF = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


@dataclass(frozen=True)
class LocalTarget:
    """The server's address as seen from its own machine, and how to speak TLS to it (None: plain TCP)."""

    host: str
    port: int
    ssl_context: ssl.SSLContext | None
    hint: str = ""  # what to add to a failure's message: which client certificate was presented


def local_target(config: Config, client_cert: str | None = None, client_key: str | None = None) -> LocalTarget:
    """Where the server ``config`` describes listens, from its own machine.

    TLS when the server has a certificate, unchecked (`tls.unchecked_context`).
    When the server requires client certificates (``tls_ca``), the check
    presents ``client_cert``/``client_key`` if given, else the server's own
    certificate, which the server accepts if its CA signed it for client use
    too. ConfigError if the port is 0 (a free one, which only the server knows)
    or the TLS files cannot be loaded.
    """
    if config.port == 0:
        raise ConfigError("the server's port is 0 (any free one): a local check cannot know it; set LOGD_PORT")
    host = LOOPBACK_OF.get(config.host, config.host)
    if config.tls_cert is None:
        return LocalTarget(host, config.port, None)
    cert, key = client_cert, client_key
    if cert is None and config.tls_ca is not None:
        cert, key = config.tls_cert, config.tls_key
    try:
        ctx = unchecked_context(cert, key)
    except OSError as exc:  # ssl.SSLError included
        raise ConfigError(f"cannot load the client certificate {cert}: {exc}") from None
    hint = ""
    if config.tls_ca is not None:
        hint = (f" (if it refused the certificate: the server requires one signed by {config.tls_ca}, and this "
                f"check presented {cert}; LOGD_CLIENT_TLS_CERT and LOGD_CLIENT_TLS_KEY give it another)")
    return LocalTarget(host, config.port, ctx, hint)
