"""``logd://[:TOKEN@]host[:port]`` and ``logds://...`` (TLS) URLs, parsed; pure, for clients, CLI and config.

A token in a URL never appears in an error message: `hide_token` masks it.
"""

from __future__ import annotations

from urllib.parse import SplitResult, unquote, urlsplit

from .protocol.commands import DEFAULT_PORT

SCHEMES = ("logd", "logds")


def hide_token(url: str) -> str:
    """``url`` with a password replaced by ``***``, for error messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, hostpart = rest.rpartition("@")
    if not at:
        return url
    return f"{scheme}{sep}***@{hostpart}" if userinfo else url


def split_url(url: str) -> tuple[str, int, bool, str | None]:
    """``logd[s]://[:TOKEN@]host[:port]`` (or ``host:port``) -> (host, port, tls, token)."""
    shown = hide_token(url)
    parts: SplitResult = urlsplit(url if "://" in url else "logd://" + url)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"not a logd URL (logd://host:port or logds://host:port): {shown!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"a logd URL has only a token, a host and a port: {shown!r}")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"bad port in {shown!r}") from None
    if parts.username:  # logd://TOKEN@host would connect unauthenticated without a word
        raise ValueError(f"the token goes after a colon (logd://:TOKEN@host): {shown!r}")
    token = unquote(parts.password) if parts.password else None
    return parts.hostname or "127.0.0.1", port, parts.scheme == "logds", token
