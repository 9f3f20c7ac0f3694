"""LogServer's figures: STATS is computed from counters, never by walking connections or streams."""

from __future__ import annotations

from pathlib import Path

from logd.config import Config
from logd.server import LogServer


class NoWalking(set):  # type: ignore[type-arg]
    """A set that may be counted and changed, but not iterated."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        raise AssertionError("STATS walked every connection or stream")


def test_stats_counts_without_walking_connections_or_streams(tmp_path: Path) -> None:
    server = LogServer(Config(data_dir=str(tmp_path / "data")))
    try:
        server.connections = NoWalking(object() for _ in range(5000))  # type: ignore[assignment]
        server.streams = NoWalking(object() for _ in range(300))  # type: ignore[assignment]
        figures = server.stats()
        assert figures["connections"] == 5000
        assert figures["tails"] == 300
        assert figures["state"] == "ok"
    finally:
        server.log.close()
