"""Replication: the follower loop and the leader's replica bookkeeping.

A follower (``logd serve --replica-of HOST:PORT``) sends ``REPLICATE <start>
<prev_crc>`` and appends what it receives, byte for byte, to its own log:
each received chunk is parsed in one pass by `protocol.replica` (framing,
id continuity, CRC per record), written with one `Log.append_encoded` per segment, committed with one
fsync, and acknowledged with one ``ACK <id>``. It starts segments only where
the leader's ``+SEG`` markers say, so closed segments are byte-identical on
both (protocol.md section 3.4).

The leader keeps a `ReplicaSet`: every replica's acknowledged id, the high
watermark (the highest id held by ``min_replicas`` replicas) and the MSG
replies waiting for it.
"""

from .follower import EXIT_REPLICATION_FAILED, Follower, LinkLost, ReplicationFailed
from .leader import ReplicaSet

__all__ = ["EXIT_REPLICATION_FAILED", "Follower", "LinkLost", "ReplicaSet", "ReplicationFailed"]
