"""The client library against real `logd serve` processes: commands, errors, retries, tails,
producers and consumers. No mocks; every wait is for a condition with a deadline."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import logd
from logd import errors
from logd.client import NO_RETRY, Retry, parse_url
from logd.client.pending import PendingId, resolve_batch
from logd.protocol import Replicate

from .e2e.conftest import ServerProcess, wait_for
from .e2e.helpers import first_after_a_retention_pass, url_of

ROOT = Path(__file__).resolve().parent.parent
PATIENT = Retry(attempts=150, initial=0.02, maximum=0.5)  # rides out a server restart, even a slow one (~35 s)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the tests that only append and read (no SHUTDOWN allowed)."""
    srv = ServerProcess(tmp_path_factory.mktemp("shared") / "data", ["--fsync", "interval:1000"]).start()
    yield srv
    srv.terminate()


@pytest.fixture
def client(shared: ServerProcess) -> Iterator[logd.Client]:
    with logd.connect(url_of(shared)) as c:
        yield c


# --- URLs ----------------------------------------------------------------------------------


def test_parse_url() -> None:
    assert parse_url("logd://10.1.2.3:1800") == ("10.1.2.3", 1800)
    assert parse_url("logd://example.com") == ("example.com", 1774)
    assert parse_url("localhost:99") == ("localhost", 99)
    assert parse_url("logd://[::1]:5") == ("::1", 5)
    for bad in ("http://x:1", "logd://x:1/path", "logd://x:99999", "logd://x:1?q=1"):
        with pytest.raises(ValueError):
            parse_url(bad)


# --- every command, sync and async -----------------------------------------------------------


def test_sync_commands(client: logd.Client) -> None:
    assert client.ping() is True
    base = client.head()
    ids = client.append(b"one", "two \u00e9", b"\x00\r\n\xff")
    assert ids == [base + 1, base + 2, base + 3]
    assert client.append(b"") == [base + 4]
    assert client.head() == base + 4
    records = client.read(base + 1, 10)
    assert [(r.id, r.body) for r in records] == [
        (base + 1, b"one"), (base + 2, "two \u00e9".encode()), (base + 3, b"\x00\r\n\xff"), (base + 4, b""),
    ]
    assert all(isinstance(r, logd.Record) for r in records)
    assert client.read(base + 2, 1) == records[1:2]
    assert client.read(base + 5, 10) == []  # nothing there yet: no waiting
    stats = client.stats()
    assert int(stats["head"]) == base + 4 and stats["role"] == "leader" and "fsync_policy" in stats
    with pytest.raises(ValueError):
        client.append()
    with pytest.raises(ValueError):
        client.read(0, 1)


def test_read_wait_times_out_then_connection_is_fresh(client: logd.Client) -> None:
    base = client.append(b"a")[0]
    with pytest.raises(errors.TimeoutError):
        client.read(base, 3, wait=True, timeout=0.2)  # only 1 of the 3 exists: fails mid-reply
    # The half-read reply was dropped with its connection: replies stay in step.
    assert client.append(b"b") == [base + 1]
    assert [r.body for r in client.read(base, 2, wait=True, timeout=5)] == [b"a", b"b"]
    assert client.head() >= base + 1


def test_append_batches_pipelines_and_reports_ranges(client: logd.Client) -> None:
    base = client.head()
    batches = [[b"%d" % (i * 10 + j) for j in range(10)] for i in range(50)]
    ranges = list(client.append_batches(iter(batches), max_in_flight=4))
    assert ranges == [range(base + 1 + 10 * i, base + 11 + 10 * i) for i in range(50)]
    assert [r.body for r in client.read(base + 1, 500)] == [b"%d" % i for i in range(500)]


async def test_async_commands(shared: ServerProcess) -> None:
    async with logd.AsyncClient.from_url(url_of(shared)) as ac:
        assert await ac.ping() is True
        base = await ac.head()
        assert await ac.append(b"x", "y") == [base + 1, base + 2]
        assert [r.body for r in await ac.read(base + 1, 5)] == [b"x", b"y"]
        assert (await ac.stats())["head"] == str(base + 2)
        assert await ac.read(base + 3) == []
        ranges = [r async for r in ac.append_batches([[b"p"] * 3, [b"q"] * 2])]
        assert ranges == [range(base + 3, base + 6), range(base + 6, base + 8)]
        # Concurrent calls take turns on the one connection.
        heads = await asyncio.gather(*(ac.head() for _ in range(20)))
        assert set(heads) == {base + 7}
        with pytest.raises(errors.TimeoutError):
            await ac.read(base + 7, 5, wait=True, timeout=0.2)
        assert await ac.append(b"after") == [base + 8]


async def test_shutdown_sync_and_async(start_server: Callable[..., ServerProcess]) -> None:
    a, b = start_server("--allow-shutdown"), start_server("--allow-shutdown")
    with logd.connect(url_of(a)) as c:
        c.shutdown()
    async with logd.AsyncClient.from_url(url_of(b)) as ac:
        await ac.shutdown()
    assert a.proc is not None and b.proc is not None
    assert a.proc.wait(20) == 0 and b.proc.wait(20) == 0


async def test_async_cancel_mid_reply_drops_the_connection(shared: ServerProcess) -> None:
    async with logd.AsyncClient.from_url(url_of(shared)) as ac:
        base = (await ac.append(b"c"))[0]
        task = asyncio.create_task(ac.read(base, 2, wait=True))  # waits for a record not written
        await asyncio.sleep(0)
        while ac._conn is None or not ac._conn.proto.pending:  # the READ is on the wire
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ac._conn is None
        assert await ac.append(b"d") == [base + 1]
        assert [r.body for r in await ac.read(base, 2)] == [b"c", b"d"]


# --- tails -----------------------------------------------------------------------------------


def test_sync_tail_from_id_and_from_end(client: logd.Client) -> None:
    base = client.append(b"t1", b"t2")[-1] - 1
    with client.tail(base) as tail:
        assert [next(tail).body, next(tail).body] == [b"t1", b"t2"]
        assert tail.batch(10, timeout=0.05) == []
        client.append(b"t3")
        assert [r.body for r in tail.batch(10, timeout=5)] == [b"t3"]
        assert tail.position == base + 3
    with client.tail() as new_only:
        assert new_only.batch(timeout=0.05) == []  # connects; nothing older is sent
        last = client.append(b"fresh")[0]
        assert [(r.id, r.body) for r in new_only.batch(timeout=5)] == [(last, b"fresh")]


async def test_async_tail(shared: ServerProcess) -> None:
    async with logd.AsyncClient.from_url(url_of(shared)) as ac:
        first = (await ac.append(b"a1", b"a2"))[0]
        got: list[bytes] = []
        async with ac.tail(first) as tail:
            async for rec in tail:
                got.append(rec.body)
                if len(got) == 2:
                    break
            assert await tail.batch(timeout=0.05) == []
            await ac.append(b"a3")
            assert [r.body for r in await tail.batch(timeout=5)] == [b"a3"]
        assert got == [b"a1", b"a2"]


# --- every error the server can send ---------------------------------------------------------


def test_error_codes_map_to_classes() -> None:
    for code, cls in errors.ERROR_CLASSES.items():
        exc = errors.error_from_reply(code, "why")
        assert type(exc) is cls and exc.code == code
    assert errors.error_from_reply("READONLY", "10.0.0.1:1774 no").leader == "10.0.0.1:1774"  # type: ignore[attr-defined]


def test_too_large_readonly_denied_and_corrupt(start_server: Callable[..., ServerProcess]) -> None:
    srv = start_server("--max-message-bytes", "100", "--max-batch", "3")
    with logd.connect(url_of(srv)) as c:
        with pytest.raises(errors.TooLargeError):
            c.append(b"x" * 101)
        with pytest.raises(errors.TooLargeError):
            c.append(b"a", b"b", b"c", b"d")
        assert c.append(b"fits") == [1]  # the connection stays usable
        with pytest.raises(errors.DeniedError):
            c.shutdown()
        raw = srv.connect()
        raw.send(b"REFUSE\r\n")
        assert raw.line() == b"OK"
        with pytest.raises(errors.ReadOnlyError) as info:
            c.append(b"refused")
        assert info.value.leader == "-" and info.value.code == "READONLY"
        assert [r.body for r in c.read(1, 5)] == [b"fits"]  # reads still work
        raw.send(b"ACCEPT\r\n")
        assert raw.line() == b"OK"
        assert c.append(b"good", b"bad!", b"good") == [2, 3, 4]
        # Flip a byte of record 3's body on disk: the server sends stored bytes as they are.
        seg = srv.data_dir / f"{1:020d}.log"
        data = seg.read_bytes()
        at = data.index(b"bad!")
        with open(seg, "r+b") as f:
            f.seek(at)
            f.write(b"B")
        with pytest.raises(errors.CorruptRecordError) as bad:
            c.read(1, 4)
        assert bad.value.id == 3
        assert [r.id for r in c.read(1, 2)] == [1, 2]  # a fresh connection, records before it fine
        with c.tail(3) as tail, pytest.raises(errors.CorruptRecordError):
            next(tail)


def test_not_found_after_retention(start_server: Callable[..., ServerProcess]) -> None:
    srv = start_server("--segment-bytes", "1000", "--retention-bytes", "2000")
    with logd.connect(url_of(srv)) as c:
        for _ in range(10):
            c.append(*[b"z" * 100] * 3)
        first = first_after_a_retention_pass(srv)
        assert first > 1, "retention never deleted a segment"
        with pytest.raises(errors.NotFoundError) as info:
            c.read(1, 1)
        assert str(first) in str(info.value)
        assert c.read(first, 1)[0].id == first
        assert c.first() == first  # the one rule the CLI, Consumer and sink start "from the beginning" with
        with pytest.raises(errors.NotFoundError), c.tail(1) as tail:
            next(tail)

    async def first_async() -> int:
        async with logd.AsyncClient.from_url(url_of(srv)) as a:
            return await a.first()

    assert asyncio.run(first_async()) == first


def test_first_of_an_empty_log_is_1(start_server: Callable[..., ServerProcess]) -> None:
    with logd.connect(url_of(start_server())) as c:
        assert c.head() == 0
        assert c.first() == 1


def test_busy_is_retried_then_raised(start_server: Callable[..., ServerProcess]) -> None:
    srv = start_server("--max-connections", "1")
    hog = srv.connect()
    hog.send(b"PING\r\n")
    assert hog.line() == b"PONG"
    with logd.connect(url_of(srv), retry=Retry(attempts=3, initial=0.01)) as c:
        with pytest.raises(errors.BusyError):
            c.ping()
        hog.close()
        assert wait_for(lambda: _ping_or_none(c), what="a free connection slot")


def _ping_or_none(c: logd.Client) -> bool:
    try:
        return c.ping()
    except errors.BusyError:
        return False


async def test_busy_async(start_server: Callable[..., ServerProcess]) -> None:
    srv = start_server("--max-connections", "1")
    hog = srv.connect()
    hog.send(b"PING\r\n")
    assert hog.line() == b"PONG"
    async with logd.AsyncClient.from_url(url_of(srv), retry=Retry(attempts=2, initial=0.01)) as ac:
        with pytest.raises(errors.BusyError):
            await ac.head()


def test_unavailable_when_the_disk_is_full(tmp_path: Path) -> None:
    limit = 64 * 1024

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    srv = ServerProcess(tmp_path / "d", [], preexec=small_disk).start()
    try:
        with logd.connect(url_of(srv)) as c:
            with pytest.raises(errors.UnavailableError):
                for _ in range(200):
                    c.append(b"d" * 1000)
            assert c.ping()
    finally:
        srv.terminate()


def test_diverged_reply_is_raised_as_its_class(client: logd.Client) -> None:
    # REPLICATE is for replicas, not a client method; sent through the one execute
    # path it shows a server-closing error mapped to its class.
    from logd.client.commands import Call, records_of

    head = client.head()
    with pytest.raises(errors.DivergedError):
        client._execute(Call(Replicate(head + 5, 0x1234), records_of, stream=True), None)
    assert client.ping()


def test_connection_refused(tmp_path: Path) -> None:
    with logd.connect("logd://127.0.0.1:1", retry=Retry(attempts=2, initial=0.01)) as c:
        with pytest.raises(errors.ConnectionError, match="cannot connect to 127.0.0.1:1"):
            c.ping()


async def test_connection_refused_async() -> None:
    async with logd.AsyncClient.from_url("logd://127.0.0.1:1", retry=NO_RETRY) as ac:
        with pytest.raises(errors.ConnectionError):
            await ac.ping()


# --- reconnects ------------------------------------------------------------------------------


def test_idle_timeout_is_survived(start_server: Callable[..., ServerProcess]) -> None:
    srv = start_server("--idle-timeout", "1")
    with logd.connect(url_of(srv), retry=NO_RETRY) as c:
        assert c.append(b"1") == [1]
        wait_for(lambda: c._conn is not None and c._conn.stale(), what="the server to drop the idle connection")
        assert c.append(b"2") == [2]  # noticed before sending, so even a MSG goes out safely


def test_reconnect_after_restart(start_server: Callable[..., ServerProcess]) -> None:
    srv = start_server()
    with logd.connect(url_of(srv), retry=PATIENT) as c:
        assert c.append(b"before") == [1]
        srv.terminate()
        srv2 = start_server(data_dir=srv.data_dir, port=srv.port)
        assert c.head() == 1
        assert c.append(b"after") == [2]
        srv2.kill()  # no goodbye at all this time
        start_server(data_dir=srv.data_dir, port=srv.port)
        assert [r.body for r in c.read(1, 5)] == [b"before", b"after"]


async def test_reconnect_after_restart_async(start_server: Callable[..., ServerProcess]) -> None:
    srv = start_server()
    async with logd.AsyncClient.from_url(url_of(srv), retry=PATIENT) as ac:
        assert await ac.append(b"before") == [1]
        srv.terminate()
        start_server(data_dir=srv.data_dir, port=srv.port)
        assert await ac.head() == 1
        assert await ac.append(b"after") == [2]


def test_msg_is_not_retried_when_it_may_have_been_sent(start_server: Callable[..., ServerProcess]) -> None:
    """A lost connection fails an in-flight MSG at once, while an idempotent call is retried."""
    srv = start_server()
    retry_forever = Retry(attempts=None, initial=0.01, maximum=0.1)
    with logd.connect(url_of(srv), retry=retry_forever, timeout=30) as c, \
            logd.connect(url_of(srv), retry=retry_forever, timeout=30) as r:
        assert c.append(b"acked") == [1] and r.head() == 1
        assert srv.proc is not None
        os.kill(srv.pid, signal.SIGSTOP)  # the server accepts bytes but acts on none
        outcome: dict[str, Any] = {}

        def run(name: str, fn: Callable[[], Any]) -> threading.Thread:
            def target() -> None:
                try:
                    outcome[name] = fn()
                except Exception as exc:  # noqa: BLE001 - the test inspects it
                    outcome[name] = exc

            t = threading.Thread(target=target)
            t.start()
            return t

        ta = run("append", lambda: c.append(b"maybe"))
        th = run("head", r.head)
        wait_for(lambda: all(x._conn is not None and x._conn.proto.pending for x in (c, r)), what="both sent")
        srv.kill()
        start_server(data_dir=srv.data_dir, port=srv.port)
        ta.join(20)
        th.join(20)
        assert isinstance(outcome["append"], errors.ConnectionError)
        assert outcome["head"] == 1  # retried on the new server
        assert c.append(b"next") == [2]  # "maybe" never reached the log, and was not resent


# --- a tail across a server restart --------------------------------------------------------


def test_tail_resumes_after_restart(start_server: Callable[..., ServerProcess]) -> None:
    srv = start_server()
    url = url_of(srv)
    got: list[logd.Record] = []
    failure: list[BaseException] = []

    def follow() -> None:
        try:
            with logd.connect(url, retry=PATIENT) as c, c.tail(1) as tail:
                for rec in tail:
                    got.append(rec)
                    if len(got) == 10:
                        return
        except BaseException as exc:  # noqa: BLE001
            failure.append(exc)

    t = threading.Thread(target=follow)
    t.start()
    with logd.connect(url, retry=PATIENT) as c:
        c.append(*[b"m%d" % i for i in range(1, 6)])
        wait_for(lambda: len(got) == 5 or failure, what="the first five")
        srv.terminate()  # graceful: the server ends the tail with +EOF
        start_server(data_dir=srv.data_dir, port=srv.port)
        for i in range(6, 11):
            c.append(b"m%d" % i)
    t.join(20)
    assert not failure
    assert [(r.id, r.body) for r in got] == [(i, b"m%d" % i) for i in range(1, 11)]


async def test_async_tail_resumes_after_restart(start_server: Callable[..., ServerProcess]) -> None:
    srv = start_server()
    async with logd.AsyncClient.from_url(url_of(srv), retry=PATIENT) as ac:
        await ac.append(b"r1", b"r2")
        async with ac.tail(1) as tail:
            assert [r.id for r in await tail.batch(10, timeout=5)] == [1, 2]
            srv.kill()
            start_server(data_dir=srv.data_dir, port=srv.port)
            await ac.append(b"r3")
            got = await tail.batch(10, timeout=10)
            assert [(r.id, r.body) for r in got] == [(3, b"r3")]


# --- producers -------------------------------------------------------------------------------


def test_producer_threads_get_distinct_continuous_ids(client: logd.Client, shared: ServerProcess) -> None:
    per_thread, threads = 5000, 4
    results: dict[int, list[concurrent.futures.Future[int]]] = {}
    with logd.Producer(url_of(shared), linger_ms=2, max_batch_messages=700, max_in_flight=4) as prod:

        def send_all(t: int) -> None:
            results[t] = [prod.send(b"t%d-%d" % (t, i)) for i in range(per_thread)]

        workers = [threading.Thread(target=send_all, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        prod.flush()
        ids = {t: [f.result(timeout=10) for f in futs] for t, futs in results.items()}
    everything = sorted(i for v in ids.values() for i in v)
    assert everything == list(range(everything[0], everything[0] + per_thread * threads))
    for got in ids.values():
        assert got == sorted(got)  # one thread's messages keep their order
    bodies = {r.id: r.body for r in client.read(everything[0], per_thread * threads)}
    for t, got in ids.items():
        assert [bodies[i] for i in got] == [b"t%d-%d" % (t, i) for i in range(per_thread)]


async def test_async_producer_tasks_get_distinct_continuous_ids(shared: ServerProcess) -> None:
    per_task, tasks = 3000, 4
    async with logd.AsyncProducer(url_of(shared), linger_ms=1, max_batch_messages=500) as prod:

        async def send_all(t: int) -> list[int]:
            futs = [await prod.send(b"a%d-%d" % (t, i)) for i in range(per_task)]
            return list(await asyncio.gather(*futs))

        ids = await asyncio.gather(*(send_all(t) for t in range(tasks)))
    flat = sorted(i for got in ids for i in got)
    assert flat == list(range(flat[0], flat[0] + per_task * tasks))
    assert all(got == sorted(got) for got in ids)


def test_producer_errors_fail_their_batch_only(start_server: Callable[..., ServerProcess]) -> None:
    srv = start_server("--max-message-bytes", "10")
    with logd.Producer(url_of(srv), linger_ms=1) as prod:
        ok = prod.send(b"small")
        prod.flush()
        big = prod.send(b"x" * 11)
        prod.flush()
        after = prod.send(b"fine")
    assert ok.result() == 1 and after.result() == 2
    with pytest.raises(errors.TooLargeError):
        big.result()
    assert big.cancel() is False  # a message handed over cannot be taken back


async def test_producers_survive_the_server_closing_idle_connections(
    start_server: Callable[..., ServerProcess],
) -> None:
    srv = start_server("--idle-timeout", "1")
    with logd.Producer(url_of(srv), linger_ms=1, retry=NO_RETRY) as prod:
        assert prod.send(b"1").result(timeout=5) == 1
        wait_for(lambda: prod._conn is None or prod._conn.stale(), what="the idle connection to be closed")
        assert prod.send(b"2").result(timeout=5) == 2
    async with logd.AsyncProducer(url_of(srv), linger_ms=1, retry=NO_RETRY) as aprod:
        assert await (await aprod.send(b"3")) == 3
        deadline = time.monotonic() + 10
        while aprod._conn is not None and not aprod._conn.stale:
            assert time.monotonic() < deadline, "the idle connection was never closed"
            await asyncio.sleep(0.01)
        assert await (await aprod.send(b"4")) == 4


def test_producer_without_server_fails_futures() -> None:
    with logd.Producer("logd://127.0.0.1:1", retry=Retry(attempts=2, initial=0.01)) as prod:
        fut = prod.send(b"nowhere")
    with pytest.raises(errors.ConnectionError):
        fut.result(timeout=5)


def test_pending_id_result_waits_up_to_its_timeout() -> None:
    handle = PendingId()
    assert not handle.done()
    with pytest.raises(errors.TimeoutError):
        handle.result(timeout=0.05)
    assert not handle.done()
    with pytest.raises(errors.TimeoutError):
        handle.exception(timeout=0)
    resolve_batch([handle], 41)
    assert handle.done() and handle.result(timeout=0) == 41 and handle.exception() is None
    assert handle.cancel() is False and not handle.cancelled()


def test_pending_id_batch_gets_consecutive_ids_once() -> None:
    handles = [PendingId() for _ in range(5)]
    resolve_batch(handles[2:3], 100)  # resolved early: the batch leaves it alone
    resolve_batch(handles, 7)
    assert [h.result() for h in handles] == [7, 8, 100, 10, 11]


def test_pending_id_failure_is_raised_from_result_and_given_by_exception() -> None:
    handles = [PendingId() for _ in range(3)]
    failure = errors.TooLargeError("message too large")
    resolve_batch(handles, failure)
    for handle in handles:
        assert handle.done()
        with pytest.raises(errors.TooLargeError) as caught:
            handle.result(timeout=0)
        assert caught.value is failure
        assert handle.exception() is failure


def test_pending_id_callbacks_before_and_after_completion() -> None:
    handle = PendingId()
    calls: list[tuple[str, int, str]] = []

    def failing(h: PendingId) -> None:
        raise RuntimeError("a broken callback must not stop the others")

    handle.add_done_callback(lambda h: calls.append(("before", h.result(), threading.current_thread().name)))
    handle.add_done_callback(failing)
    handle.add_done_callback(lambda h: calls.append(("second", h.result(), threading.current_thread().name)))
    assert calls == []  # not resolved yet
    resolver = threading.Thread(target=resolve_batch, args=([handle], 9), name="resolver")
    resolver.start()
    resolver.join(10)
    assert calls == [("before", 9, "resolver"), ("second", 9, "resolver")]  # in order, in the resolving thread
    handle.add_done_callback(lambda h: calls.append(("after", h.result(), threading.current_thread().name)))
    assert calls[-1] == ("after", 9, threading.current_thread().name)  # at once, in the caller's thread
    resolve_batch([handle], 50)  # a second resolution changes nothing and calls nobody again
    assert handle.result() == 9 and len(calls) == 3


def test_pending_id_result_from_other_threads_while_batches_resolve() -> None:
    batches, per_batch, waiters = 200, 50, 8
    handles = [[PendingId() for _ in range(per_batch)] for _ in range(batches)]
    flat = [h for batch in handles for h in batch]
    got: dict[int, list[int]] = {}
    callback_ids: list[int] = []
    failures: list[BaseException] = []

    def wait_all(w: int) -> None:
        try:  # each waiter takes every waiters-th handle, most of them before they resolve
            got[w] = [flat[i].result(timeout=20) for i in range(w, len(flat), waiters)]
        except BaseException as exc:
            failures.append(exc)

    for h in flat[::7]:
        h.add_done_callback(lambda h: callback_ids.append(h.result()))
    threads = [threading.Thread(target=wait_all, args=(w,)) for w in range(waiters)]
    for t in threads:
        t.start()

    def resolve_all() -> None:
        for b, batch in enumerate(handles):
            resolve_batch(batch, 1 + b * per_batch)

    resolver = threading.Thread(target=resolve_all)
    resolver.start()
    for t in [resolver, *threads]:
        t.join(30)
        assert not t.is_alive()
    assert not failures
    for w in range(waiters):
        assert got[w] == list(range(1 + w, 1 + len(flat), waiters))
    assert sorted(callback_ids) == list(range(1, 1 + len(flat), 7))


def test_producer_handles_resolve_with_callbacks_and_timeouts(shared: ServerProcess) -> None:
    seen: list[int] = []
    with logd.Producer(url_of(shared), linger_ms=1, max_batch_messages=100) as prod:
        handles = [prod.send(b"h%d" % i) for i in range(1000)]
        for h in handles[:500]:
            h.add_done_callback(lambda h: seen.append(h.result()))
        ids = [h.result(timeout=10) for h in handles]
        for h in handles[500:]:
            h.add_done_callback(lambda h: seen.append(h.result()))
    assert ids == list(range(ids[0], ids[0] + 1000))
    assert sorted(seen) == ids and all(h.done() and h.exception() is None for h in handles)


# --- consumers and checkpoints --------------------------------------------------------------------


def test_file_checkpoint_is_atomic_and_only_moves_forward(tmp_path: Path) -> None:
    path = tmp_path / "ck"
    ck = logd.FileCheckpoint(path)
    assert ck.load() == 0
    ck.save(5)
    assert path.read_text() == "5\n" and not (tmp_path / "ck.tmp").exists()
    ck.save(5)  # the same id again: nothing to do
    with pytest.raises(ValueError, match="forward"):
        ck.save(4)
    assert logd.FileCheckpoint(path).load() == 5
    path.write_text("garbage")
    with pytest.raises(ValueError):
        logd.FileCheckpoint(path).load()


def test_consumer_batches_and_commits(client: logd.Client, shared: ServerProcess, tmp_path: Path) -> None:
    first = client.append(*[b"c%d" % i for i in range(25)])[0]
    ck = logd.FileCheckpoint(tmp_path / "ck")
    ck.save(first - 1)
    consumer = logd.Consumer(url_of(shared), ck, max_batch=10, follow=False)
    got: list[list[int]] = []
    for batch in consumer:
        got.append([r.id for r in batch])
        consumer.commit()
    head = client.head()
    flat = [i for b in got for i in b]
    assert flat == list(range(first, head + 1)) and max(map(len, got)) <= 10
    assert ck.load() == head
    assert list(logd.Consumer(url_of(shared), ck, follow=False)) == []  # caught up: nothing again


def test_consumer_killed_mid_batch_resumes_without_loss(start_server: Callable[..., ServerProcess],
                                                          tmp_path: Path) -> None:
    srv = start_server()
    n = 1000
    with logd.connect(url_of(srv)) as c:
        c.append(*[b"%d" % i for i in range(1, n + 1)])
    out, ck, marker = tmp_path / "processed", tmp_path / "ck", tmp_path / "mid-batch"
    child = textwrap.dedent(f"""
        import sys, logd
        consumer = logd.Consumer({url_of(srv)!r}, logd.FileCheckpoint({str(ck)!r}), max_batch=100, follow=False)
        with open({str(out)!r}, "a") as out:
            for k, batch in enumerate(consumer):
                for j, rec in enumerate(batch):
                    out.write(rec.body.decode() + "\\n")
                    out.flush()
                    if k >= 3 and j == len(batch) // 2:
                        open({str(marker)!r}, "w").close()
                        sys.stdin.read()  # block here, mid-batch, until killed
                consumer.commit()
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=ROOT, stdin=subprocess.PIPE)
    try:
        wait_for(marker.exists, what="the child to be mid-batch")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    committed = logd.FileCheckpoint(ck).load()
    assert 0 < committed < n
    consumer = logd.Consumer(url_of(srv), logd.FileCheckpoint(ck), max_batch=100, follow=False)
    with open(out, "a") as f:
        for batch in consumer:
            f.write("".join(r.body.decode() + "\n" for r in batch))
            f.flush()
            consumer.commit()
    processed = [int(x) for x in out.read_text().split()]
    assert set(processed) == set(range(1, n + 1))  # nothing lost
    assert all(i > committed for i in processed[committed:])  # only the uncommitted batch came twice
    assert logd.FileCheckpoint(ck).load() == n


def test_callback_checkpoint_in_the_same_transaction_is_exactly_once(
    client: logd.Client, shared: ServerProcess, tmp_path: Path
) -> None:
    first = client.append(*[b"%d" % i for i in range(40)])[0]
    db = sqlite3.connect(tmp_path / "app.db", isolation_level=None)
    db.executescript("CREATE TABLE items (id INTEGER PRIMARY KEY, body TEXT); CREATE TABLE ck (v INTEGER);")
    db.execute("INSERT INTO ck VALUES (?)", (first - 1,))

    def make() -> logd.Consumer:
        ck = logd.CallbackCheckpoint(
            load=lambda: db.execute("SELECT v FROM ck").fetchone()[0],
            save=lambda id: db.execute("UPDATE ck SET v = ?", (id,)),
        )
        return logd.Consumer(url_of(shared), ck, max_batch=15, follow=False)

    class Crash(Exception):
        pass

    consumer = make()
    with pytest.raises(Crash):
        for k, batch in enumerate(consumer):
            db.execute("BEGIN")
            try:
                db.executemany("INSERT INTO items VALUES (?, ?)", [(r.id, r.body.decode()) for r in batch])
                if k == 1:
                    raise Crash  # after half the work of batch 2, before its commit
                consumer.commit()
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
    consumer = make()
    for batch in consumer:
        db.execute("BEGIN")
        db.executemany("INSERT INTO items VALUES (?, ?)", [(r.id, r.body.decode()) for r in batch])
        consumer.commit()
        db.execute("COMMIT")
    head = client.head()
    rows = db.execute("SELECT id FROM items ORDER BY id").fetchall()
    assert [r[0] for r in rows] == list(range(first, head + 1))  # each exactly once
    assert db.execute("SELECT v FROM ck").fetchone()[0] == head
