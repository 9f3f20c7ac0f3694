"""``--min-replicas`` as a cluster setting: kept by followers, applied when one is promoted.

A leader's durability setting must survive a failover: a follower started
without ``--min-replicas`` (as the runbook's followers are) would otherwise
become an asynchronous leader and acknowledge writes no replica holds. So a
follower saves what its leader runs with (told in the REPLICATE handshake,
protocol.md 3.4) in its data dir (``CLUSTER``), and runs with it once
promoted and after any restart.
"""

from __future__ import annotations

import structlog

from .. import defaults
from ..errors import UnavailableError
from ..storage import cluster

log = structlog.get_logger("logd.replication")

NAME = "min_replicas"


class MinReplicas:
    """Which ``--min-replicas`` this server runs with (or would, once promoted), and where it came from.

    ``source`` is what STATS shows as ``min_replicas_from``:

    - ``promote``: given to ACCEPT (``logd promote --min-replicas N``), saved;
    - ``config``: this server's flag, ``LOGD_MIN_REPLICAS`` or config file;
    - ``leader``: what its leader runs with, saved when it last followed one;
    - ``default``: none of these, 0 (asynchronous).

    An operator's word wins over what a leader said: ``config`` over a saved
    value at start, ``promote`` over everything at promotion. A value told by
    the leader replaces a saved one (the leader's is the cluster's current
    setting) but not a configured one.
    """

    def __init__(self, directory: str, configured: int | None) -> None:
        self.directory = directory
        self._saved = cluster.load(directory)
        saved = self._saved.get(NAME)
        if configured is not None:
            self.value, self.source = configured, "config"
        elif saved is not None:
            self.value, self.source = saved.value, saved.source
        else:
            self.value, self.source = defaults.MIN_REPLICAS, "default"

    def told_by_leader(self, n: int, leader: str) -> None:
        """The leader runs with ``--min-replicas n``: keep it for a promotion (durably, if it changed)."""
        if self.source != "config" and (self.value, self.source) != (n, "leader"):
            log.info("min_replicas_from_leader", min_replicas=n, leader=leader, was=self.value)
            self.value, self.source = n, "leader"
        try:
            self._save(n, "leader")
        except OSError as exc:  # kept in memory: it still applies if this process is promoted
            log.warning("cluster_setting_not_saved", setting=NAME, error=str(exc))

    def promoted(self, override: int | None) -> int:
        """ACCEPT: the value to run with from now on; an override is saved before it applies."""
        if override is not None:
            try:
                self._save(override, "promote")
            except OSError as exc:
                raise UnavailableError(f"cannot record min_replicas {override}: {exc}") from None
            self.value, self.source = override, "promote"
        return self.value

    def _save(self, n: int, source: str) -> None:
        if self._saved.get(NAME) == cluster.Saved(n, source):
            return
        settings = {**self._saved, NAME: cluster.Saved(n, source)}
        cluster.save(self.directory, settings)
        self._saved = settings

    def stats(self) -> dict[str, object]:
        return {"min_replicas": self.value, "min_replicas_from": self.source}
