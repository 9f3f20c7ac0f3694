"""Record encoding and verification (protocol.md section 1)."""

from __future__ import annotations

import pytest
from crc32c import crc32c
from hypothesis import given
from hypothesis import strategies as st

from logd.storage.record import MAX_HEADER_BYTES, BadRecord, crc_of, decode_record, encode_batch, encode_record

HELLO = bytes.fromhex("2b 37 20 35 20 39 61 37 31 62 62 34 63 0d 0a 68 65 6c 6c 6f 0d 0a")
ids = st.integers(min_value=1, max_value=2**63 - 1)


def reason_of(buf: bytes, expect: int | None = 7, pos: int = 0) -> tuple[str, bool]:
    with pytest.raises(BadRecord) as info:
        decode_record(buf, pos, expect)
    return info.value.reason, info.value.truncated


def test_worked_example_from_the_spec() -> None:
    assert crc32c(b"hello") == 0x9A71BB4C == crc_of(b"hello")
    assert encode_record(7, b"hello") == HELLO
    rec = decode_record(HELLO, 0, 7)
    assert (rec.id, rec.body, rec.crc, rec.size) == (7, b"hello", 0x9A71BB4C, len(HELLO))


def test_empty_body_and_binary_body() -> None:
    assert encode_record(1, b"") == b"+1 0 00000000\r\n\r\n"
    body = b"\r\n\x00+2 3 \r\n\xff"
    rec = decode_record(encode_record(3, body), 0, 3)
    assert rec.body == body


def test_decode_at_a_position_and_without_expected_id() -> None:
    buf = b"junk" + encode_record(41, b"a") + encode_record(42, b"bc")
    first = decode_record(buf, 4, None)
    second = decode_record(buf, 4 + first.size, 42)
    assert (first.id, first.body, second.id, second.body) == (41, b"a", 42, b"bc")
    assert 4 + first.size + second.size == len(buf)


def test_decode_from_memoryview() -> None:
    buf = bytearray(b"xx" + HELLO)
    assert decode_record(memoryview(buf), 2, 7).body == b"hello"
    assert decode_record(buf, 2, 7).body == b"hello"


def test_encode_batch_matches_single_records() -> None:
    bodies = [b"a", b"", b"\r\n" * 40, bytes(range(256))]
    data, offsets = encode_batch(100, bodies, base_offset=1000)
    assert data == b"".join(encode_record(100 + k, b) for k, b in enumerate(bodies))
    assert offsets[0] == 1000
    for k, off in enumerate(offsets):
        rec = decode_record(data, off - 1000, 100 + k)
        assert rec.body == bodies[k]
        if k + 1 < len(offsets):
            assert off + rec.size == offsets[k + 1]


@pytest.mark.parametrize(
    ("buf", "reason"),
    [
        (b"-7 5 9a71bb4c\r\nhello\r\n", "record does not start with '+'"),
        (b"+7 5 9a71bb4c hello world and more and more bytes here\r\n", "header has no line end"),
        (b"+7 5 9a7XYZ", "header has no line end"),  # short, but not a prefix of any header
        (b"+7 5 9a71bb4c\nhello\r\n", "header does not end with CRLF"),
        (b"+7 5\r\nhello\r\n", "header does not have 3 fields"),
        (b"+7 5 9a71bb4c 1\r\nhello\r\n", "header does not have 3 fields"),
        (b"+7  5 9a71bb4c\r\nhello\r\n", "header does not have 3 fields"),
        (b"+07 5 9a71bb4c\r\nhello\r\n", "id or length is not a decimal number"),
        (b"+7 05 9a71bb4c\r\nhello\r\n", "id or length is not a decimal number"),
        (b"+x 5 9a71bb4c\r\nhello\r\n", "id or length is not a decimal number"),
        (b"+7 -5 9a71bb4c\r\nhello\r\n", "id or length is not a decimal number"),
        (b"+7 5 9A71BB4C\r\nhello\r\n", "crc is not 8 lowercase hex digits"),
        (b"+7 5 9a71bb4\r\nhello\r\n", "crc is not 8 lowercase hex digits"),
        (b"+7 5 9a71bb4c0\r\nhello\r\n", "crc is not 8 lowercase hex digits"),
        (b"+7 5 9a71bb4g\r\nhello\r\n", "crc is not 8 lowercase hex digits"),
        (b"+8 5 9a71bb4c\r\nhello\r\n", "id 8 where 7 was expected"),
        (b"+7 4 9a71bb4c\r\nhello\r\n", "body not followed by CRLF"),
        (b"+7 5 9a71bb4c\r\nhello\n\n", "body not followed by CRLF"),
        (b"+7 5 9a71bb4c\r\nhellp\r\n", "crc mismatch"),
        (b"+7 5 9a71bb4d\r\nhello\r\n", "crc mismatch"),
    ],
)
def test_every_corrupt_reason(buf: bytes, reason: str) -> None:
    assert reason_of(buf) == (reason, False)


def test_truncated_reasons() -> None:
    assert reason_of(b"") == ("no data", True)
    assert reason_of(HELLO, pos=len(HELLO)) == ("no data", True)
    assert reason_of(HELLO[:9]) == ("header cut off", True)
    assert reason_of(HELLO[:17]) == ("body cut off", True)


def test_every_prefix_is_truncated_not_corrupt() -> None:
    for cut in range(len(HELLO)):
        reason, truncated = reason_of(HELLO[:cut])
        assert truncated, (cut, reason)
    # The same prefixes followed by garbage are corruption, not truncation.
    for cut in range(1, len(HELLO)):
        reason, truncated = reason_of(HELLO[:cut] + b"\x00" * 80)
        assert not truncated, (cut, reason)


def test_longest_header_fits_the_bound() -> None:
    header = b"+%d %d %08x\r\n" % (2**63 - 1, 10**19 - 1, 0xFFFFFFFF)  # 19-digit id and length
    assert len(header) <= MAX_HEADER_BYTES
    # A full-size header cut anywhere is still recognised as a torn write.
    assert reason_of(header[:-1], expect=None)[1] is True
    assert reason_of(header, expect=None) == ("body cut off", True)


@given(id=ids, body=st.binary(max_size=2000), prefix=st.binary(max_size=20), suffix=st.binary(max_size=20))
def test_round_trip_arbitrary_bodies(id: int, body: bytes, prefix: bytes, suffix: bytes) -> None:
    rec = encode_record(id, body)
    buf = prefix + rec + suffix
    got = decode_record(buf, len(prefix), id)
    assert (got.id, got.body, got.crc, got.size) == (id, body, crc32c(body), len(rec))
    assert decode_record(buf, len(prefix), None).id == id


@given(first=st.integers(min_value=1, max_value=2**62), bodies=st.lists(st.binary(max_size=300), min_size=1))
def test_batch_round_trip(first: int, bodies: list[bytes]) -> None:
    data, offsets = encode_batch(first, bodies, 0)
    pos = 0
    for k, body in enumerate(bodies):
        assert offsets[k] == pos
        rec = decode_record(data, pos, first + k)
        assert rec.body == body
        pos += rec.size
    assert pos == len(data)


@given(id=ids, body=st.binary(max_size=300), data=st.data())
def test_any_single_bit_flip_is_detected(id: int, body: bytes, data: st.DataObject) -> None:
    rec = bytearray(encode_record(id, body))
    bit = data.draw(st.integers(min_value=0, max_value=8 * len(rec) - 1))
    rec[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(BadRecord):
        decode_record(bytes(rec), 0, id)


@given(id=ids, body=st.binary(max_size=300), data=st.data())
def test_any_cut_is_truncated(id: int, body: bytes, data: st.DataObject) -> None:
    rec = encode_record(id, body)
    cut = data.draw(st.integers(min_value=0, max_value=len(rec) - 1))
    with pytest.raises(BadRecord) as info:
        decode_record(rec[:cut], 0, id)
    assert info.value.truncated
