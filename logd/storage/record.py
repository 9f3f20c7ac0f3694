"""Encode, decode and verify records: ``+<id> <len> <crc>\\r\\n<body>\\r\\n``.

The stored record is the wire record (protocol.md section 1), so a byte range
of a segment can be sent to a reader as it is.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import NamedTuple

from crc32c import crc32c

from logd.hot import ext

# A header is at most "+" + 19 digits + " " + 19 digits + " " + 8 hex + "\r\n".
MAX_HEADER_BYTES = 1 + 19 + 1 + 19 + 1 + 8 + 2
TRAILER = b"\r\n"


def crc_of(body: bytes | memoryview) -> int:
    """CRC-32C of a body, as stored in its record header."""
    return crc32c(body)


def encode_record(id: int, body: bytes) -> bytes:
    """The record bytes of one message."""
    return b"+%d %d %08x\r\n" % (id, len(body), crc32c(body)) + body + TRAILER


def encode_batch(first_id: int, bodies: Sequence[bytes], base_offset: int) -> tuple[bytes, array]:
    """Records for ``bodies`` with ids from ``first_id``, joined into one buffer.

    Returns the buffer and an ``array('Q')`` of each record's byte offset,
    counted from ``base_offset`` (where the buffer will be written). This is
    the append hot path: the C accelerator does it when built, and takes
    only a list of bytes (anything else comes here).
    """
    if ext is not None and type(bodies) is list:
        done = ext.encode_batch(first_id, bodies, base_offset)
        if done is not None:
            offsets = array("Q")
            offsets.frombytes(done[1])
            return done[0], offsets
    return encode_batch_py(first_id, bodies, base_offset)


def encode_batch_py(first_id: int, bodies: Sequence[bytes], base_offset: int) -> tuple[bytes, array]:
    """`encode_batch` in pure Python: one loop, one join (the reference for ``_hot.c``)."""
    parts: list[bytes] = []
    add = parts.append
    offsets = array("Q")
    add_offset = offsets.append
    pos = base_offset
    i = first_id
    for body in bodies:
        header = b"+%d %d %08x\r\n" % (i, len(body), crc32c(body))
        add(header)
        add(body)
        add(TRAILER)
        add_offset(pos)
        pos += len(header) + len(body) + 2
        i += 1
    return b"".join(parts), offsets


class Decoded(NamedTuple):
    """One record found in a buffer."""

    id: int
    body: bytes
    crc: int
    size: int  # bytes of the whole record


class BadRecord(Exception):
    """Why the bytes at some position are not a valid record.

    ``truncated`` is true when the bytes are a valid prefix of a record (the
    buffer simply ends early): at the end of a segment that is a torn write.
    """

    def __init__(self, reason: str, *, truncated: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.truncated = truncated
        self.offset = -1  # set by scanners: where in the file the bad record starts


def _digits(tok: bytes) -> bool:
    return tok.isdigit() and (tok == b"0" or tok[:1] != b"0")


def decode_record(buf: bytes | bytearray | memoryview, pos: int, expect_id: int | None) -> Decoded:
    """Decode and verify the record at ``buf[pos:]``; raise `BadRecord` if it is not one."""
    data = bytes(buf) if isinstance(buf, memoryview) else buf
    end = len(data)
    if pos >= end:
        raise BadRecord("no data", truncated=True)
    if data[pos : pos + 1] != b"+":
        raise BadRecord("record does not start with '+'")
    nl = data.find(b"\n", pos, pos + MAX_HEADER_BYTES)
    if nl < 0:
        if end - pos < MAX_HEADER_BYTES and _header_prefix_ok(bytes(data[pos:end])):
            raise BadRecord("header cut off", truncated=True)
        raise BadRecord("header has no line end")
    if data[nl - 1 : nl] != b"\r":
        raise BadRecord("header does not end with CRLF")
    fields = bytes(data[pos + 1 : nl - 1]).split(b" ")
    if len(fields) != 3:
        raise BadRecord("header does not have 3 fields")
    id_tok, len_tok, crc_tok = fields
    if not _digits(id_tok) or not _digits(len_tok):
        raise BadRecord("id or length is not a decimal number")
    if len(crc_tok) != 8 or crc_tok.strip(b"0123456789abcdef"):
        raise BadRecord("crc is not 8 lowercase hex digits")
    rid = int(id_tok)
    if expect_id is not None and rid != expect_id:
        raise BadRecord(f"id {rid} where {expect_id} was expected")
    length = int(len_tok)
    start = nl + 1
    stop = start + length
    if stop + 2 > end:
        raise BadRecord("body cut off", truncated=True)
    if data[stop : stop + 2] != TRAILER:
        raise BadRecord("body not followed by CRLF")
    body = bytes(data[start:stop])
    crc = int(crc_tok, 16)
    if crc32c(body) != crc:
        raise BadRecord("crc mismatch")
    return Decoded(rid, body, crc, stop + 2 - pos)


def _header_prefix_ok(prefix: bytes) -> bool:
    """Whether ``prefix`` could be the start of a valid header (a torn write)."""
    allowed = b"0123456789abcdef \r"
    return prefix[:1] == b"+" and not prefix[1:].strip(allowed)
