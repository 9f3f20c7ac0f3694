"""The on-disk log: segments of records with a dense id index. No network code."""

from .log import FsyncPolicy, Log, Record, Span

__all__ = ["FsyncPolicy", "Log", "Record", "Span"]
