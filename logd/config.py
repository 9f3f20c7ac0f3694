"""One typed settings object for the server; the CLI builds it (flags > LOGD_* env > defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from .protocol import DEFAULT_PORT
from .storage.log import DEFAULT_SEGMENT_BYTES, FsyncPolicy


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); ValueError with a readable message."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class Config:
    """Everything `logd serve` can be told. Sizes in bytes, times in seconds unless named _ms."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    data_dir: str = "./logd-data"
    fsync: FsyncPolicy = FsyncPolicy("always")
    segment_bytes: int = DEFAULT_SEGMENT_BYTES
    retention_bytes: int | None = None
    retention_ms: int | None = None
    preallocate: bool | None = None  # zeros written ahead of the data; None: on with fsync=always
    max_message_bytes: int = 1 << 20
    max_line_bytes: int = 64 * 1024
    max_batch: int = 10_000
    max_batch_bytes: int = 64 << 20  # total body bytes of one MSG
    max_connections: int = 10_000
    idle_timeout: float | None = None  # seconds; None = never time out
    allow_shutdown: bool = False
    shutdown_timeout: float = 10.0  # seconds to let connections finish on stop
    log_format: str = "console"  # or "json"
    log_level: str = "info"
    # Memory budgets (protocol.md 3.6; Redis's client-output-buffer-limit and
    # Kafka's queued.max.request.bytes): over one, the server stops reading.
    # Per connection, commands received and not yet answered (waiting their
    # turn, or MSG bodies not yet acknowledged), and unsent output:
    conn_input_bytes: int = 64 << 20
    conn_output_bytes: int = 2 << 20
    # All connections together: partial MSGs, commands waiting, unsent output.
    server_input_bytes: int = 512 << 20
    server_output_bytes: int = 256 << 20
    tail_stall_timeout: float = 60.0  # a stream whose output does not drain this long is dropped
    replica_of: str | None = None
    min_replicas: int = 0
    replica_timeout: float = 5.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, not {self.port}")
        positive = ("segment_bytes", "max_message_bytes", "max_line_bytes", "max_batch", "max_batch_bytes",
                    "max_connections", "conn_input_bytes", "conn_output_bytes", "server_input_bytes",
                    "server_output_bytes")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be positive")
        if self.log_format not in ("console", "json"):
            raise ValueError("log-format must be console or json")
        if self.server_input_bytes < self.max_batch_bytes:
            raise ValueError("server-input-bytes must be at least max-batch-bytes (one MSG must fit)")
        if self.tail_stall_timeout <= 0:
            raise ValueError("tail-stall-timeout must be positive")
        if self.min_replicas < 0:
            raise ValueError("min-replicas must be 0 or more")
        if self.replica_timeout <= 0:
            raise ValueError("replica-timeout must be positive")
        if self.replica_of is not None:
            try:
                parse_address(self.replica_of)
            except ValueError as exc:
                raise ValueError(f"replica-of: {exc}") from None
