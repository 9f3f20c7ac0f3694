"""Commands (client -> server): one frozen dataclass per verb, and their encoders."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from logd import defaults
from logd.storage.cursors import MAX_NAME, valid_name

# Ids are 1 <= id < 2^63 (protocol.md section 1); numbers in commands are
# bounded the same way so nothing downstream meets an unbounded int.
MAX_ID = (1 << 63) - 1
# CURSORS answers at most this many lines: a bare CURSORS over it is TOO_LARGE, and a page
# (`CURSORS <limit> [<after>]`) asks for at most this many (protocol.md 3.1).
CURSORS_MAX = 1000
DEFAULT_PORT = defaults.PORT  # protocol.md section 3: the server's default, the client's too
MAX_HOST_CHARS = 253  # a DNS name's longest text form; an address is shorter
_HOST_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-")
_IPV6_CHARS = frozenset("0123456789abcdefABCDEF:.")


def valid_address(text: str) -> bool:
    """``HOST:PORT`` as a replica names itself (protocol.md 3.4): a name or IPv4 address of
    ``A-Z a-z 0-9 . -``, or ``[IPv6]``, then a port 1..65535 with no leading zero."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or port[0] == "0" or int(port[:6]) > 65535:
        return False
    if host[:1] == "[" and host[-1:] == "]":
        inner = host[1:-1]
        return 2 <= len(inner) <= 45 and ":" in inner and set(inner) <= _IPV6_CHARS
    return 1 <= len(host) <= MAX_HOST_CHARS and set(host) <= _HOST_CHARS and host[0] != "-"


# --- commands (client -> server) ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Msg:
    """``MSG <len> ...`` with its bodies: append them, atomically, with consecutive ids.

    Not validated when built: the parser makes hundreds of thousands a second.
    """

    bodies: list[bytes]


@dataclass(frozen=True, slots=True)
class Read:
    """``READ <start> [<limit>]``: stream records from ``start``; ``limit`` 0 means tail."""

    start: int
    limit: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.start <= MAX_ID or not 0 <= self.limit <= MAX_ID:
            raise ValueError(f"bad READ {self.start} {self.limit}")


@dataclass(frozen=True, slots=True)
class Replicate:
    """``REPLICATE <start> [<prev_crc> [<epoch> <seen> [<address>]]]``: tail from ``start`` for a replica.

    ``prev_crc`` is the CRC the replica holds for id ``start - 1`` (None: not
    sent). ``epoch`` is the epoch of the replica's newest epoch entry, which
    ends at ``start`` in its history, and ``seen`` the highest epoch it has
    heard of (both None in the older form, which gets no epoch exchange).
    ``address`` is the ``HOST:PORT`` the replica listens on: the name the
    leader gives it in STATS and metrics (None: its connection's address).
    """

    start: int
    prev_crc: int | None = None
    epoch: int | None = None
    seen: int | None = None
    address: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.start <= MAX_ID:
            raise ValueError(f"bad REPLICATE start {self.start}")
        if self.prev_crc is not None and not 0 <= self.prev_crc <= 0xFFFFFFFF:
            raise ValueError(f"bad REPLICATE prev_crc {self.prev_crc}")
        if (self.epoch is None) != (self.seen is None) or (self.epoch is not None and self.prev_crc is None):
            raise ValueError("REPLICATE takes <epoch> and <seen> together, after <prev_crc>")
        for value in (self.epoch, self.seen):
            if value is not None and not 0 <= value <= MAX_ID:
                raise ValueError(f"bad REPLICATE epoch {value}")
        if self.address is not None and (self.seen is None or not valid_address(self.address)):
            raise ValueError(f"bad REPLICATE address {self.address[:70]!r}: HOST:PORT, after <epoch> <seen>")


@dataclass(frozen=True, slots=True)
class Head:
    """``HEAD``: ask for the commit point."""


@dataclass(frozen=True, slots=True)
class Ping:
    """``PING``: answered by ``PONG``."""


@dataclass(frozen=True, slots=True)
class Stats:
    """``STATS``: answered by ``OK <n>`` and n ``<name> <value>`` lines."""


@dataclass(frozen=True, slots=True)
class Close:
    """``CLOSE``: ``OK``, then the server closes the connection."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """``SHUTDOWN``: stop the server gracefully (if it allows it)."""


@dataclass(frozen=True, slots=True)
class Ack:
    """``ACK <id>``: a replica reports, on its REPLICATE connection, what it holds.

    The leader sends no reply to it.
    """

    id: int

    def __post_init__(self) -> None:
        if not 0 <= self.id <= MAX_ID:
            raise ValueError(f"bad ACK id {self.id}")


@dataclass(frozen=True, slots=True)
class Refuse:
    """``REFUSE``: make a leader read-only."""


@dataclass(frozen=True, slots=True)
class Accept:
    """``ACCEPT [<next_id>] [min_replicas=<n>]``: promote a follower to leader (only if its next id
    is ``next_id``, if given), with ``min_replicas`` in place of the setting it would keep."""

    next_id: int | None = None
    min_replicas: int | None = None

    def __post_init__(self) -> None:
        if self.next_id is not None and not 1 <= self.next_id <= MAX_ID:
            raise ValueError(f"bad ACCEPT next id {self.next_id}")
        if self.min_replicas is not None and not 0 <= self.min_replicas <= MAX_ID:
            raise ValueError(f"bad ACCEPT min_replicas {self.min_replicas}")


@dataclass(frozen=True, slots=True)
class Commit:
    """``COMMIT <name> <id>``: move the named cursor forward to ``id`` (answered ``OK``)."""

    name: str
    id: int

    def __post_init__(self) -> None:
        if not valid_name(self.name):
            raise ValueError(f"bad cursor name {self.name[:70]!r}: 1 to 64 of A-Z a-z 0-9 . _ -")
        if not 0 <= self.id <= MAX_ID:
            raise ValueError(f"bad COMMIT id {self.id}")


@dataclass(frozen=True, slots=True)
class Cursor:
    """``CURSOR <name>``: the cursor's id (``OK 0`` for a name never committed)."""

    name: str

    def __post_init__(self) -> None:
        if not valid_name(self.name):
            raise ValueError(f"bad cursor name {self.name[:70]!r}: 1 to 64 of A-Z a-z 0-9 . _ -")


@dataclass(frozen=True, slots=True)
class Drop:
    """``DROP <name>``: delete the named cursor (``ERR NOT_FOUND`` when there is none)."""

    name: str

    def __post_init__(self) -> None:
        if not valid_name(self.name):
            raise ValueError(f"bad cursor name {self.name[:70]!r}: 1 to 64 of A-Z a-z 0-9 . _ -")


@dataclass(frozen=True, slots=True)
class Cursors:
    """``CURSORS [<limit> [<after>]]``: ``OK <n>`` and n ``<name> <id>`` lines sorted by name, as STATS.

    ``limit`` 0 (bare ``CURSORS``): every cursor, if there are at most `CURSORS_MAX`;
    otherwise a page: at most ``limit`` cursors whose names sort after ``after``.
    """

    limit: int = 0
    after: str | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.limit <= CURSORS_MAX:
            raise ValueError(f"CURSORS limit must be 1 to {CURSORS_MAX}, not {self.limit}")
        if self.after is not None and (not self.limit or not valid_name(self.after)):
            raise ValueError(f"bad CURSORS after {self.after[:70]!r}")


@dataclass(frozen=True, slots=True)
class RefusedMsg:
    """Not a command: what the parser yields for a MSG this connection may not send (before AUTH,
    or a role without MSG). Its bodies were skipped unread; it is answered ``ERR DENIED`` in turn."""


@dataclass(frozen=True, slots=True)
class Auth:
    """``AUTH <token>``: authenticate this connection (protocol.md 3.7). The token is never shown."""

    token: bytes = field(repr=False)


Command = (
    Msg | Read | Replicate | Head | Ping | Stats | Close | Shutdown | Ack | Refuse | Accept | Commit | Cursor | Cursors
    | Drop | Auth
)

# Building a Msg through its slot setter skips the frozen dataclass __init__
# (object.__setattr__ per field), which costs as much as parsing the command.
_new = object.__new__
_set_msg_bodies = Msg.__dict__["bodies"].__set__

# Commands without arguments carry no state, so one instance of each serves all.
_NO_ARGS: dict[bytes, Command] = {
    b"HEAD": Head(),
    b"PING": Ping(),
    b"STATS": Stats(),
    b"CLOSE": Close(),
    b"SHUTDOWN": Shutdown(),
    b"REFUSE": Refuse(),
    b"ACCEPT": Accept(),
    b"CURSORS": Cursors(),
}





def encode_msg(bodies: Sequence[bytes]) -> bytes:
    """``MSG <len> ...`` followed by each body and CRLF: one bytes object to write."""
    if not bodies:
        raise ValueError("MSG needs at least one body")
    parts = [b"MSG %s\r\n" % b" ".join([b"%d" % len(body) for body in bodies])]
    for body in bodies:
        parts.append(body)
        parts.append(b"\r\n")
    return b"".join(parts)


def encode_command(cmd: Command) -> bytes:
    """The bytes of any command."""
    if isinstance(cmd, Msg):
        return encode_msg(cmd.bodies)
    if isinstance(cmd, Read):
        if cmd.limit:
            return b"READ %d %d\r\n" % (cmd.start, cmd.limit)
        return b"READ %d\r\n" % cmd.start
    if isinstance(cmd, Replicate):
        if cmd.prev_crc is None:
            return b"REPLICATE %d\r\n" % cmd.start
        if cmd.epoch is not None and cmd.seen is not None:
            line = b"REPLICATE %d %08x %d %d" % (cmd.start, cmd.prev_crc, cmd.epoch, cmd.seen)
            return line + (b" %s\r\n" % cmd.address.encode("ascii") if cmd.address else b"\r\n")
        return b"REPLICATE %d %08x\r\n" % (cmd.start, cmd.prev_crc)
    if isinstance(cmd, Accept) and (cmd.next_id is not None or cmd.min_replicas is not None):
        words = [b"ACCEPT"]
        if cmd.next_id is not None:
            words.append(b"%d" % cmd.next_id)
        if cmd.min_replicas is not None:
            words.append(b"min_replicas=%d" % cmd.min_replicas)
        return b" ".join(words) + b"\r\n"
    if isinstance(cmd, Ack):
        return b"ACK %d\r\n" % cmd.id
    if isinstance(cmd, Commit):
        return b"COMMIT %s %d\r\n" % (cmd.name.encode("ascii"), cmd.id)
    if isinstance(cmd, Cursor):
        return b"CURSOR %s\r\n" % cmd.name.encode("ascii")
    if isinstance(cmd, Cursors) and cmd.limit:
        if cmd.after is None:
            return b"CURSORS %d\r\n" % cmd.limit
        return b"CURSORS %d %s\r\n" % (cmd.limit, cmd.after.encode("ascii"))
    if isinstance(cmd, Drop):
        return b"DROP %s\r\n" % cmd.name.encode("ascii")
    if isinstance(cmd, Auth):
        if not cmd.token or any(c in cmd.token for c in b" \r\n"):
            raise ValueError("a token is one word, without spaces or line ends")
        return b"AUTH %s\r\n" % cmd.token
    return _NO_ARGS_BYTES[type(cmd)]


_NO_ARGS_BYTES: dict[type, bytes] = {type(cmd): name + b"\r\n" for name, cmd in _NO_ARGS.items()}

# The longest line a server must parse from its clients, terminator included: REPLICATE
# with every argument and the longest address a follower may name itself by (342 bytes;
# COMMIT with the longest name and id is 93, AUTH with a `logd token` token 50).
# `max_line_bytes` may not be set below it.
LONGEST_COMMAND = max(
    len(encode_command(Commit("n" * MAX_NAME, MAX_ID))),
    len(encode_command(Replicate(MAX_ID, 0xFFFFFFFF, MAX_ID, MAX_ID, "h" * MAX_HOST_CHARS + ":65535"))),
)
