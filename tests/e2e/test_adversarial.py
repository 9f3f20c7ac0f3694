"""Issue 12, findings 1-3: command order against a real `logd serve`, as a hostile client sends it.

The order contract (protocol.md section 3): every command is acted on in the
order received, CLOSE included. CLOSE completes every earlier command, except
that a READ or REPLICATE before it does not wait for new records (it ends with
``+EOF`` once it has sent what is committed), then answers ``OK`` and the
server closes; nothing after CLOSE runs. REFUSE and ACCEPT act at their turn.
Each sequence is sent with ONE ``sendall``, so the server gets it in one chunk.
"""

from __future__ import annotations

from .adversary import drain, record
from .conftest import ServerProcess


def test_read_then_close_in_one_packet_on_an_empty_log(server: ServerProcess) -> None:
    c = server.connect()
    c.sock.sendall(b"READ 1\r\nCLOSE\r\n")
    assert drain(c.sock) == (b"OK\r\n+EOF\r\nOK\r\n", True)


def test_close_right_behind_a_read_queued_after_a_msg(server: ServerProcess) -> None:
    c = server.connect()
    c.sock.sendall(b"MSG 1\r\nx\r\nREAD 1\r\n")
    c.sock.sendall(b"CLOSE\r\n")  # arrives while the READ waits for the MSG's commit
    assert drain(c.sock) == (b"OK 1\r\nOK\r\n" + record(1, b"x") + b"+EOF\r\nOK\r\n", True)


def test_close_ends_limited_reads_waiting_for_future_ids(server: ServerProcess) -> None:
    w = server.connect()
    w.send(b"MSG 1 1\r\na\r\nb\r\n")
    assert w.line() == b"OK 2"
    # A READ with a limit past the head sends what is committed, then +EOF.
    c = server.connect()
    c.sock.sendall(b"READ 2 3\r\nCLOSE\r\n")
    assert drain(c.sock) == (b"OK\r\n" + record(2, b"b") + b"+EOF\r\nOK\r\n", True)
    # A running tail and a READ queued behind it: each ends at once, in turn.
    c = server.connect()
    c.sock.sendall(b"READ 1\r\nREAD 2 5\r\nCLOSE\r\n")
    tail = b"OK\r\n" + record(1, b"a") + record(2, b"b") + b"+EOF\r\n"
    queued = b"OK\r\n" + record(2, b"b") + b"+EOF\r\n"
    assert drain(c.sock) == (tail + queued + b"OK\r\n", True)
    # Nothing was appended by any of this.
    w.send(b"HEAD\r\n")
    assert w.line() == b"OK 2"


def test_msg_after_close_in_the_same_packet_is_never_appended(server: ServerProcess) -> None:
    c = server.connect()
    c.sock.sendall(b"CLOSE\r\nMSG 7\r\nphantom\r\n")
    assert drain(c.sock) == (b"OK\r\n", True)
    c = server.connect()
    c.sock.sendall(b"MSG 1\r\na\r\nCLOSE\r\nMSG 7\r\nphantom\r\n")
    assert drain(c.sock) == (b"OK 1\r\nOK\r\n", True)
    # The next MSG of anyone gets id 2: no phantom took an id in between.
    probe = server.connect()
    probe.send(b"MSG 5\r\nprobe\r\nHEAD\r\nREAD 1 2\r\n")
    assert probe.line() == b"OK 2"
    assert probe.line() == b"OK 2"
    assert probe.line() == b"OK"
    assert probe.exact(len(record(1, b"a") + record(2, b"probe"))) == record(1, b"a") + record(2, b"probe")
    assert probe.line() == b"+EOF"


def test_refuse_waits_for_a_msg_queued_behind_a_waiting_read(server: ServerProcess) -> None:
    c = server.connect()
    c.sock.sendall(b"READ 1 1\r\nMSG 1\r\na\r\nREFUSE\r\n")
    assert c.line() == b"OK"  # the READ waits for id 1; the MSG and REFUSE wait behind it
    w = server.connect()
    w.send(b"MSG 1\r\nw\r\n")
    assert w.line() == b"OK 1", "REFUSE acted before its turn"
    assert c.exact(len(record(1, b"w"))) == record(1, b"w")
    assert c.line() == b"+EOF"
    assert c.line() == b"OK 2"  # the MSG sent before REFUSE is appended
    assert c.line() == b"OK"  # then REFUSE
    w.send(b"MSG 1\r\nz\r\n")
    assert w.line().startswith(b"ERR READONLY ")
    w.send(b"HEAD\r\nREAD 2 1\r\n")
    assert w.line() == b"OK 2"
    assert w.line() == b"OK"
    assert w.exact(len(record(2, b"a"))) == record(2, b"a")


def test_refuse_after_a_msg_behind_a_finite_read(server: ServerProcess) -> None:
    w = server.connect()
    w.send(b"MSG 1\r\nw\r\n")
    assert w.line() == b"OK 1"
    c = server.connect()
    c.sock.sendall(b"READ 1 1\r\nMSG 1\r\na\r\nREFUSE\r\nCLOSE\r\n")
    assert drain(c.sock) == (b"OK\r\n" + record(1, b"w") + b"+EOF\r\nOK 2\r\nOK\r\nOK\r\n", True)


def test_accept_waits_for_its_turn_behind_a_waiting_read(server: ServerProcess) -> None:
    w = server.connect()
    w.send(b"MSG 1\r\nw\r\nREFUSE\r\n")
    assert w.line() == b"OK 1"
    assert w.line() == b"OK"
    c = server.connect()
    c.sock.sendall(b"READ 2 1\r\nMSG 1\r\na\r\nACCEPT\r\n")
    assert c.line() == b"OK"  # the READ waits for id 2; the MSG and ACCEPT wait behind it
    w.send(b"MSG 1\r\nq\r\n")
    assert w.line().startswith(b"ERR READONLY "), "ACCEPT acted before its turn"
    c.sock.sendall(b"CLOSE\r\n")
    data, closed = drain(c.sock)
    # The READ ends with what is committed (nothing past id 1); the MSG before
    # ACCEPT is still refused; then ACCEPT and CLOSE.
    assert data.startswith(b"+EOF\r\nERR READONLY "), data
    assert data.endswith(b"\r\nOK\r\nOK\r\n") and data.count(b"\r\n") == 4, data
    assert closed
    w.send(b"MSG 1\r\nz\r\n")
    assert w.line() == b"OK 2"


def test_close_ends_a_replicate_stream_queued_in_the_same_packet(server: ServerProcess) -> None:
    w = server.connect()
    w.send(b"MSG 1\r\nw\r\n")
    assert w.line() == b"OK 1"
    c = server.connect()
    c.sock.sendall(b"REPLICATE 1 0\r\nCLOSE\r\n")
    # OK, the position, the segment, what is committed, then +EOF and CLOSE's OK (protocol.md 3.4).
    assert drain(c.sock) == (b"OK\r\n+HEAD 1 1\r\n+SEG 1\r\n" + record(1, b"w") + b"+EOF\r\nOK\r\n", True)
