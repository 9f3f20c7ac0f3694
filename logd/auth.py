"""Tokens and roles (protocol.md section 3.7): the auth file, hashing, which role may send what.

Pure logic: no sockets, no event loop. The server loads an `AuthTable` from
``--auth-file`` (and again on SIGHUP), each connection keeps its own
`access.ConnectionAuth`, and ``logd token add|list|remove`` edits the file
through `add_token` / `remove_token`.

The file holds one token per line, ``<name> <role> sha256:<64 hex digits>``;
``#`` starts a comment. Only the hash of a token is stored: a token is 32
random bytes (``secrets.token_urlsafe(32)``), so a plain SHA-256 cannot be
brute-forced and no slow, salted hash is needed (GitHub and PyPI store API
tokens the same way).
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
    "# logd auth file: one token per line, '<name> <role> sha256:<hash of the token>'.\n"
    "# Edit with `logd token add|list|remove`; a running server rereads it on SIGHUP.\n"
)

# Commands anyone may send, authenticated or not.
OPEN_COMMANDS: frozenset[type] = frozenset({Ping, Auth, Close})
# A consumer with a read token keeps its place: the named cursors (COMMIT, CURSOR, CURSORS) are read's.
_READ: frozenset[type] = frozenset({Read, Head, Stats, Commit, Cursor, Cursors})
# What each role may send besides OPEN_COMMANDS. admin may send everything.
ROLE_COMMANDS: dict[str, frozenset[type]] = {
    "read": _READ,
    "write": _READ | {Msg},
    "replicate": _READ | {Replicate, Ack},
    "admin": _READ | {Msg, Replicate, Ack, Refuse, Accept, Shutdown},
}
# Commands that change the server's role or stop it: logged with peer and token name.
AUDITED_COMMANDS: frozenset[type] = frozenset({Refuse, Accept, Shutdown})
VERBS: dict[type, str] = {
    Msg: "MSG", Read: "READ", Replicate: "REPLICATE", Ack: "ACK", Refuse: "REFUSE", Accept: "ACCEPT",
    Head: "HEAD", Ping: "PING", Stats: "STATS", Close: "CLOSE", Shutdown: "SHUTDOWN", Auth: "AUTH",
    Commit: "COMMIT", Cursor: "CURSOR", Cursors: "CURSORS",
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


@dataclass(frozen=True)
class TokenEntry:
    """One line of the auth file."""

    name: str
    role: str
    digest: str  # "sha256:<hex>"


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
        lines = [f"{e.name} {e.role} {e.digest}\n" for e in self.entries.values()]
        return FILE_HEADER + "".join(lines)


def parse_table(text: str, where: str = "auth file") -> AuthTable:
    """Parse the auth file's text; AuthFileError naming the first bad line."""
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 3:
            raise AuthFileError(f"{where} line {number}: expected '<name> <role> sha256:<hash>'")
        name, role, digest = fields
        if not NAME.fullmatch(name):
            raise AuthFileError(f"{where} line {number}: bad token name {name!r}")
        if role not in ROLES:
            raise AuthFileError(f"{where} line {number}: unknown role {role!r} (one of {', '.join(ROLES)})")
        hexpart = digest[len(HASH_PREFIX):]
        if not digest.startswith(HASH_PREFIX) or len(hexpart) != 64 or hexpart.strip("0123456789abcdef"):
            raise AuthFileError(f"{where} line {number}: the hash must be sha256: and 64 lowercase hex digits")
        entries.append(TokenEntry(name, role, digest))
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


def add_token(path: str, name: str, role: str) -> str:
    """Add a token named ``name`` with ``role`` (creating the file if needed); return the token."""
    if not NAME.fullmatch(name):
        raise AuthFileError(f"bad token name {name!r}: letters, digits and _ . @ - (at most 64)")
    if role not in ROLES:
        raise AuthFileError(f"unknown role {role!r} (one of {', '.join(ROLES)})")
    table = load_table(path) if os.path.exists(path) else AuthTable()
    if name in table.entries:
        raise AuthFileError(f"a token named {name!r} already exists in {path}; remove it first")
    token = new_token()
    table.entries[name] = TokenEntry(name, role, token_hash(token))
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
