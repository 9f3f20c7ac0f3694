"""systemd's notification protocol (sd_notify), without libsystemd.

Under ``Type=notify`` systemd passes the path of a unix datagram socket in
``NOTIFY_SOCKET``; the service sends ``READY=1`` there once it serves (and
``STOPPING=1`` when it begins to stop). A name starting with ``@`` is in the
abstract namespace (a leading NUL byte). Without the variable this does nothing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("logd.systemd")


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (``KEY=VALUE`` lines) to systemd; return whether it was sent.

    A failure is logged, never raised: a missing supervisor must not stop the server.
    """
    path = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        log.warning("notify_failed", socket=path, error=str(exc))
        return False
    return True
