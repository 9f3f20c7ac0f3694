"""Unix byte streams <-> messages: split input into message batches, format records for output.

`logd append` and `logd read` use these; they are plain functions over file
descriptors and bytes, so other tools can use them too.
"""

from __future__ import annotations

import base64
import json
import os
import string
from collections.abc import Callable, Iterator
from typing import BinaryIO

from ..protocol import Record
from .commands import readable_now

__all__ = ["CHUNK_BYTES", "MAX_MESSAGE_BYTES", "format_records", "read_chunks", "split_messages"]

CHUNK_BYTES = 1 << 20  # read up to this much input, and send at most about this much per MSG
MAX_MESSAGE_BYTES = 64 << 20  # a "message" longer than this is not one: stop with an error
TEMPLATE_FIELDS = frozenset({"id", "body", "len"})


def read_chunks(stream: BinaryIO, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The stream's bytes in chunks of up to ``size``.

    A chunk is whatever is there now, topped up while more is readable
    without waiting: bulk input comes in big chunks (big batches), a trickle
    (``tail -f x | logd append``) goes out as soon as it arrives.
    """
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):
        fd = -1  # not a real file (tests): plain reads
    while True:
        data = os.read(fd, size) if fd >= 0 else stream.read(size)
        if not data:
            return
        if fd >= 0 and len(data) < size:
            parts = [data]
            have = len(data)
            while have < size and readable_now(fd):
                more = os.read(fd, size - have)
                if not more:
                    break
                parts.append(more)
                have += len(more)
            data = b"".join(parts)
        yield data


def split_messages(
    chunks: Iterator[bytes], sep: bytes, max_messages: int, on_chunk: Callable[[int], None] | None = None
) -> Iterator[list[bytes]]:
    """Messages separated by ``sep``, in lists of at most ``max_messages``.

    A final separator does not start an empty message; empty messages in the
    middle (two separators in a row) are kept. ``on_chunk(n)`` is told the
    size of each chunk consumed (a progress bar).
    """
    if not sep:
        raise ValueError("the delimiter must not be empty")
    carry = b""
    for chunk in chunks:
        if on_chunk is not None:
            on_chunk(len(chunk))
        parts = (carry + chunk).split(sep) if carry else chunk.split(sep)
        carry = parts.pop()
        if len(carry) > MAX_MESSAGE_BYTES:
            raise ValueError(f"a message is over {MAX_MESSAGE_BYTES} bytes: is the delimiter right?")
        for i in range(0, len(parts), max_messages):
            yield parts[i : i + max_messages]
    if carry:
        yield [carry]


def _json_line(record: Record) -> str:
    try:
        body: str = record.body.decode("utf-8")
    except UnicodeDecodeError:
        return json.dumps(
            {"id": record.id, "body": base64.b64encode(record.body).decode("ascii"), "base64": True}
        )
    return json.dumps({"id": record.id, "body": body}, ensure_ascii=False)


def format_records(fmt: str, sep: bytes = b"\n") -> Callable[[list[Record]], bytes]:
    """A function turning records into output bytes, each followed by ``sep``.

    ``raw``: the body as it is. ``json``: ``{"id": .., "body": ..}`` with the
    body as text when it is UTF-8, else ``{"id": .., "body": <base64>,
    "base64": true}``. Anything else is a template with the fields ``{id}``,
    ``{body}`` (invalid UTF-8 passes through byte for byte) and ``{len}``.
    """
    if fmt == "raw":
        return lambda records: b"".join([r.body + sep for r in records])
    text_sep = sep.decode("utf-8", "surrogateescape")
    if fmt == "json":
        return lambda records: "".join([_json_line(r) + text_sep for r in records]).encode("utf-8")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None}
    except ValueError as exc:
        raise ValueError(f"bad template {fmt!r}: {exc}") from None
    unknown = fields - TEMPLATE_FIELDS
    if unknown or not fields:
        raise ValueError(
            f"unknown format {fmt!r}: use raw, json, or a template with {{id}}, {{body}}, {{len}}"
        )

    def render(records: list[Record]) -> bytes:
        out = [
            fmt.format(id=r.id, body=r.body.decode("utf-8", "surrogateescape"), len=len(r.body))
            for r in records
        ]
        out.append("")
        return text_sep.join(out).encode("utf-8", "surrogateescape")

    return render
