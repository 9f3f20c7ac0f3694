"""The descriptor budget: raise RLIMIT_NOFILE, and fit --max-connections inside it.

A process out of descriptors fails wherever it next opens something: a
segment for a reader, a new segment at a roll, an accept. logd avoids it by
construction where it can: each connection costs one descriptor, logd's own
needs are bounded (`RESERVED_FDS`), and connections beyond the limit get
``ERR BUSY`` instead of taking the last descriptors.
"""

from __future__ import annotations

import resource

import structlog

from .errors import LogdError
from .storage.log import READ_HANDLES

log = structlog.get_logger("logd.server")

# What logd needs besides one descriptor per connection: stdio (3), the
# lock, the active segment and its index (3), the event loop, its signal and
# wake-up descriptors and the listener (about 6), one held in reserve to
# refuse connections when out of them (listener.py), a replica link, files
# opened briefly (a new segment, an index rebuild, directory fsyncs, the
# watermark), the shared segment read handles and the mapped closed indexes
# (each keeps a descriptor; at most READ_HANDLES of each), and some slack.
RESERVED_FDS = 24 + 2 * READ_HANDLES


class DescriptorLimitError(LogdError):
    """The descriptor limit leaves no room for any connection."""


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as far as the kernel allows); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # above the kernel's nr_open: keep what we have
    return soft


def fit_connections(max_connections: int) -> int:
    """The number of connections that fits the descriptor limit (raised first), at most ``max_connections``.

    Lowers it with a warning when needed; raises `DescriptorLimitError` when
    not even one connection fits.
    """
    limit = raise_nofile_limit()
    room = limit - RESERVED_FDS
    if max_connections <= room:
        return max_connections
    if room < 1:
        raise DescriptorLimitError(
            f"the descriptor limit (ulimit -n) is {limit}: logd needs {RESERVED_FDS} for itself plus one per "
            "connection; raise the limit"
        )
    log.warning(
        "max_connections_lowered",
        max_connections=room,
        requested=max_connections,
        nofile_limit=limit,
        reserved=RESERVED_FDS,
        hint="raise ulimit -n (the hard limit) to allow more",
    )
    return room
