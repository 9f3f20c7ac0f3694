"""Prometheus metrics (``--metrics-port``): collected from the server's own counters at scrape time.

Nothing is counted for the metrics on the append path: a scrape reads the
counters the server keeps anyway (those behind STATS) plus two histograms
observed once per fsync and once per group-commit round. The HTTP endpoint
is prometheus_client's, on its own thread; `LogdCollector` asks the event
loop for a `snapshot` (the server's state is only read on the loop thread)
and turns it into metric families.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from . import __version__
from .protocol.replies import ERRORS_SENT

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from .server import LogServer

log = structlog.get_logger("logd.metrics")

SNAPSHOT_TIMEOUT_S = 5.0  # a scrape waits this long for the event loop


@dataclass
class Snapshot:
    """The figures of one scrape, read on the event loop thread."""

    role: str
    values: dict[str, float]
    fsync: tuple[list[tuple[float, int]], float, int]
    rounds: tuple[list[tuple[float, int]], float, int]
    errors: dict[str, int]
    replicas: list[tuple[str, int, int, float]] = field(default_factory=list)  # name, acked, lag ids, lag s
    cursors: list[tuple[str, int, int]] = field(default_factory=list)  # name, id, lag


def snapshot(server: LogServer) -> Snapshot:
    """Read every figure the metrics show (call on the event loop thread)."""
    lg = server.log
    queue = server.queue
    head = server.visible_head()
    role = "follower" if server.follower is not None else "readonly" if server.read_only else "leader"
    values: dict[str, float] = {
        "appended_messages": queue.appended_messages,
        "appended_bytes": queue.appended_bytes,
        "fsyncs": queue.fsyncs,
        "connections": len(server.connections),
        "tails": len(server.streams) - len(server.replica_streams),
        "replicas": len(server.replica_streams),
        "head": head,
        "log_head": lg.head,
        "first": lg.first,
        "segments": lg.segment_count,
        "disk_bytes": lg.size_bytes,
        "input_bytes": server.budgets.input_used + queue.pending_bytes,
        "output_bytes": server.budgets.output_used,
        "uptime": time.monotonic() - server.started,
        "failed": 1 if server.failure is not None else 0,
    }
    snap = Snapshot(role, values, queue.fsync_seconds.snapshot(), queue.round_messages.snapshot(), dict(ERRORS_SENT))
    replication = server.replication
    for stream, acked in replication.acked.items():
        snap.replicas.append((stream.name, acked, max(0, replication.head - acked), replication.lag_seconds(acked)))
    if server.follower is not None:
        figures = server.follower.stats()
        values["follower_lag_messages"] = float(figures["lag_messages"])  # type: ignore[arg-type]
        values["follower_lag_seconds"] = float(figures["lag_s"])  # type: ignore[arg-type]
    for name, id in server.cursors.store.items().items():
        snap.cursors.append((name, id, max(0, head - id)))
    return snap


class LogdCollector(Collector):
    """A custom collector: every metric is built from a `Snapshot` at scrape time."""

    def __init__(self, server: LogServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop

    def _snapshot(self) -> Snapshot:
        future: concurrent.futures.Future[Snapshot] = concurrent.futures.Future()

        def take() -> None:
            try:
                future.set_result(snapshot(self.server))
            except BaseException as exc:  # reported to the scraping thread
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(take)
        return future.result(SNAPSHOT_TIMEOUT_S)

    def collect(self) -> Iterator[Any]:
        snap = self._snapshot()
        v = snap.values
        info = GaugeMetricFamily("logd_info", "This server's version and role (always 1).", labels=["version", "role"])
        info.add_metric([__version__, snap.role], 1)
        yield info
        counters = (
            ("logd_appended_messages_total", "Messages appended (committed) since start.", "appended_messages"),
            ("logd_appended_bytes_total", "Message body bytes appended (committed) since start.", "appended_bytes"),
            ("logd_fsyncs_total", "fsync calls of the log since start.", "fsyncs"),
        )
        for name, doc, key in counters:
            yield CounterMetricFamily(name, doc, value=v[key])
        gauges = (
            ("logd_connections", "Open client connections.", "connections"),
            ("logd_tails", "READ streams running (tails and bounded reads).", "tails"),
            ("logd_replicas", "REPLICATE streams running (connected followers).", "replicas"),
            ("logd_head_id", "The id readers may see up to (HEAD).", "head"),
            ("logd_commit_id", "The commit point: the last id durable here.", "log_head"),
            ("logd_first_retained_id", "The oldest id retention has kept.", "first"),
            ("logd_segments", "Segment files on disk.", "segments"),
            ("logd_disk_bytes", "Bytes of segment files on disk.", "disk_bytes"),
            ("logd_buffered_input_bytes", "Input held for all connections (server input budget in use).",
             "input_bytes"),
            ("logd_buffered_output_bytes", "Output not yet sent (server output budget in use).", "output_bytes"),
            ("logd_uptime_seconds", "Seconds since the server started.", "uptime"),
            ("logd_failed", "1 once the server has failed and accepts no writes.", "failed"),
        )
        for name, doc, key in gauges:
            yield GaugeMetricFamily(name, doc, value=v[key])
        yield _histogram("logd_fsync_duration_seconds", "Duration of each fsync of the log.", snap.fsync)
        yield _histogram("logd_group_commit_messages", "Messages per group-commit round.", snap.rounds)
        errors = CounterMetricFamily("logd_errors_total", "ERR replies sent, by error code.", labels=["code"])
        for code, n in sorted(snap.errors.items()):
            errors.add_metric([code], n)
        yield errors
        acked = GaugeMetricFamily("logd_replica_acked_id", "Highest id each replica acknowledged.",
                                  labels=["replica"])
        lag_ids = GaugeMetricFamily("logd_replica_lag_messages", "Messages each replica lacks of the commit point.",
                                    labels=["replica"])
        lag_s = GaugeMetricFamily("logd_replica_lag_seconds",
                                  "Seconds since the first id each replica lacks was committed (0: caught up).",
                                  labels=["replica"])
        for name, ack, behind, seconds in snap.replicas:
            acked.add_metric([name], ack)
            lag_ids.add_metric([name], behind)
            lag_s.add_metric([name], seconds)
        yield from (acked, lag_ids, lag_s)
        if "follower_lag_messages" in v:
            yield GaugeMetricFamily("logd_follower_lag_messages", "On a follower: messages behind its leader.",
                                    value=v["follower_lag_messages"])
            yield GaugeMetricFamily("logd_follower_lag_seconds", "On a follower: seconds since it was caught up.",
                                    value=v["follower_lag_seconds"])
        cursor_id = GaugeMetricFamily("logd_cursor_id", "Each named cursor's id.", labels=["cursor"])
        cursor_lag = GaugeMetricFamily("logd_cursor_lag_messages", "Messages between each cursor and the head.",
                                       labels=["cursor"])
        for name, id, behind in snap.cursors:
            cursor_id.add_metric([name], id)
            cursor_lag.add_metric([name], behind)
        yield from (cursor_id, cursor_lag)


def _histogram(name: str, doc: str, data: tuple[list[tuple[float, int]], float, int]) -> HistogramMetricFamily:
    cumulative, total, _count = data
    buckets = [("+Inf" if bound == float("inf") else repr(float(bound)), n) for bound, n in cumulative]
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)


class MetricsEndpoint:
    """The ``/metrics`` HTTP endpoint on its own thread (prometheus_client's server)."""

    def __init__(self, server: LogServer, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(LogdCollector(server, asyncio.get_running_loop()))
        self._httpd: WSGIServer
        self._httpd, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.address: tuple[str, int] = (host, self._httpd.server_port)
        log.info("metrics_listening", host=host, port=self.address[1])

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
