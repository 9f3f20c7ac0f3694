"""Tokens and roles (protocol.md section 3.7): the auth file, hashing, which role may send what.

Pure logic: no sockets, no event loop. The server loads an `AuthTable` from
``--auth-file`` (and again on SIGHUP), each connection keeps its own
`access.ConnectionAuth`, and ``logd token add|list|remove`` edits the file
through `add_token` / `remove_token`.

The file holds one token per line, ``<name> <role> sha256:<64 hex digits>
[cursors=<pattern>[,<pattern>...]]``; ``#`` starts a comment. Only the hash of
a token is stored: a token is 32 random bytes (``secrets.token_urlsafe(32)``),
so a plain SHA-256 cannot be brute-forced and no slow, salted hash is needed
(GitHub and PyPI store API tokens the same way).

The optional ``cursors=`` field is the token's cursor grant: the named cursors
it may move (COMMIT) and drop (DROP), each pattern a cursor name or a prefix
ending in ``*``. Without it a token owns the cursor named after it and those
starting ``<name>.``, as a Kafka ACL on a consumer group or a NATS durable
consumer bound to its user; ``admin`` owns every cursor (protocol.md 3.7).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import socket
from dataclasses import dataclass

from .errors import LogdError
from .protocol import (
    Accept,
    Ack,
    Auth,
    Close,
    Commit,
    Cursor,
    Cursors,
    Drop,
    Head,
    Msg,
    Ping,
    Read,
    Refuse,
    Replicate,
    Shutdown,
    Stats,
)
from .storage.files import fsync_dir, remove_quietly, write_all

ROLES = ("read", "write", "replicate", "admin")
MAX_FAILURES = 5  # failed AUTHs on one connection before it is closed
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
HASH_PREFIX = "sha256:"
FILE_HEADER = (
    "# logd auth file: one token per line, '<name> <role> sha256:<hash of the token> [cursors=<grant>]'.\n"
    "# Edit with `logd token add|list|remove`; a running server rereads it on SIGHUP.\n"
)
GRANT_PREFIX = "cursors="
# A pattern of a cursor grant: a cursor name, or a prefix of one ending in * (* alone: every cursor).
CURSOR_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}|[A-Za-z0-9._-]{0,63}\*")

# Commands anyone may send, authenticated or not.
OPEN_COMMANDS: frozenset[type] = frozenset({Ping, Auth, Close})
# A consumer with a read token keeps its place: the named cursors (COMMIT, CURSOR, CURSORS, DROP) are
# read's; which cursors a token may move or drop is its grant's (`TokenEntry.owns`).
_READ: frozenset[type] = frozenset({Read, Head, Stats, Commit, Cursor, Cursors, Drop})
# What each role may send besides OPEN_COMMANDS. admin may send everything.
ROLE_COMMANDS: dict[str, frozenset[type]] = {
    "read": _READ,
    "write": _READ | {Msg},
    "replicate": _READ | {Replicate, Ack},
    "admin": _READ | {Msg, Replicate, Ack, Refuse, Accept, Shutdown},
}
# Commands that change the server's role or stop it: logged with peer and token name.
AUDITED_COMMANDS: frozenset[type] = frozenset({Refuse, Accept, Shutdown})
# Commands that change a named cursor: allowed only on the cursors the token's grant covers.
OWNED_COMMANDS: frozenset[type] = frozenset({Commit, Drop})
VERBS: dict[type, str] = {
    Msg: "MSG", Read: "READ", Replicate: "REPLICATE", Ack: "ACK", Refuse: "REFUSE", Accept: "ACCEPT",
    Head: "HEAD", Ping: "PING", Stats: "STATS", Close: "CLOSE", Shutdown: "SHUTDOWN", Auth: "AUTH",
    Commit: "COMMIT", Cursor: "CURSOR", Cursors: "CURSORS", Drop: "DROP",
}


class AuthFileError(LogdError):
    """The auth file is missing, unreadable or malformed (the message names the line)."""


def token_hash(token: bytes | str) -> str:
    """``sha256:<hex>`` of a token: what the auth file stores."""
    data = token.encode() if isinstance(token, str) else token
    return HASH_PREFIX + hashlib.sha256(data).hexdigest()


def new_token() -> str:
    """A fresh random token (32 bytes, URL-safe base64: usable as is in a logd:// URL)."""
    return secrets.token_urlsafe(32)


def parse_grant(text: str) -> tuple[str, ...]:
    """A cursor grant, ``<pattern>[,<pattern>...]`` (empty: no cursor); ValueError naming a bad pattern."""
    if not text:
        return ()
    patterns = tuple(text.split(","))
    for pattern in patterns:
        if not CURSOR_PATTERN.fullmatch(pattern):
            raise ValueError(f"bad cursor pattern {pattern!r}: a cursor name (1 to 64 of A-Z a-z 0-9 . _ -), "
                             "or a prefix of one ending in *")
    return patterns


@dataclass(frozen=True)
class TokenEntry:
    """One line of the auth file."""

    name: str
    role: str
    digest: str  # "sha256:<hex>"
    grant: tuple[str, ...] | None = None  # cursor patterns (cursors=...); None: its own name, and name.*

    @property
    def cursor_patterns(self) -> tuple[str, ...]:
        """The cursors it may move and drop (``admin``: any, whatever this says)."""
        return self.grant if self.grant is not None else (self.name, self.name + ".*")

    def owns(self, cursor: str) -> bool:
        """Whether this token may move (COMMIT) and drop (DROP) the cursor named ``cursor``."""
        if self.role == "admin":
            return True
        for pattern in self.cursor_patterns:
            if cursor == pattern or (pattern[-1] == "*" and cursor.startswith(pattern[:-1])):
                return True
        return False

    def line(self) -> str:
        """Its line in the file."""
        grant = "" if self.grant is None else f" {GRANT_PREFIX}{','.join(self.grant)}"
        return f"{self.name} {self.role} {self.digest}{grant}\n"


class AuthTable:
    """The tokens a server accepts: name -> entry, and lookup of a presented token by its hash."""

    def __init__(self, entries: list[TokenEntry] | None = None) -> None:
        self.entries: dict[str, TokenEntry] = {}
        for entry in entries or []:
            if entry.name in self.entries:
                raise AuthFileError(f"token name {entry.name!r} appears twice")
            self.entries[entry.name] = entry

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, token: bytes | str) -> TokenEntry | None:
        """The entry whose hash matches ``token``, or None."""
        return self.by_digest(token_hash(token))

    def by_digest(self, digest: str) -> TokenEntry | None:
        """The entry with this hash. Every entry is compared, in constant time each,
        so the time taken says nothing about which one (if any) matched."""
        found = None
        wanted = digest.encode()
        for entry in self.entries.values():
            if hmac.compare_digest(entry.digest.encode(), wanted):
                found = entry
        return found

    def render(self) -> str:
        """The file's text."""
        return FILE_HEADER + "".join(e.line() for e in self.entries.values())


def parse_table(text: str, where: str = "auth file") -> AuthTable:
    """Parse the auth file's text; AuthFileError naming the first bad line."""
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) not in (3, 4):
            raise AuthFileError(f"{where} line {number}: expected '<name> <role> sha256:<hash> [cursors=<grant>]'")
        name, role, digest = fields[:3]
        if not NAME.fullmatch(name):
            raise AuthFileError(f"{where} line {number}: bad token name {name!r}")
        if role not in ROLES:
            raise AuthFileError(f"{where} line {number}: unknown role {role!r} (one of {', '.join(ROLES)})")
        hexpart = digest[len(HASH_PREFIX):]
        if not digest.startswith(HASH_PREFIX) or len(hexpart) != 64 or hexpart.strip("0123456789abcdef"):
            raise AuthFileError(f"{where} line {number}: the hash must be sha256: and 64 lowercase hex digits")
        grant = None
        if len(fields) == 4:
            if not fields[3].startswith(GRANT_PREFIX):
                raise AuthFileError(f"{where} line {number}: the fourth field must be cursors=<pattern>[,...]")
            try:
                grant = _grant_for(role, fields[3][len(GRANT_PREFIX):])
            except ValueError as exc:
                raise AuthFileError(f"{where} line {number}: {exc}") from None
        entries.append(TokenEntry(name, role, digest, grant))
    return AuthTable(entries)


def load_table(path: str) -> AuthTable:
    """Read and parse the auth file at ``path``."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthFileError(f"cannot read auth file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_table(text, path)


def loose_permissions(path: str) -> bool:
    """Whether group or others may read or write the auth file (worth a warning)."""
    try:
        return bool(os.stat(path).st_mode & 0o077)
    except OSError:
        return False


def save_table(path: str, table: AuthTable) -> None:
    """Write the file atomically with mode 0600 (temporary file, fsync, rename, fsync of the directory).

    Every byte is written before the rename (a short write on a full disk
    raises), so a failure leaves the old file as it was.
    """
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # also when tmp existed with other bits
            write_all(fd, table.render().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        remove_quietly(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")


def _grant_for(role: str, text: str) -> tuple[str, ...]:
    """The grant ``text`` parses to, for a token of ``role``; ValueError if it is bad or meaningless."""
    if role == "admin":
        raise ValueError("an admin token may move and drop every cursor: a cursors= grant means nothing there")
    return parse_grant(text)


def add_token(path: str, name: str, role: str, cursors: str | None = None) -> str:
    """Add a token named ``name`` with ``role`` and, if given, the cursor grant ``cursors``
    (``<pattern>[,<pattern>...]``), creating the file if needed; return the token."""
    if not NAME.fullmatch(name):
        raise AuthFileError(f"bad token name {name!r}: letters, digits and _ . @ - (at most 64)")
    if role not in ROLES:
        raise AuthFileError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
    try:
        grant = None if cursors is None else _grant_for(role, cursors)
    except ValueError as exc:
        raise AuthFileError(str(exc)) from None
    table = load_table(path) if os.path.exists(path) else AuthTable()
    if name in table.entries:
        raise AuthFileError(f"a token named {name!r} already exists in {path}; remove it first")
    token = new_token()
    table.entries[name] = TokenEntry(name, role, token_hash(token), grant)
    save_table(path, table)
    return token


def remove_token(path: str, name: str) -> None:
    """Remove the token named ``name``; AuthFileError if there is none."""
    table = load_table(path)
    if table.entries.pop(name, None) is None:
        raise AuthFileError(f"no token named {name!r} in {path}")
    save_table(path, table)


def allowed_commands(role: str | None, auth_on: bool) -> frozenset[type]:
    """The command types a connection with ``role`` (None: not authenticated) may send."""
    if not auth_on:
        return ROLE_COMMANDS["admin"] | OPEN_COMMANDS
    if role is None:
        return OPEN_COMMANDS
    return ROLE_COMMANDS[role] | OPEN_COMMANDS


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` is reachable from this machine only.

    A name counts as loopback only if every address it resolves to is one
    ("localhost"); "", "0.0.0.0" and "::" mean every interface.
    """
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)
