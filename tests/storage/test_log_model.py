"""The log against a plain list model (hypothesis RuleBasedStateMachine).

Small segments so rolls happen often; reopen, torn reopen (the last segment
cut at a random byte, as a crash would leave it) and retention change what
the log holds, and the model follows.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from logd.errors import NotFoundError
from logd.storage import Log

from .helpers import first_id_of, forget_clean_close, layout, log_files

SEGMENT_BYTES = 256
bodies = st.lists(st.binary(max_size=64), min_size=1, max_size=6)


class LogModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="logd-model-")
        self.log = self.open()
        self.first = 1  # model: ids first..first+len(bodies)-1
        self.bodies: list[bytes] = []

    def open(self) -> Log:
        return Log(self.dir, fsync="never", segment_bytes=SEGMENT_BYTES)

    @property
    def head(self) -> int:
        return self.first + len(self.bodies) - 1

    def teardown(self) -> None:
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(batch=bodies)
    def append(self, batch: list[bytes]) -> None:
        assert self.log.append(batch) == self.head + len(batch)
        self.bodies += batch

    @rule(data=st.data())
    def read(self, data: st.DataObject) -> None:
        start = data.draw(st.integers(min_value=max(1, self.first - 2), max_value=self.head + 2), label="start")
        count = data.draw(st.integers(min_value=1, max_value=40), label="count")
        if start < self.first:
            with pytest.raises(NotFoundError):
                self.log.read(start, max_count=count)
            return
        got = self.log.read(start, max_count=count)
        want = self.bodies[start - self.first : start - self.first + count]
        assert [r.body for r in got] == want
        assert [r.id for r in got] == list(range(start, start + len(want)))

    @rule()
    def sync(self) -> None:
        assert self.log.sync() == self.head

    @rule()
    def reopen(self) -> None:
        self.log.close()
        self.log = self.open()
        assert self.log.recovered_bytes_cut == 0

    @rule(data=st.data())
    def torn_reopen(self, data: st.DataObject) -> None:
        self.log.close()
        forget_clean_close(self.dir)  # a crash, not a clean close, leaves the torn tail
        path = log_files(self.dir)[-1]
        seg_first = first_id_of(path)
        size = path.stat().st_size
        cut = data.draw(st.integers(min_value=0, max_value=size), label="cut")
        os.truncate(path, cut)
        recs = layout(seg_first, self.bodies[seg_first - self.first :])
        assert (recs[-1][1] if recs else 0) == size
        kept = sum(1 for _off, end in recs if end <= cut)
        del self.bodies[seg_first - self.first + kept :]
        torn = path.read_bytes()[recs[kept - 1][1] if kept else 0 :]
        self.log = self.open()
        # Zero bytes ending the file count as zeros written ahead, not as cut data.
        assert self.log.recovered_bytes_cut == len(torn.rstrip(b"\0"))

    @rule(limit=st.integers(min_value=0, max_value=3 * SEGMENT_BYTES))
    def retention(self, limit: int) -> None:
        self.log.sync()  # rolled segments are finished before retention may delete them
        sizes = [(first_id_of(p), p.stat().st_size) for p in log_files(self.dir)]
        total = sum(s for _f, s in sizes)
        expect: list[int] = []
        while len(sizes) - len(expect) > 1 and total > limit:
            first, size = sizes[len(expect)]
            expect.append(first)
            total -= size
        self.log.retention_bytes = limit
        assert self.log.apply_retention() == expect
        self.log.retention_bytes = None
        new_first = self.log.first
        assert new_first == sizes[len(expect)][0]
        del self.bodies[: new_first - self.first]
        self.first = new_first

    @rule()
    def read_head(self) -> None:
        if self.bodies:
            got = self.log.read(self.head, max_count=1)
            assert [(r.id, r.body) for r in got] == [(self.head, self.bodies[-1])]
        else:  # empty, possibly after retention and a torn reopen: first == head + 1
            assert self.log.read(self.first) == []
            if self.head >= 1:
                with pytest.raises(NotFoundError):
                    self.log.read(self.head)

    @invariant()
    def positions(self) -> None:
        assert self.log.head == self.log.written == self.head
        assert self.log.first == self.first
        assert self.log.read(self.head + 1) == []

    @invariant()
    def segments_are_continuous(self) -> None:
        firsts = [first_id_of(p) for p in log_files(self.dir)]
        assert firsts[0] == self.first
        assert firsts == sorted(set(firsts))
        assert firsts[-1] <= self.head + 1


LogModel.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLogModel = LogModel.TestCase
