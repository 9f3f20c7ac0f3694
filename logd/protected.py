"""Protected mode (protocol.md 3.7): refuse to start a server whose ports anyone could use unasked.

Checked by ``logd serve`` before anything is opened, so a refused start touches
no file. The log's port is protected by tokens (``--auth-file``); the metrics
endpoint has no authentication at all, so no auth file makes it safe to expose:
off loopback it needs its own opt-in, ``--metrics-public``.
"""

from __future__ import annotations

from .auth import is_loopback
from .config import Config


def refusals(config: Config) -> list[str]:
    """Why ``config`` must not start (one sentence per open port), or an empty list."""
    found = []
    if not config.auth_file and not config.insecure and not is_loopback(config.host):
        # As Redis's protected mode: an open port with no authentication is taken over.
        found.append(
            f"refusing to listen on {config.host!r} without authentication: anyone who can reach it could "
            "read, write, demote or copy the log. Give --auth-file FILE (create it with `logd token add`), "
            "listen on 127.0.0.1, or pass --insecure if you mean it.")
    if config.metrics_port is not None and not config.metrics_public and not is_loopback(config.metrics_host):
        found.append(
            f"refusing to serve metrics on {config.metrics_host!r}: the metrics endpoint has no authentication "
            "(--auth-file does not cover it), so anyone who can reach it reads the server's figures: cursor "
            "names, replica addresses, traffic. Keep --metrics-host on 127.0.0.1 and scrape through a proxy "
            "or a tunnel, or pass --metrics-public if you mean it.")
    return found
