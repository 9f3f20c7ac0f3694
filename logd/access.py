"""Who may send what on one connection: the AUTH command and the role check (protocol.md 3.7).

`AuthGate` is the server's: the current `auth.AuthTable` (None: authentication
is off), replaced on SIGHUP, and the rate limit on the log lines of failed
AUTHs. `ConnectionAuth` is one connection's: its token's entry (role, name,
cursor grant) and failed attempts. The connection asks it about every command
whose type is not in ``allowed`` (a set it can test cheaply per command);
`check` then answers AUTH, refuses what the role may not send and a COMMIT or
DROP of a cursor the token does not own, and logs REFUSE/ACCEPT/SHUTDOWN.
No sockets, no event loop: a sans-IO session calls it the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from . import protocol
from .auth import (
    AUDITED_COMMANDS,
    MAX_FAILURES,
    OWNED_COMMANDS,
    VERBS,
    AuthTable,
    TokenEntry,
    allowed_commands,
)
from .errors import DeniedError
from .protocol.session import PARSE_ERRORS, Hangup

log = structlog.get_logger("logd.auth")

LOG_WINDOW_S = 10.0  # failed-AUTH log lines: at most LOG_BURST per window, then one summary
LOG_BURST = 10
OK = protocol.ok()


class LogLimiter:
    """At most ``burst`` log lines per ``window`` seconds; counts what it held back."""

    def __init__(self, burst: int = LOG_BURST, window: float = LOG_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.window = window
        self.clock = clock
        self.window_start = -window
        self.used = 0
        self.suppressed = 0

    def allow(self) -> tuple[bool, int]:
        """(whether to log this one, how many were held back in the window that just ended)."""
        now = self.clock()
        held = 0
        if now - self.window_start >= self.window:
            held, self.suppressed = self.suppressed, 0
            self.window_start = now
            self.used = 0
        if self.used < self.burst:
            self.used += 1
            return True, held
        self.suppressed += 1
        return False, held


class AuthGate:
    """Server-wide: the tokens accepted now (None: authentication off) and the failure log's limit."""

    def __init__(self, table: AuthTable | None) -> None:
        self.table = table
        self.failure_log = LogLimiter()
        self.timeout_log = LogLimiter()

    @property
    def enabled(self) -> bool:
        return self.table is not None

    def log_failure(self, peer: str, failures: int, closing: bool) -> None:
        allowed, held = self.failure_log.allow()
        if held:
            log.warning("auth_failures_not_logged", count=held, window_s=self.failure_log.window)
        if allowed:
            # Never the token: only who tried and how often.
            log.warning("auth_failed", peer=peer, failures=failures, closing=closing)

    def log_timeout(self, peer: str, seconds: float) -> None:
        """A connection closed for not authenticating in time (--auth-timeout), rate-limited."""
        allowed, held = self.timeout_log.allow()
        if held:
            log.warning("auth_timeouts_not_logged", count=held, window_s=self.timeout_log.window)
        if allowed:
            log.warning("auth_timeout", peer=peer, seconds=seconds)


class ConnectionAuth:
    """One connection's authentication state: its token's entry (role, name, cursor grant), failed attempts.

    ``allowed`` holds the command types that need no call to `check`: those
    the role may send, minus AUTH, the audited ones and (unless every cursor
    is the connection's) COMMIT and DROP, whose cursor is checked each time.
    """

    __slots__ = ("gate", "peer", "role", "name", "digest", "entry", "failures", "closing", "allowed")

    def __init__(self, gate: AuthGate, peer: str = "?") -> None:
        self.gate = gate
        self.peer = peer  # host:port, for the log
        self.role: str | None = None
        self.name: str | None = None
        self.digest: str | None = None
        self.entry: TokenEntry | None = None
        self.failures = 0
        self.closing = False  # too many failures: reply, then close
        self.allowed: frozenset[type] = frozenset()
        self._refresh()

    @property
    def authenticated(self) -> bool:
        """A successful AUTH is in force, or authentication is off."""
        return self.role is not None or not self.gate.enabled

    def _refresh(self) -> None:
        kinds = allowed_commands(self.role, self.gate.enabled)
        if self.gate.enabled and self.role != "admin":
            kinds -= OWNED_COMMANDS
        self.allowed = (kinds - AUDITED_COMMANDS - {protocol.Auth}) | PARSE_ERRORS | {Hangup}

    def check(self, cmd: object) -> bytes | None:
        """The reply to AUTH or to a refused command; None when ``cmd`` goes ahead as usual
        (`protocol.session.Gate`). After a reply with ``closing`` set, the connection closes."""
        kind = type(cmd)
        if kind is protocol.Auth:
            return self._authenticate(cmd)  # type: ignore[arg-type]
        # admin (or no authentication) may send everything, commands added later included.
        if self.role == "admin" or not self.gate.enabled or kind in allowed_commands(self.role, True):
            if isinstance(cmd, protocol.Commit | protocol.Drop) and self.entry is not None:
                if not self.entry.owns(cmd.name):
                    return protocol.error_reply(self._not_owned(cmd))
            if kind in AUDITED_COMMANDS:
                log.warning("admin_command", command=VERBS[kind], peer=self.peer, token=self.name or "-")
            return None
        if self.role is None:
            return protocol.error_reply(DeniedError("authentication required"))
        return protocol.error_reply(DeniedError(f"role {self.role} may not send {VERBS.get(kind, kind.__name__)}"))

    def _not_owned(self, cmd: protocol.Commit | protocol.Drop) -> DeniedError:
        entry = self.entry
        assert entry is not None
        verb = "drop" if type(cmd) is protocol.Drop else "move"
        grant = ", ".join(entry.cursor_patterns) or "none"
        return DeniedError(f"token {entry.name} may not {verb} cursor {cmd.name} (its cursors: {grant})")

    def _authenticate(self, cmd: protocol.Auth) -> bytes:
        table = self.gate.table
        if table is None:
            # Authentication is off: every connection may already do everything,
            # so clients can be given tokens before the server asks for them.
            return OK
        entry = table.lookup(cmd.token)
        if entry is not None:
            self._take(entry)
            return OK
        # A failed AUTH leaves an earlier successful one in force.
        self.failures += 1
        self.closing = self.failures >= MAX_FAILURES
        self.gate.log_failure(self.peer, self.failures, self.closing)
        if self.closing:
            return protocol.error_reply(DeniedError(f"invalid token; {self.failures} failed attempts, closing"))
        return protocol.error_reply(DeniedError("invalid token"))

    def rebind(self, table: AuthTable) -> bool:
        """The auth file was reread: take the role the token has now; False if it was removed."""
        if self.digest is None:
            return True  # not authenticated: its next AUTH uses the new table
        entry = table.by_digest(self.digest)
        if entry is None:
            return False
        self._take(entry)
        return True

    def _take(self, entry: TokenEntry) -> None:
        self.entry = entry
        self.role, self.name, self.digest = entry.role, entry.name, entry.digest
        self._refresh()
