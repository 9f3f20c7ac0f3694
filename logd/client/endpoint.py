"""Where and how a client connects: ``logd://[:TOKEN@]host[:port]`` or ``logds://...`` (TLS).

An `Endpoint` is the parsed URL plus what the caller added (``token=``, an
SSL context). Its token never appears in its repr or in an error message.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from ..protocol import DEFAULT_PORT
from ..url import split_url


@dataclass(frozen=True)
class Endpoint:
    """A server address, whether to use TLS (with which context) and the token to AUTH with."""

    host: str
    port: int = DEFAULT_PORT
    tls: ssl.SSLContext | None = None
    token: str | None = field(default=None, repr=False)

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def url(self) -> str:
        """The URL without the token."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'logds' if self.tls else 'logd'}://{host}:{self.port}"


def endpoint(url: str, *, token: str | None = None, ssl_context: ssl.SSLContext | None = None) -> Endpoint:
    """The endpoint for ``url``: ``token`` wins over the URL's; ``ssl_context`` turns TLS on
    (and is used for ``logds://``; without it, the system's trust store verifies the server)."""
    host, port, tls, url_token = split_url(url)
    ctx = ssl_context
    if ctx is None and tls:
        from ..tls import client_context

        ctx = client_context()
    return Endpoint(host, port, ctx, token if token is not None else url_token)
