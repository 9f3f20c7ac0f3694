"""The soak's clients (bench/soak.py), each in a process of its own, through logd's Python client.

Writers, the pinger and the scraper run until their ``stop`` event is set;
tails and consumers until the soak kills them (clients that exit while they
wait). Each keeps its counters in a small JSON file (`Counters`), rewritten
every 2 s and at a graceful stop, which the soak reads at the end.
"""

from __future__ import annotations

import json
import os
import random
import time
import urllib.request
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import logd

REPORT_S = 2.0
BODY_BYTES = 100


class Counters:
    """Named counts and the last errors of one client, saved to ``path`` now and then."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.values: dict[str, Any] = {"errors": 0, "last_errors": []}
        self._due = 0.0

    def add(self, name: str, n: int = 1) -> None:
        self.values[name] = self.values.get(name, 0) + n

    def error(self, exc: BaseException) -> None:
        self.values["errors"] += 1
        self.values["last_errors"] = [*self.values["last_errors"][-4:], repr(exc)[:200]]

    def save(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._due:
            return
        self._due = now + REPORT_S
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.values))
        os.replace(tmp, self.path)


def body(writer: int, n: int) -> bytes:
    """A 100-byte message that says who wrote it."""
    return (b"w%d-%d-" % (writer, n)).ljust(BODY_BYTES, b".")


def writer(url: str, index: int, rate: float, batch: int, churn: tuple[int, int], stop: Event, out: Path) -> None:
    """``rate`` messages/s in MSGs of ``batch``; reconnects after a random number of MSGs in ``churn``."""
    counters = Counters(out)
    rng = random.Random(index)
    interval = batch / rate
    client: logd.Client | None = None
    left = 0
    n = 0
    next_at = time.monotonic()
    while not stop.is_set():
        if client is None:
            client = logd.connect(url)
            left = rng.randint(*churn)
            counters.add("connects")
        bodies = [body(index, n + i) for i in range(batch)]
        try:
            ids = client.append(*bodies)
        except logd.LogdError as exc:  # nothing is retried: a MSG that may have arrived is never resent
            counters.error(exc)
            client.close()
            client = None
            continue
        if ids != list(range(ids[0], ids[0] + batch)):
            counters.add("bad_ids")
        n += batch
        counters.add("messages", batch)
        left -= 1
        if left == 0:
            client.close()
            client = None
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # pacing to the rate, not synchronisation
        elif delay < -1.0:
            next_at = time.monotonic()  # fell behind (a loaded machine): no burst to catch up
        counters.save()
    if client is not None:
        client.close()
    counters.save(force=True)


def tail(url: str, resume_s: float, out: Path) -> None:
    """Follow the log from id 1, checking every id follows the last, until killed; with ``resume_s``,
    close and resume at the last id + 1 that often (a new connection each time)."""
    counters = Counters(out)
    client = logd.connect(url)
    last = 0
    while True:
        t = client.tail(last + 1)
        counters.add("opens")
        until = time.monotonic() + resume_s if resume_s else float("inf")
        try:
            while time.monotonic() < until:
                for record in t.batch(1000, timeout=1.0):
                    if record.id != last + 1:
                        counters.add("gaps")
                    last = record.id
                    counters.add("records")
                counters.values["last_id"] = last
                counters.save()
        except logd.LogdError as exc:
            counters.error(exc)
            if isinstance(exc, logd.NotFoundError):  # retention went past it: start again at the oldest
                last = 0
        finally:
            t.close()


def consumer(url: str, name: str, out: Path) -> None:
    """A Consumer on the server cursor ``name``, until killed: batches, each committed."""
    counters = Counters(out)
    while True:
        cons = logd.Consumer(url, logd.ServerCursor(name, url))
        try:
            for batch in cons:
                counters.add("records", len(batch))
                cons.commit()
                counters.add("commits")
                counters.values["last_id"] = batch[-1].id
                counters.save()
        except logd.LogdError as exc:
            counters.error(exc)


def pinger(urls: list[str], per_s: float, stop: Event, out: Path) -> None:
    """``per_s`` short-lived connections a second, in turn to each server: PING, HEAD or STATS, then close."""
    counters = Counters(out)
    next_at = time.monotonic()
    i = 0
    while not stop.is_set():
        client = logd.connect(urls[i % len(urls)])
        try:
            kind = i % 3
            if kind == 0:
                client.ping()
            elif kind == 1:
                client.head()
            else:
                client.stats()
            counters.add(("ping", "head", "stats")[kind])
        except logd.LogdError as exc:
            counters.error(exc)
        finally:
            client.close()
        i += 1
        next_at += 1.0 / per_s
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        elif delay < -1.0:
            next_at = time.monotonic()
        counters.save()
    counters.save(force=True)


def scraper(metrics_urls: list[str], every_s: float, stop: Event, out: Path) -> None:
    """GET each /metrics every ``every_s``, as a Prometheus would."""
    counters = Counters(out)
    while not stop.is_set():
        for url in metrics_urls:
            try:
                with urllib.request.urlopen(url, timeout=10) as reply:
                    counters.add("bytes", len(reply.read()))
                counters.add("scrapes")
            except OSError as exc:  # TimeoutError included
                counters.error(exc)
        counters.save()
        stop.wait(every_s)
    counters.save(force=True)
