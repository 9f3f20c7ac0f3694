"""The Prometheus endpoint of a real server: scraped over HTTP, parsed with prometheus_client.parser."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from .conftest import ServerProcess, _readline_with_deadline, wait_for
from .helpers import addr, send_msgs

ROOT = Path(__file__).resolve().parents[2]
METRICS_LINE = re.compile(rb"logd metrics on (http://[\d.]+:\d+/metrics)")


def metrics_url(srv: ServerProcess) -> str:
    assert srv.proc is not None
    if not METRICS_LINE.search(srv.output):
        srv.output += _readline_with_deadline(srv.proc, 10)
    m = METRICS_LINE.search(srv.output)
    assert m, srv.output
    return m.group(1).decode()


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_metrics_move_with_appends_replicas_and_cursors(start_server) -> None:  # type: ignore[no-untyped-def]
    leader = start_server("--metrics-port", "0")
    url = metrics_url(leader)
    assert url.startswith("http://127.0.0.1:")  # loopback unless --metrics-host says otherwise
    before = scrape(url)
    assert value(before, "logd_appended_messages_total") == 0
    assert value(before, "logd_info", version="0.1.0", role="leader") == 1

    send_msgs(leader, [b"hello"] * 10)
    conn = leader.connect()
    conn.send(b"COMMIT app 4\r\nBOGUS\r\nCOMMIT app 2\r\n")
    assert conn.line() == b"OK"
    assert conn.line().startswith(b"ERR UNKNOWN_COMMAND")
    assert conn.line().startswith(b"ERR STALE")
    after = scrape(url)
    assert value(after, "logd_appended_messages_total") == 10
    assert value(after, "logd_appended_bytes_total") == 50
    assert value(after, "logd_head_id") == 10 and value(after, "logd_first_retained_id") == 1
    assert value(after, "logd_segments") == 1 and value(after, "logd_disk_bytes") > 50
    assert value(after, "logd_connections") == 1  # `conn`; the scrape is not a logd connection
    assert value(after, "logd_cursor_id", cursor="app") == 4
    assert value(after, "logd_cursor_lag_messages", cursor="app") == 6
    assert value(after, "logd_errors_total", code="UNKNOWN_COMMAND") >= 1
    assert value(after, "logd_errors_total", code="STALE") >= 1
    # Histograms: one fsync per round at least, and the rounds' messages sum to what was appended.
    fsyncs = value(after, "logd_fsync_duration_seconds_count")
    assert fsyncs >= 1 and value(after, "logd_fsync_duration_seconds_bucket", le="+Inf") == fsyncs
    assert value(after, "logd_fsync_duration_seconds_sum") > 0
    assert value(after, "logd_group_commit_messages_sum") == 10
    conn.close()
    follower = start_server("--replica-of", addr(leader), "--metrics-port", "0")
    follower_url = metrics_url(follower)
    peer = wait_for(lambda: [dict(k[1])["replica"] for k in scrape(url) if k[0] == "logd_replica_acked_id"],
                    30, "the replica in the metrics")[0]
    wait_for(lambda: value(scrape(url), "logd_replica_acked_id", replica=peer) == 10, 30, "the replica's ack")
    samples = scrape(url)
    assert value(samples, "logd_replicas") == 1
    assert value(samples, "logd_replica_lag_messages", replica=peer) == 0
    assert value(samples, "logd_replica_lag_seconds", replica=peer) == 0
    # Cursors reach the follower too (+CURSOR markers may trail the ACK of the records).
    on_follower = wait_for(lambda: (f := scrape(follower_url)) and (("logd_cursor_id", frozenset({("cursor", "app")}))
                                                                     in f) and f, 30, "the cursor on the follower")
    assert value(on_follower, "logd_cursor_id", cursor="app") == 4
    assert value(on_follower, "logd_info", version="0.1.0", role="follower") == 1
    assert value(on_follower, "logd_follower_lag_messages") == 0
    # Every metric the Grafana dashboard queries is one a leader or a follower exports.
    exported = {name for name, _labels in samples} | {name for name, _labels in on_follower}
    dashboard = json.loads((ROOT / "contrib" / "grafana-dashboard.json").read_text())
    queried = {m for panel in dashboard["panels"] for t in panel["targets"] for m in re.findall(r"logd_\w+", t["expr"])}
    assert queried and queried <= exported, queried - exported
    os.kill(follower.pid, signal.SIGSTOP)  # it stops acknowledging; the leader goes on
    try:
        send_msgs(leader, [b"more"] * 5)
        lagging = wait_for(lambda: (s := scrape(url)) and value(s, "logd_appended_messages_total") == 15 and s,
                           10, "the new appends")
        assert value(lagging, "logd_replica_lag_messages", replica=peer) == 5
    finally:
        os.kill(follower.pid, signal.SIGCONT)
    wait_for(lambda: value(scrape(url), "logd_replica_lag_messages", replica=peer) == 0, 30, "the replica again")


def test_metrics_are_off_by_default(server: ServerProcess) -> None:
    conn = server.connect()
    conn.send(b"PING\r\n")
    assert conn.line() == b"PONG"  # serve() prints the metrics line, if any, before it answers anything
    conn.close()
    assert server.proc is not None and server.proc.stdout is not None
    readable, _, _ = select.select([server.proc.stdout], [], [], 0)
    assert not readable and b"metrics" not in server.output  # no "logd metrics on ..." line
