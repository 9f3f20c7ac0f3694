"""The sink's position shown on the server: a named cursor ``sink.<name>``, advisory only.

The database's checkpoint is where a sink resumes; the cursor only lets the
server show how far each sink has got (`logd cursors`, STATS
``cursor_sink.<name>_lag``, the metrics), and, with
``--retention-keep-cursors``, keeps the records a sink has still to deliver.

Delivery never waits for it: the pipeline only stores the last id it
committed (`delivered`), and a thread of its own, with its own connection
and no retries, commits that to the cursor at most once per `interval`. A
refused or failed commit is logged (once per kind of error) and tried again
at the next interval; ``ERR STALE`` (the cursor is ahead, e.g. after the
database was restored to an older state) is expected and only logged.
"""

from __future__ import annotations

import threading
from typing import Any

import structlog

from .. import errors
from ..client import NO_RETRY, Client

__all__ = ["CursorReport", "cursor_name"]

log = structlog.get_logger("logd.sink")

INTERVAL_S = 1.0  # at most one COMMIT per second
TIMEOUT_S = 5.0  # per COMMIT: a slow server delays only the next report


def cursor_name(sink_name: str) -> str:
    """The server-side cursor of the sink named ``sink_name`` (sink names are valid cursor names)."""
    return f"sink.{sink_name}"


class CursorReport:
    """Commits the sink's delivered position to ``sink.<name>`` on the server, in the background."""

    def __init__(self, sink_name: str, url: str, *, token: str | None = None, ssl_context: Any = None,
                 interval: float = INTERVAL_S, timeout: float = TIMEOUT_S) -> None:
        self.name = cursor_name(sink_name)
        self.interval = interval
        self._client_args = {"timeout": timeout, "retry": NO_RETRY, "token": token, "ssl_context": ssl_context}
        self._url = url
        self._latest = 0  # set by the pipeline (one int store: no lock needed)
        self.reported = 0  # the last id the server accepted (or was already past)
        self._logged: set[str] = set()  # error kinds already logged: one warning each, not one per second
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="logd-sink-cursor", daemon=True)
        self._thread.start()

    def delivered(self, last_id: int) -> None:
        """The database committed everything up to ``last_id`` (returns at once)."""
        self._latest = last_id

    def close(self) -> None:
        """Report the last position once more (bounded by the timeout), then stop."""
        self._closing.set()
        self._thread.join(self.interval + 3 * float(self._client_args["timeout"]))  # connect + COMMIT, bounded

    def _run(self) -> None:
        client: Client | None = None
        try:
            while True:
                closing = self._closing.wait(self.interval)
                latest = self._latest
                if latest > self.reported:
                    if client is None:
                        client = Client.from_url(self._url, **self._client_args)
                    if not self._commit(client, latest):
                        client.close()
                        client = None
                if closing:
                    return
        finally:
            if client is not None:
                client.close()

    def _commit(self, client: Client, last_id: int) -> bool:
        """COMMIT the cursor; False if the connection is best thrown away."""
        try:
            client.commit(self.name, last_id)
        except errors.StaleCursorError as exc:
            self.reported = last_id  # the cursor is ahead already: nothing to do until the sink passes it
            self._once("stale", "sink_cursor_ahead", cursor=self.name, last_id=last_id, error=str(exc))
            return True
        except errors.LogdError as exc:
            self._once(type(exc).__name__, "sink_cursor_not_reported", cursor=self.name, error=str(exc),
                       error_type=type(exc).__name__)
            return False
        except OSError as exc:  # the connection itself (TLS set-up, a reset): as any failure, next time
            self._once("OSError", "sink_cursor_not_reported", cursor=self.name, error=str(exc))
            return False
        self.reported = last_id
        return True

    def _once(self, kind: str, event: str, **fields: Any) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning(event, **fields)
