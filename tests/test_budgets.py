"""The memory budgets' decisions, with no sockets: reservations in arrival order, per-connection limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from logd.budgets import Budgets
from logd.config import Config


@dataclass
class FakeSession:
    waiting_bytes: int = 0
    inflight_bytes: int = 0
    partial_bytes: int = 0
    declared_bytes: int = 0
    closing: bool = False
    backlog: bool = False


@dataclass(eq=False)
class FakeConn:
    session: FakeSession = field(default_factory=FakeSession)
    held: int = 0
    granted: int = 0
    unsent: int = 0
    fast_bytes: int = 0  # what its lane has in flight (logd/lane.py)
    write_paused: bool = False
    stream: object = None
    transport: object = None


@dataclass
class FakeQueue:
    pending_bytes: int = 0
    backlogged: bool = False
    hub: object = field(default_factory=lambda: SimpleNamespace(over=False))


def budgets(**limits: int) -> tuple[Budgets, list[str]]:
    rooms: list[str] = []
    config = Config(max_batch_bytes=100, **limits)  # type: ignore[arg-type]
    return Budgets(config, FakeQueue(), lambda: rooms.append("room")), rooms  # type: ignore[arg-type]


def test_a_msg_in_progress_reserves_its_declared_size() -> None:
    b, _ = budgets(server_input_bytes=1000)
    conn = FakeConn(FakeSession(partial_bytes=10, declared_bytes=600))
    assert b.update(conn) is False  # granted: read it whole
    assert conn.granted == 600 and b.input_used == 600


def test_a_msg_that_does_not_fit_waits_unread_until_room_then_goes_first() -> None:
    b, rooms = budgets(server_input_bytes=1000)
    first = FakeConn(FakeSession(partial_bytes=10, declared_bytes=600))
    second = FakeConn(FakeSession(partial_bytes=10, declared_bytes=600))
    third = FakeConn(FakeSession(partial_bytes=10, declared_bytes=100))
    assert b.update(first) is False
    assert b.update(second) is True  # does not fit: not read
    assert b.update(third) is True  # would fit, but the second came first
    assert list(b.waiting_grant) == [second, third]
    first.session = FakeSession()  # its MSG completed and was answered
    assert b.update(first) is False
    assert rooms  # the server is told to look at the waiting ones
    assert b.update(second) is False and second.granted == 600
    assert b.update(third) is False and b.input_used == 700


def test_one_msg_alone_always_fits() -> None:
    b, _ = budgets(server_input_bytes=100)
    conn = FakeConn(FakeSession(partial_bytes=5, declared_bytes=100))
    assert b.update(conn) is False


def test_commands_waiting_behind_a_stream_are_capped_per_connection() -> None:
    b, _ = budgets(conn_input_bytes=1000, server_input_bytes=10_000)
    conn = FakeConn(FakeSession(waiting_bytes=900), stream=object())
    assert b.update(conn) is False
    conn.session.waiting_bytes = 1100
    assert b.update(conn) is True
    assert b.input_used == 1100


def test_unsent_output_over_the_server_budget_pauses_only_those_with_output() -> None:
    b, _ = budgets(server_output_bytes=1000)
    loud = FakeConn(unsent=0)
    quiet = FakeConn()
    b.output_changed(loud, 2000)
    assert b.over and b.output_over()
    assert b.update(loud) is True
    assert b.update(quiet) is False
    b.forget(loud)
    assert not b.over and b.output_used == 0


def test_a_backlogged_queue_pauses_writers_only() -> None:
    b, _ = budgets()
    b._queue.backlogged = True  # type: ignore[attr-defined]
    writer = FakeConn(FakeSession(inflight_bytes=10))
    reader = FakeConn()
    assert b.update(writer) is True
    assert b.update(reader) is False
