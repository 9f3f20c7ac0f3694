"""A connection's MSG lane: whole MSGs from the socket to the append queue with no Python per message.

The fan-in case (many connections, each sending one MSG and waiting for its
``OK``) is the server's hottest path. `Lane` is the base class of
`logd.connection.Connection`; its ``data_received`` takes a chunk that is
nothing but whole MSG commands straight to the append queue, as the tuple
``(bodies, nbytes, lane, None)``, when

- the connection has opened the lane (``lane_open``): the session holds no
  reply, waiting command or stream, the parser holds nothing, reading is not
  paused and this connection may send MSG (it recomputes the flag whenever
  its Python code has run, `Connection._reopen`);
- the server-wide `Hub` says MSGs are accepted (a leader, no fail-stop, no
  ``--min-replicas``) and no server-wide budget is exceeded.

Anything else goes to the connection's Python path, ``slow_received``.

Order: the lane's MSGs in flight (``fast_count``) come before every reply
the session holds, because the lane takes input only while the session holds
none and the session sends nothing while ``fast_count`` is above 0. So their
``OK <id>`` lines are written the moment their round is committed
(`ack_round`): gathered by ``lane_ack``, then all of one connection's in one
write by ``lane_send`` (a client pipelining 100 MSGs gets one packet back).

The C module (``logd/_lane.c``) implements `Lane`, `Hub`, `ack_round` and
`gather`; the classes and functions here are their pure-Python twins and the
reference (tests/test_hot_lane.py holds the two to each other). ``LOGD_NO_EXTENSIONS=1``
runs on these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .hot import ext
from .protocol.parser import whole_msgs_py

Batch = tuple[list[bytes], int, Any, object]


class HubPy:
    """What every lane of a server shares: the queue's entry points and the server-wide switches."""

    def __init__(self, append: Callable[[Batch], object], kick: Callable[[], object],
                 backlog_bytes: int, conn_input: int) -> None:
        if not callable(append) or not callable(kick):
            raise TypeError("Hub(append, kick, ...): append and kick must be callable")
        self.append = append  # the append queue's pending deque's append
        self.kick = kick  # called with no round armed, or past the backlog
        self.backlog_bytes = backlog_bytes
        self.conn_input = conn_input  # a lane past this calls its flush (which pauses reading)
        self.pending_bytes = 0  # MSG body bytes in the queue, not yet written
        self.accepting = True  # MSGs are accepted now
        self.over = False  # over a server-wide budget
        self.armed = False  # a round will take what is pending


class LanePy:
    """A connection's MSG lane (the C module's `Lane` is its twin)."""

    hub: Any = None
    lane_write: Callable[[bytes], object] | None = None  # transport.write; None: write nothing
    lane_buffer_size: Callable[[], int] | None = None  # transport.get_write_buffer_size
    fast_count = 0  # the lane's MSGs whose OK is not yet written
    fast_bytes = 0  # their body bytes
    unsent = 0  # output bytes counted in the server's budget (budgets.py)
    _acks: list[bytes] | None = None  # OK lines of committed MSGs, until lane_send writes them
    _acks_bytes = 0  # the body bytes of the MSGs they answer
    lane_open = False  # set by the connection: the lane may take input
    active = False  # data arrived since the idle sweeper last looked
    _limits: tuple[int, int, int, int] = (1, 0, 0, 0)

    def lane_setup(self, hub: Any, max_line: int, max_message: int, max_batch: int, max_batch_bytes: int) -> None:
        """The server's Hub and the parser's limits."""
        if not isinstance(hub, HubPy):
            raise TypeError("lane_setup needs a Hub")
        if max_line < 1:
            raise ValueError("max_line out of range")
        self.hub = hub
        self._limits = (max_line, max_message, max_batch, max_batch_bytes)

    def data_received(self, data: bytes) -> None:
        self.active = True
        hub = self.hub
        if (
            self.lane_open
            and hub is not None
            and hub.accepting
            and not hub.over
            and self.lane_write is not None
            and type(data) is bytes
            and data
        ):
            batches = whole_msgs_py(data, *self._limits)
            if batches is not None:
                self._submit(hub, batches)
                return
        self.slow_received(data)  # type: ignore[attr-defined]

    def _submit(self, hub: HubPy, batches: list[list[bytes]]) -> None:
        for bodies in batches:
            nbytes = sum(map(len, bodies))
            hub.append((bodies, nbytes, self, None))
            self.fast_count += 1
            self.fast_bytes += nbytes
            hub.pending_bytes += nbytes
        if not hub.armed or hub.pending_bytes > hub.backlog_bytes:
            hub.kick()
        if self.fast_bytes > hub.conn_input:
            self.flush()  # type: ignore[attr-defined]

    def lane_ack(self, nbytes: int, last_id: int) -> None:
        """One of the lane's MSGs is committed: its OK goes with the next `lane_send`."""
        if self._acks is None:
            self._acks = []
        self._acks.append(b"OK %d\r\n" % last_id)
        self._acks_bytes += nbytes

    def lane_send(self) -> bool:
        """Write the OKs `lane_ack` gathered, in one write; True: the connection's flush must run
        (the lane is shut, or the transport now holds back output the budget does not know of)."""
        acks = self._acks or []
        self.fast_count -= len(acks)
        self.fast_bytes -= self._acks_bytes
        self._acks, self._acks_bytes = None, 0
        write = self.lane_write
        if not acks or write is None:
            return False  # closed or lost: nobody to tell
        write(b"".join(acks))  # may call pause_writing, which shuts the lane
        if not self.lane_open or self.lane_buffer_size is None:
            return True
        return self.lane_buffer_size() != self.unsent


def ack_round_py(round_: list[Batch], head: int) -> tuple[int, int, list[Any]]:
    """Hand out the id ranges of a committed round whose last message has id ``head``, in order.

    A lane's MSG (token None) is told through its ``lane_ack``, any other
    through ``who.batch_done(token, last_id)``; then each lane's ``lane_send``,
    once, in the order the lanes first came (even after a failure: an OK
    gathered and not sent would hold that connection's later replies for
    ever). Returns the messages and bytes of the round, and those that
    answered True, in order (repeats included).
    """
    messages = sum([len(item[0]) for item in round_])
    nbytes = sum([item[1] for item in round_])
    first = head + 1 - messages
    to_flush = []
    lanes: dict[Any, None] = {}
    try:
        for bodies, n, who, token in round_:
            first += len(bodies)
            if token is None:
                lanes[who] = None
                who.lane_ack(n, first - 1)
            elif who.batch_done(token, first - 1):
                to_flush.append(who)
    finally:
        for lane in lanes:
            if lane.lane_send():
                to_flush.append(lane)
    return messages, nbytes, to_flush


def gather_py(round_: list[Batch]) -> tuple[list[bytes], int]:
    """Every body of a round, in order, and their total size (one write for all)."""
    if len(round_) == 1:
        return round_[0][0], round_[0][1]
    bodies: list[bytes] = []
    nbytes = 0
    for item in round_:
        bodies += item[0]
        nbytes += item[1]
    return bodies, nbytes


# The C types have the same attributes and methods (type checkers see the twins: connection.py).
if ext is not None:
    Lane, Hub, ack_round, gather = ext.Lane, ext.Hub, ext.ack_round, ext.gather
else:
    Lane, Hub, ack_round, gather = LanePy, HubPy, ack_round_py, gather_py
