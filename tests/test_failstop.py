"""Fail-stop (issue 13, finding 2): an unexpected exception in the commit path or a stream.

No real fault reaches these code paths any more (EMFILE and I/O errors are
handled where they happen: tests/e2e/test_failstop.py), so a bug is injected:
the log's method raises RuntimeError, in a `LogServer` run in this process
on a real socket and a real data dir.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from logd.config import Config
from logd.server import EXIT_FAIL_STOPPED, LogServer

WAIT_S = 30.0  # bounds a failure only: replies wait for fsyncs of a shared disk


def injected_bug(*args: object, **kwargs: object) -> None:
    raise RuntimeError("injected bug")


async def stats(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> dict[bytes, bytes]:
    writer.write(b"STATS\r\n")
    head = await asyncio.wait_for(reader.readline(), WAIT_S)
    assert head.startswith(b"OK ")
    lines = [await reader.readline() for _ in range(int(head[3:]))]
    return dict(line.rstrip(b"\r\n").split(b" ", 1) for line in lines)


@pytest.fixture
async def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    srv = LogServer(Config(data_dir=str(tmp_path / "d"), port=0, shutdown_timeout=2.0))
    host, port = await srv.start()
    yield srv, host, port
    if not srv.stopping:
        await srv.shutdown()


async def test_a_bug_in_the_writer_is_a_reported_fail_stop(server, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    srv, host, port = server
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"MSG 1\r\na\r\n")
    assert await asyncio.wait_for(reader.readline(), WAIT_S) == b"OK 1\r\n"
    srv.log.append = injected_bug
    writer.write(b"MSG 1\r\nb\r\n")
    # Before: the writer task died silently and this MSG (and every later one) waited forever.
    reason = b"append queue failed: RuntimeError('injected bug')"
    assert await asyncio.wait_for(reader.readline(), WAIT_S) == b"ERR UNAVAILABLE server failed: " + reason + b"\r\n"
    writer.write(b"MSG 1\r\nc\r\nPING\r\n")
    refused = b"ERR UNAVAILABLE server failed and accepts no writes: " + reason + b"\r\n"
    assert await asyncio.wait_for(reader.readline(), WAIT_S) == refused
    assert await asyncio.wait_for(reader.readline(), WAIT_S) == b"PONG\r\n"
    figures = await stats(reader, writer)
    assert figures[b"state"] == b"failed"
    assert figures[b"failure"] == reason.replace(b" ", b"_")
    writer.write(b"READ 1 1\r\n")  # what was committed before stays readable
    assert await asyncio.wait_for(reader.readexactly(len(b"OK\r\n+1 1 c1d04330\r\na\r\n+EOF\r\n")), WAIT_S) == (
        b"OK\r\n+1 1 c1d04330\r\na\r\n+EOF\r\n"
    )
    await asyncio.wait_for(srv.shutdown(), srv.config.shutdown_timeout + WAIT_S)  # a stop still stops
    assert srv.exit_code == EXIT_FAIL_STOPPED
    out = capsys.readouterr()
    logged = out.out + out.err
    assert "fail_stop" in logged and "Traceback" in logged and "RuntimeError: injected bug" in logged
    assert "server_failed" in logged
    writer.close()


async def test_a_bug_in_a_stream_is_an_err_reply_and_a_fail_stop(server) -> None:  # type: ignore[no-untyped-def]
    srv, host, port = server
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"MSG 1\r\na\r\n")
    assert await asyncio.wait_for(reader.readline(), WAIT_S) == b"OK 1\r\n"
    srv.log.span = injected_bug
    writer.write(b"READ 1 1\r\n")
    assert await asyncio.wait_for(reader.readline(), WAIT_S) == b"OK\r\n"
    line = await asyncio.wait_for(reader.readline(), WAIT_S)
    assert line == b"ERR UNAVAILABLE a stream failed: RuntimeError('injected bug')\r\n"
    writer.write(b"MSG 1\r\nb\r\n")
    refused = await asyncio.wait_for(reader.readline(), WAIT_S)
    assert refused.startswith(b"ERR UNAVAILABLE server failed and accepts no writes: a stream failed")
    assert (await stats(reader, writer))[b"state"] == b"failed"
    writer.close()
