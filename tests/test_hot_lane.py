"""The C lane (logd/_lane.c: Lane, Hub, ack_round, gather) against its pure-Python twin (logd/lane.py).

Both are driven the same way, with every call they make outward recorded,
and the records must be equal. Like tests/test_hot.py, this needs the C
module (the pure-Python run of the suite leaves it out).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logd import lane as lane_module
from logd.hot import ext
from tests.test_lane import LIMITS, msg, recording_lane

pytestmark = pytest.mark.skipif(ext is None, reason="needs the C module (the pure-Python run leaves this file out)")

chunks = st.one_of(
    st.lists(st.lists(st.binary(max_size=30), min_size=1, max_size=3), min_size=1, max_size=3).map(
        lambda ms: b"".join(msg(*m) for m in ms)
    ),
    st.builds(lambda b: msg(b, lf=True), st.binary(max_size=10)),
    st.sampled_from([b"PING\r\n", b"MSG 1\r\n", b"MSG 1\r\nab\r\n", b"MSG 99\r\n" + b"x" * 99 + b"\r\n", b"",
                     b"MSG 5 5 5 5 5\r\n" + b"abcde\r\n" * 5, b"msg 1\r\na\r\n", b"MSG  1\r\na\r\n"]),
    st.binary(max_size=40),
)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("data"), chunks),
        st.tuples(st.just("open"), st.booleans()),
        st.tuples(st.just("hub"), st.sampled_from(["accepting", "over", "armed"]), st.booleans()),
        st.tuples(st.just("ack"), st.integers(min_value=1, max_value=10**12)),
        st.tuples(st.just("send")),
        st.tuples(st.just("unsent"), st.integers(min_value=0, max_value=2)),
        st.tuples(st.just("lost"), st.just(True)),
    ),
    max_size=25,
)


def run_steps(base: type, hub_type: Any, script: list[tuple[Any, ...]]) -> list[Any]:
    lane, hub, calls = recording_lane(base, hub_type)
    appended: list[int] = []
    for step in script:
        kind = step[0]
        if kind == "data":
            before = len(calls)
            lane.data_received(step[1])
            appended += [c[2] for c in calls[before:] if c[0] == "append"]
        elif kind == "open":
            lane.lane_open = step[1]
        elif kind == "hub":
            setattr(hub, step[1], step[2])
        elif kind == "ack" and appended:
            calls.append(("acked", lane.lane_ack(appended.pop(0), step[1])))
        elif kind == "send":
            calls.append(("sent", lane.lane_send()))
        elif kind == "unsent":
            lane.unsent = step[1]
        elif kind == "lost":
            lane.lane_write = None
        calls.append(("state", lane.fast_count, lane.fast_bytes, lane.active, hub.pending_bytes))
        lane.active = False
    return calls


@settings(max_examples=400, deadline=None)
@given(steps)
def test_the_c_lane_does_what_its_twin_does(script: list[tuple[Any, ...]]) -> None:
    assert run_steps(ext.Lane, ext.Hub, script) == run_steps(lane_module.LanePy, lane_module.HubPy, script)


class Told:
    """A submitter of the slow path: batch_done answers what it was told to."""

    def __init__(self, calls: list[Any], flush: bool) -> None:
        self.calls, self.flush_after = calls, flush

    def batch_done(self, token: object, last_id: int) -> bool:
        self.calls.append(("done", token, last_id))
        return self.flush_after


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.lists(st.binary(max_size=5), min_size=0, max_size=3), st.integers(0, 3)), min_size=1,
                max_size=8), st.integers(min_value=20, max_value=10**15))
def test_ack_round_and_gather_match_their_twins(batches: list[tuple[list[bytes], int]], head: int) -> None:
    def run(lane_base: type, hub_type: Any, ack_round: Any, gather: Any) -> list[Any]:
        lane, _hub, calls = recording_lane(lane_base, hub_type)
        lane.lane_buffer_size = lambda: 0
        lane.lane_open = True
        round_: list[Any] = []
        for i, (bodies, who) in enumerate(batches):
            nbytes = sum(map(len, bodies))
            if who == 0:
                lane.fast_count += 1
                lane.fast_bytes += nbytes
                round_.append((bodies, nbytes, lane, None))
            else:
                round_.append((bodies, nbytes, Told(calls, who == 2), ("token", i)))
        out = gather(round_)
        messages, nbytes, to_flush = ack_round(round_, head)
        return [out, messages, nbytes, [type(w).__name__ for w in to_flush], calls]

    assert run(ext.Lane, ext.Hub, ext.ack_round, ext.gather) == run(
        lane_module.LanePy, lane_module.HubPy, lane_module.ack_round_py, lane_module.gather_py
    )


def test_the_c_functions_refuse_what_is_not_theirs() -> None:
    with pytest.raises(TypeError):
        ext.Hub(1, 2, 0, 0)
    lane = ext.Lane()
    with pytest.raises(TypeError):
        lane.lane_setup(lane_module.HubPy(list.append, list, 0, 0), *LIMITS)
    with pytest.raises(TypeError):
        ext.ack_round([(b"not a list", 1, lane, None)], 1)
    with pytest.raises(TypeError):
        ext.gather([([b"x"], "1", lane, None)])
    with pytest.raises(TypeError):
        ext.ack_round((), 1)
    lane, _hub, calls = recording_lane(ext.Lane, ext.Hub)
    lane.lane_setup(ext.Hub.__new__(ext.Hub), *LIMITS)  # a Hub never initialised: no queue to hand to
    lane.lane_open = True
    lane.data_received(msg(b"a"))
    assert calls == [("slow", msg(b"a"))]
