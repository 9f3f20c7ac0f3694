"""Shared, bounded segment read handles (issue 13, finding 3)."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import pytest

from logd.errors import UnavailableError
from logd.storage import Log
from logd.storage.handles import HandleCache, ReadHandle
from logd.storage.log import READ_HANDLES

from .helpers import open_fds_under


def test_a_failed_open_is_an_unavailable_error_and_nothing_is_ignored(tmp_path: Path) -> None:
    gc.collect()  # what earlier tests left to finalise is not this test's to judge
    unraisable: list[object] = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append
    try:
        with pytest.raises(UnavailableError, match="cannot open .*missing.log for reading"):
            ReadHandle(str(tmp_path / "missing.log"))
        gc.collect()
    finally:
        sys.unraisablehook = old_hook
    assert unraisable == []  # before: "Exception ignored in ReadHandle.__del__" (AttributeError)


def test_cache_keeps_at_most_capacity_open(tmp_path: Path) -> None:
    paths = []
    for k in range(10):
        p = tmp_path / f"{k}.log"
        p.write_bytes(b"x")
        paths.append(str(p))
    cache = HandleCache(3)
    before = len(open_fds_under(tmp_path))
    held = cache.get(paths[0])
    for p in paths[1:]:
        cache.get(p)
    assert len(cache) == 3
    assert len(open_fds_under(tmp_path)) - before == 4  # three cached, and the evicted one a reader still holds
    fd = held.fd
    del held
    assert len(open_fds_under(tmp_path)) - before == 3
    with pytest.raises(OSError):
        os.fstat(fd)  # closed with its last reference
    assert cache.get(paths[-1]) is cache.get(paths[-1])  # shared, not reopened


def test_reading_many_segments_keeps_descriptors_bounded(tmp_path: Path) -> None:
    with Log(str(tmp_path / "d"), fsync="never", segment_bytes=100) as log:
        for i in range(1, 6 * READ_HANDLES + 1):
            log.append([b"message %d" % i])
        log.sync()  # as the server does: rolled segments are finished, their indexes mapped on use
        assert log.segment_count > 2 * READ_HANDLES + 2
        before = len(open_fds_under(tmp_path))
        for i in range(1, log.head + 1):
            assert log.read(i, max_count=1)[0].body == b"message %d" % i
            span = log.span(i, 1)
            assert span is not None and os.pread(span.handle.fd, 1, span.start) == b"+"
            del span
        # Read handles and mapped closed indexes each stay within READ_HANDLES.
        assert len(open_fds_under(tmp_path)) - before <= 2 * READ_HANDLES + 1
