"""The name a follower gives itself in REPLICATE: the address it listens on (protocol.md 3.4).

The leader shows each replica under this name in STATS and the metrics, so
a follower keeps one series across reconnects and restarts, and two
followers on one host are told apart (their connections' addresses are
ephemeral ports that change with every connection).
"""

from __future__ import annotations

import ipaddress

from ..protocol.commands import valid_address


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def replica_address(advertise: str | None, listening: tuple[str, int], outgoing_ip: str | None) -> str | None:
    """The ``HOST:PORT`` a follower names itself by, or None (the leader then uses the connection's address).

    ``--advertise`` if given. Otherwise the address this server listens on,
    unless that is a wildcard (``0.0.0.0``, ``::``) or loopback: those say
    nothing to the leader, and two hosts could both listen on
    ``127.0.0.1:1774``. Then the address its connection to the leader goes
    out from, with the port it listens on: the same on every reconnect.
    """
    if advertise:
        return advertise
    host, port = listening
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None and not ip.is_unspecified and not ip.is_loopback:
        return host_port(host, port)
    if outgoing_ip is None:
        return None
    name = host_port(outgoing_ip, port)
    return name if valid_address(name) else None  # e.g. an IPv6 address with a zone (%eth0)
