"""Prometheus metrics (``--metrics-port``): collected from the server's own counters at scrape time.

Nothing is counted for the metrics on the append path: a scrape reads the
counters the server keeps anyway (those behind STATS) plus two histograms
observed once per fsync and once per group-commit round. The page names at
most `LISTED_CURSORS` cursors (the most lagging), so its size does not grow
with the number of cursors.

The HTTP endpoint is served on the event loop, like the log's own port, and
within bounds of its own: at most ``--metrics-max-connections`` requests at
once (more are answered ``503`` and closed), each closed after
``--metrics-timeout`` seconds whatever it is doing (headers never ended, a
page never read), a request of at most `MAX_REQUEST_BYTES`. A scraper, or
anything else that connects to the port, can hold no thread and no more than
that many descriptors.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from . import __version__, defaults
from .listener import Listener, bind_all, resolve
from .protocol.replies import ERRORS_SENT

if TYPE_CHECKING:
    from .server import LogServer

log = structlog.get_logger("logd.metrics")

MAX_REQUEST_BYTES = 8192  # request line and headers; a scraper sends a few hundred bytes


@dataclass
class Snapshot:
    """The figures of one scrape, read on the event loop thread."""

    role: str
    values: dict[str, float]
    fsync: tuple[list[tuple[float, int]], float, int]
    rounds: tuple[list[tuple[float, int]], float, int]
    errors: dict[str, int]
    replicas: list[tuple[str, int, int, float]] = field(default_factory=list)  # name, acked, lag ids, lag s
    cursors: list[tuple[str, int, int]] = field(default_factory=list)  # name, id, lag: the most lagging


def snapshot(server: LogServer) -> Snapshot:
    """Read every figure the metrics show (on the event loop thread: the endpoint is served there)."""
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
    cursors = server.cursors.stats(head)
    values["cursors"] = float(cursors["cursors"])  # type: ignore[arg-type]
    values["cursors_max_lag"] = float(cursors["cursors_max_lag"])  # type: ignore[arg-type]
    for name, id in server.cursors.lagging():
        snap.cursors.append((name, id, max(0, head - id)))
    return snap


class LogdCollector(Collector):
    """A custom collector: every metric is built from a `Snapshot` at scrape time."""

    def __init__(self, server: LogServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Any]:
        snap = snapshot(self.server)
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
            ("logd_cursors", "Named cursors.", "cursors"),
            ("logd_cursor_lag_max_messages", "Messages between the most lagging cursor and the head.",
             "cursors_max_lag"),
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
        cursor_id = GaugeMetricFamily("logd_cursor_id", "The id of each of the most lagging named cursors.",
                                      labels=["cursor"])
        cursor_lag = GaugeMetricFamily("logd_cursor_lag_messages",
                                       "Messages between each of the most lagging cursors and the head.",
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
    """The ``/metrics`` HTTP endpoint, served on the event loop within its own bounds (module docstring)."""

    def __init__(self, server: LogServer, host: str, port: int,
                 max_connections: int = defaults.METRICS_MAX_CONNECTIONS,
                 timeout: float = defaults.METRICS_TIMEOUT) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(LogdCollector(server))
        self.max_connections = max_connections
        self.timeout = timeout
        self.requests: set[MetricsRequest] = set()  # open connections, each counted until it is lost
        self.refused = 0  # connections answered 503: max_connections were open
        self._listener = Listener(lambda: MetricsRequest(self), bind_all(resolve(host, port), backlog=128))
        self._listener.start()
        self.address: tuple[str, int] = (host, self._listener.address[1])
        log.info("metrics_listening", host=host, port=self.address[1])

    def page(self, headers: dict[bytes, bytes]) -> tuple[bytes, list[tuple[str, str]]]:
        """The metrics page as the request's Accept and Accept-Encoding headers ask, and its headers."""
        encoder, content_type = choose_encoder(headers.get(b"accept", b"").decode("latin-1"))
        body = encoder(self.registry)
        extra = [("Content-Type", content_type)]
        if b"gzip" in headers.get(b"accept-encoding", b""):
            body = gzip.compress(body, compresslevel=1)
            extra.append(("Content-Encoding", "gzip"))
        return body, extra

    def close(self) -> None:
        self._listener.close()
        for request in list(self.requests):
            request.abort()


class MetricsRequest(asyncio.Protocol):
    """One HTTP connection to the metrics port: one request, one answer, then close (HTTP/1.0 style)."""

    def __init__(self, endpoint: MetricsEndpoint) -> None:
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.answered = False
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr: asyncio.Transport = transport  # type: ignore[assignment]  # uvloop's quacks like one
        self.transport = tr
        endpoint = self.endpoint
        if len(endpoint.requests) >= endpoint.max_connections:
            endpoint.refused += 1
            self._answer("503 Service Unavailable", b"too many metrics requests at once\n")
            return
        endpoint.requests.add(self)
        self.deadline = asyncio.get_running_loop().call_later(endpoint.timeout, self.abort)

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            end = self.buf.find(b"\n\n")
        if end < 0:
            if len(self.buf) > MAX_REQUEST_BYTES:
                self._answer("431 Request Header Fields Too Large", b"request headers too large\n")
            return
        self._respond(bytes(self.buf[:end]))

    def eof_received(self) -> bool | None:
        if not self.answered:
            self._answer("400 Bad Request", b"request not complete\n")
        return None

    def _respond(self, head: bytes) -> None:
        request_line, *lines = head.replace(b"\r\n", b"\n").split(b"\n")
        parts = request_line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            self._answer("400 Bad Request", b"not an HTTP request\n")
            return
        method = parts[0]
        if method not in (b"GET", b"HEAD"):
            self._answer("405 Method Not Allowed", b"GET or HEAD only\n", [("Allow", "GET, HEAD")])
            return
        headers = {}
        for line in lines:
            name, sep, value = line.partition(b":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        try:
            body, extra = self.endpoint.page(headers)
        except Exception as exc:  # a figure that cannot be read: say so, keep serving
            log.error("metrics_failed", error=repr(exc))
            self._answer("500 Internal Server Error", b"cannot collect the metrics\n")
            return
        self._answer("200 OK", body, extra, send_body=method == b"GET")

    def _answer(self, status: str, body: bytes, headers: list[tuple[str, str]] | None = None,
                send_body: bool = True) -> None:
        """Write the response and close once it is sent (the deadline resets a peer that does not read)."""
        self.answered = True
        tr = self.transport
        if tr is None or tr.is_closing():
            return
        tr.pause_reading()
        lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in headers or [("Content-Type", "text/plain; charset=utf-8")]]
        tr.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body if send_body else b""))
        tr.close()

    def abort(self) -> None:
        """The deadline passed (or the server stops): reset the connection, whatever it was doing."""
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.endpoint.requests.discard(self)
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
