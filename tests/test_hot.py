"""The C accelerator (logd/_hot.c) against its pure-Python twins.

Every C function must give exactly what the Python code gives, on valid
input and on input that is cut off, corrupted or hostile: the callers rely
on C stopping where Python would go on to decide (see the module's header).
Each test runs the same input through both and compares.
"""

from __future__ import annotations

import os
import random
from array import array
from collections.abc import Callable
from typing import Any

import crc32c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import logd.hot
from logd.errors import ProtocolError
from logd.protocol import client as client_module
from logd.protocol import parser as parser_module
from logd.protocol import replica as replica_module
from logd.protocol.client import ClientProtocol, ReadRows, record_rows_py
from logd.protocol.commands import Msg, Read
from logd.protocol.parser import CommandParser
from logd.protocol.replica import ReplicaStreamParser, segment_marker
from logd.protocol.replies import Record
from logd.storage import record as record_module
from logd.storage.record import encode_batch_py

ext = logd.hot.ext
needs_ext = pytest.mark.skipif(ext is None, reason="pure-Python run (LOGD_NO_EXTENSIONS=1)")


def test_extension_is_built_unless_disabled() -> None:
    """An install that silently lost the C module would run several times slower."""
    if os.environ.get("LOGD_NO_EXTENSIONS", "") not in ("", "0"):
        assert ext is None
    else:
        assert ext is not None, "logd._hot was not built: is a C compiler installed?"


def both(module: Any, fn: Callable[[], Any]) -> tuple[Any, Any]:
    """``fn()`` with ``module.ext`` as built, then with it off; each result or exception."""
    out = []
    for value in (ext, None):
        saved = module.ext
        module.ext = value
        try:
            out.append(("ok", fn()))
        except Exception as exc:  # compared, not swallowed
            out.append(("raised", type(exc), str(exc)))
        finally:
            module.ext = saved
    return out[0], out[1]


# --- CRC and encoding ---------------------------------------------------------------

# Bodies around the size where C hands the CRC to the crc32c package: random
# bytes from a drawn seed, so hypothesis can replay a failure.
sized = st.tuples(st.sampled_from([0, 1, 7, 8, 9, 100, 4095, 4096, 4097, 70000]), st.integers(0, 2**32)).map(
    lambda t: random.Random(t[1]).randbytes(t[0])
)


@needs_ext
@given(st.binary(max_size=300) | sized)
def test_crc_matches_the_crc32c_package(data: bytes) -> None:
    assert ext is not None
    assert ext.crc32c(data) == crc32c.crc32c(data)
    assert ext.crc32c_table(data) == crc32c.crc32c(data)  # CPUs without a CRC instruction


first_ids = st.integers(1, 200) | st.sampled_from([9, 99, 999_999_999_999, 2**63 - 40]) | st.integers(1, 2**62)


@needs_ext
@given(first_ids, st.lists(st.binary(max_size=120) | sized, max_size=40), st.integers(0, 2**40))
def test_encode_batch_matches_python(first_id: int, bodies: list[bytes], base: int) -> None:
    assert ext is not None
    data, offsets = record_module.encode_batch(first_id, bodies, base)
    assert (data, offsets) == encode_batch_py(first_id, bodies, base)
    assert type(offsets) is array and offsets.typecode == "Q"


@needs_ext
def test_encode_batch_takes_other_buffers_through_python() -> None:
    bodies: list[Any] = [b"a", bytearray(b"b"), memoryview(b"c")]
    assert record_module.encode_batch(5, bodies, 0) == encode_batch_py(5, [b"a", b"b", b"c"], 0)


# --- the follower's record check -------------------------------------------------------

@st.composite
def replica_streams(draw: st.DrawFn) -> tuple[int, bytes]:
    """A REPLICATE reply: OK, records with markers between them, then damage of some kind."""
    first = draw(first_ids.filter(lambda i: i < 2**63 - 100))
    bodies = draw(st.lists(st.binary(max_size=60) | st.sampled_from([b"\r\n", b"+1 0 0\r\n", b"+EOF"]), max_size=25))
    data, offsets = encode_batch_py(first, bodies, 0)
    cuts = sorted(draw(st.lists(st.sampled_from(list(offsets)), max_size=3))) if bodies else []
    parts, prev = [b"OK\r\n"], 0
    for i, cut in enumerate(cuts):
        parts += [data[prev:cut], segment_marker(first + i) if i % 2 else b"+HEAD 5 4\r\n"]
        prev = cut
    parts.append(data[prev:])
    out = bytearray(b"".join(parts))
    damage = draw(st.sampled_from(["none", "flip", "cut", "insert", "end"]))
    if damage == "flip" and out:
        i = draw(st.integers(0, len(out) - 1))
        out[i] ^= 1 << draw(st.integers(0, 7))
    elif damage == "cut":
        del out[draw(st.integers(0, len(out))) :]
    elif damage == "insert":
        i = draw(st.integers(0, len(out)))
        out[i:i] = draw(st.sampled_from([b"+", b"0", b" ", b"\r\n", b"+%d 0 00000000\r\n\r\n" % first]))
    elif damage == "end":
        out += b"+EOF\r\n"
    return first, bytes(out)


def replay(first: int, data: bytes, cuts: list[int]) -> list[Any]:
    """Feed a stream to a follower's parser in pieces; what it returned, and its end state."""
    parser = ReplicaStreamParser(first)
    events: list[Any] = []
    prev = 0
    for cut in [*sorted(cuts), len(data)]:
        events += parser.feed(data[prev:cut])
        prev = cut
    # Chunks are compared by content: how records group into chunks may differ.
    flat: list[Any] = []
    for e in events:
        if isinstance(e, replica_module.Chunk):
            flat.append(("records", e.first_id, e.count, [bytes(e.data[o:]) for o in e.offsets]))
        else:
            flat.append(e)
    return [flat, parser.next_id]


# --- the client's READ replies ---------------------------------------------------------

def client_replay(first: int, data: bytes, cuts: list[int]) -> list[Any]:
    """A READ reply fed to the client's protocol in pieces: what came out, in order."""
    proto = ClientProtocol()
    proto.send(Read(first, 0))
    out: list[Any] = []
    prev = 0
    for cut in [*sorted(cuts), len(data)]:
        out += proto.receive_data(data[prev:cut])
        prev = cut
    return out


@needs_ext
@pytest.mark.parametrize(
    ("module", "replayer"), [(replica_module, replay), (client_module, client_replay)], ids=["follower", "client"]
)
@settings(max_examples=400)
@given(replica_streams(), st.data())
def test_record_checks_match_python(
    module: Any, replayer: Callable[[int, bytes, list[int]], list[Any]], stream: tuple[int, bytes], data: st.DataObject
) -> None:
    # The same REPLICATE replies go to the follower's parser and the client's
    # READ parser: records are the same; to a READ the marker lines are
    # errors, which tests that C hands those over too.
    first, raw = stream
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=4))
    fast, slow = both(module, lambda: replayer(first, raw, cuts))
    assert fast == slow


# --- READ replies as (id, body) rows (the sink's ReadRows) -----------------------------------

def rows_replay(first: int, data: bytes, cuts: list[int], command: type[Read] = ReadRows) -> list[Any]:
    """A READ reply fed in pieces to a client protocol that sent ``command``; Records as (id, body)."""
    proto = ClientProtocol()
    proto.send(command(first, 0))
    out: list[Any] = []
    prev = 0
    for cut in [*sorted(cuts), len(data)]:
        out += [(r.id, r.body) if isinstance(r, Record) else r for r in proto.receive_data(data[prev:cut])]
        prev = cut
    return out


@needs_ext
@settings(max_examples=400)
@given(replica_streams(), st.data())
def test_record_rows_matches_its_python_twin(stream: tuple[int, bytes], data: st.DataObject) -> None:
    # From right after the OK (the usual case) or from anywhere, damaged or not: the same stop, the same rows.
    first, raw = stream
    pos = data.draw(st.sampled_from([min(4, len(raw))]) | st.integers(0, len(raw)))
    fast: list[Any] = []
    slow: list[Any] = []
    assert ext.record_rows(raw, pos, first, fast) == record_rows_py(raw, pos, first, slow)
    assert fast == slow
    assert all(type(row) is tuple for row in fast)


@needs_ext
@settings(max_examples=300)
@given(replica_streams(), st.data())
def test_rows_stream_parses_the_same_with_and_without_c(stream: tuple[int, bytes], data: st.DataObject) -> None:
    first, raw = stream
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=4))
    fast, slow = both(client_module, lambda: rows_replay(first, raw, cuts))
    assert fast == slow


@settings(max_examples=300)
@given(replica_streams(), st.data())
def test_rows_stream_gives_what_the_record_stream_gives(stream: tuple[int, bytes], data: st.DataObject) -> None:
    # The same records, the same +EOF, the same CorruptRecordError (type and message) at the same place.
    first, raw = stream
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=4))

    def outcome(command: type[Read]) -> Any:
        try:
            return ("ok", rows_replay(first, raw, cuts, command))
        except Exception as exc:  # compared, not swallowed
            return ("raised", type(exc), str(exc))

    assert outcome(ReadRows) == outcome(Read)


@needs_ext
def test_record_rows_refuses_what_is_not_a_list() -> None:
    with pytest.raises(TypeError):
        ext.record_rows(b"", 0, 1, ())
    with pytest.raises(ValueError, match="pos out of range"):
        ext.record_rows(b"ab", 3, 1, [])


# --- MSG parsing --------------------------------------------------------------------------

@st.composite
def msg_streams(draw: st.DrawFn) -> bytes:
    """MSG commands, mostly well formed, some with bad lengths or terminators."""
    out = []
    for _ in range(draw(st.integers(1, 6))):
        bodies = draw(st.lists(st.binary(max_size=30) | st.sampled_from([b"\r", b"\n", b"MSG 1\r\n"]), max_size=8))
        lens = [b"%d" % len(b) for b in bodies]
        line = draw(
            st.sampled_from(
                [b" ".join(lens), b" ".join(lens) + b" ", b"0" + b" ".join(lens), b"  ".join(lens), b"1 x", b"9" * 19]
            )
        )
        out.append(b"MSG " + line + draw(st.sampled_from([b"\r\n", b"\n"])))
        for body in bodies:
            out += [body, draw(st.sampled_from([b"\r\n", b"\n", b"\r\n", b"\r\n", b"x", b"\r"]))]
        if draw(st.booleans()):
            out.append(b"PING\r\n")
    return b"".join(out)


def parse(data: bytes, cuts: list[int]) -> list[Any]:
    parser = CommandParser(max_message_bytes=50, max_batch=6, max_batch_bytes=120)
    out: list[Any] = []
    prev = 0
    for cut in [*sorted(cuts), len(data)]:
        out += [(type(x), str(x)) if isinstance(x, Exception) else x for x in parser.feed(data[prev:cut])]
        prev = cut
    return [out, parser.buffered]


@needs_ext
@settings(max_examples=400)
@given(msg_streams(), st.data())
def test_command_parser_matches_python(raw: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=4))
    fast, slow = both(parser_module, lambda: parse(raw, cuts))
    assert fast == slow


@needs_ext
@given(
    st.binary(max_size=60) | st.lists(st.sampled_from([b"0", b"7", b"12", b" ", b"x", b"-1"])).map(b"".join),
    st.integers(0, 20),
    st.integers(0, 6),
    st.integers(0, 40),
)
def test_msg_lengths_accepts_only_what_python_accepts(rest: bytes, max_message: int, max_batch: int,
                                                      max_bytes: int) -> None:
    assert ext is not None
    lens = ext.msg_lengths(rest, max_message, max_batch, max_bytes)
    if lens is not None:
        assert lens == CommandParser._lengths(rest)
        assert len(lens) <= max_batch and max(lens) <= max_message and sum(lens) <= max_bytes


@needs_ext
@pytest.mark.parametrize("digits", [17, 18, 19, 25])
def test_msg_lengths_takes_18_digits_at_most(digits: int) -> None:
    assert ext is not None
    line = b"1 " + b"9" * digits
    lens = ext.msg_lengths(line, 2**62, 10, 2**62)
    assert lens == ([1, int(b"9" * digits)] if digits <= 18 else None)
    python = CommandParser._lengths(line)
    if lens is None:
        # Python reports what C declined: a length no limit admits cannot be framed (protocol.md 3.3).
        assert type(python) is ProtocolError and python.fatal
    else:
        assert python == lens


@needs_ext
def test_rebase_adds_to_each_offset() -> None:
    assert ext is not None
    got = array("Q")
    got.frombytes(ext.rebase(array("Q", [0, 5, 2**40]), 7))
    assert list(got) == [7, 12, 2**40 + 7]
    with pytest.raises(ValueError):
        ext.rebase(b"123", 1)


@settings(max_examples=400)
@given(msg_streams(), st.integers(8, 4096))
def test_whole_msgs_matches_python_and_feed(raw: bytes, max_line: int) -> None:
    """The session's fast lane takes a chunk only when it is nothing but MSGs `feed` takes whole."""

    def whole() -> Any:
        return CommandParser(max_line_bytes=max_line, max_message_bytes=50, max_batch=6,
                             max_batch_bytes=120).whole_msgs(raw)

    fast, slow = both(parser_module, whole)
    assert fast == slow
    taken = fast[1]
    if taken is not None:
        parser = CommandParser(max_line_bytes=max_line, max_message_bytes=50, max_batch=6, max_batch_bytes=120)
        items = parser.feed(raw)
        assert [type(item) for item in items] == [Msg] * len(taken)
        assert [item.bodies for item in items] == taken
        assert parser.buffered == 0


@pytest.mark.parametrize(
    "raw",
    [b"MSG 3\r\nabc\r\n", b"MSG 3\r\nabc\r\nMSG 1 2\r\nx\r\nyz\n", b"MSG 0\r\n\r\n", b"MSG 007\nabcdefg\n"],
)
def test_whole_msgs_takes_the_common_shapes(raw: bytes) -> None:
    fast, slow = both(parser_module, lambda: CommandParser().whole_msgs(raw))
    assert fast == slow and fast[1] is not None


@pytest.mark.parametrize(
    "raw",
    [b"", b"PING\r\n", b"MSG 3\r\nabc\r\nPING\r\n", b"MSG 3\r\nab", b"MSG 3\r\nabcd\r\n", b"msg 3\r\nabc\r\n",
     b"MSG 3 \r\nabc\r\n", b"MSG 1  2\r\na\r\nbb\r\n", b"MSG " + b"9" * 19 + b"\r\n", b"MSG 3\r\nabc\r"],
)
def test_whole_msgs_leaves_everything_else_to_feed(raw: bytes) -> None:
    fast, slow = both(parser_module, lambda: CommandParser().whole_msgs(raw))
    assert fast == slow == ("ok", None)


def test_whole_msgs_takes_nothing_while_the_parser_holds_input() -> None:
    parser = CommandParser()
    parser.feed(b"MSG 3\r\na")
    assert parser.whole_msgs(b"MSG 3\r\nabc\r\n") is None
