"""The sink's loop: read a batch from the log, deliver it with its position, report, repeat.

Every step (connecting, reading, delivering) is retried with jittered
exponential backoff (tenacity) while the database or logd is unreachable,
with a warning per attempt; the backoff starts afresh at each step, so a
sink that made progress does not inherit a long wait. A failed delivery
closes the database connection and the next attempt starts a new
transaction that reads the position again (`Target.begin`), so a commit lost
with its connection is never repeated. `stop()` (the CLI calls it on
SIGTERM) lets the batch in hand be delivered and committed, then `run`
returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog
import tenacity

from .. import errors
from ..client import Retry, parse_url
from ..protocol import RecordRow
from .cursor import CursorReport
from .deliver import deliver
from .errors import DatabaseUnavailableError, GaveUpError
from .rows import Mapper, json_mapper, map_records, raw_mapper
from .source import POLL_S, LogSource, Prefetcher, Reader
from .status import Progress, StatusReporter
from .target import Target, TargetSpec, open_target

__all__ = ["Sink", "SinkConfig"]

log = structlog.get_logger("logd.sink")
T = TypeVar("T")
MAX_LOGGED_DEAD = 10  # dead letters logged one by one per batch; the rest as a count


@dataclass(frozen=True)
class SinkConfig:
    """Everything a sink is told (the CLI flags, one to one)."""

    target: str  # sqlite:///file.db, postgresql://..., clickhouse://host:8123/db
    table: str
    url: str = field(default="logd://127.0.0.1:1774", repr=False)  # may carry a token
    name: str = "default"
    format: str = "raw"  # raw | json
    create: bool = False
    batch: int = 10_000  # most records per transaction
    linger_ms: float = 200.0  # longest wait for a batch to fill once its first record is in
    once: bool = False  # stop at the head seen at start
    on_error: str = "dead-letter"  # or "stop"
    timeout: float = 10.0  # seconds per logd call
    retry_initial_s: float = 0.1
    retry_max_s: float = 10.0
    json_status: str | None = None
    status_interval_s: float | None = None  # None: 0.5 on a terminal, else 5
    token: str | None = field(default=None, repr=False)  # for logd, when the URL carries none
    ssl_context: Any = None  # for a logds:// URL (None: the system's CAs)
    report_cursor: bool = True  # show the position on the server as the cursor sink.<name> (advisory)
    give_up_after_s: float | None = None  # stop retrying a step after this long (None: retry forever)

    def __post_init__(self) -> None:
        if self.format not in ("raw", "json"):
            raise ValueError(f"format is raw or json, not {self.format!r}")
        if self.on_error not in ("dead-letter", "stop"):
            raise ValueError(f"on_error is dead-letter or stop, not {self.on_error!r}")
        if self.batch < 1:
            raise ValueError("batch must be >= 1")
        if self.give_up_after_s is not None and self.give_up_after_s <= 0:
            raise ValueError("give_up_after_s must be > 0")


def _transient(exc: BaseException) -> bool:
    """Worth retrying: the database or logd is unreachable, busy or slow."""
    return isinstance(
        exc, DatabaseUnavailableError | errors.ConnectionError | errors.TimeoutError | errors.BusyError
        | errors.IdleTimeoutError | errors.UnavailableError
    )


class Sink:
    """Drains a logd log into a database table, exactly once (see logd.sink).

    ``mapper`` turns a record into the columns it fills (default: by
    ``config.format``); it raises ValueError for a body it cannot map.
    ``target`` replaces the one ``config.target`` names (tests, custom targets).
    """

    def __init__(
        self,
        config: SinkConfig,
        *,
        mapper: Mapper | None = None,
        target: Target | None = None,
        reporter: StatusReporter | None = None,
    ) -> None:
        parse_url(config.url)  # a bad logd URL is the caller's mistake: ValueError now, not a retry loop later
        self.config = config
        self.mapper = mapper or (json_mapper if config.format == "json" else raw_mapper)
        spec = TargetSpec(config.table, config.name, config.create, json=self.mapper is not raw_mapper)
        self.target = target or open_target(config.target, spec)
        self.progress = Progress(config.name, self.target.describe(), config.table)
        self.reporter = reporter or StatusReporter(
            self.progress, json_path=config.json_status, interval=config.status_interval_s
        )
        self._stopping = False
        self._give_up_at = float("inf")  # when the step being retried gives up (--give-up-after)
        self._target_open = False
        self._reader: Reader | None = None
        self.cursor: CursorReport | None = None
        self._logd_retry = Retry(attempts=4, initial=config.retry_initial_s, maximum=config.retry_max_s)

    def stop(self) -> None:
        """Finish the batch in hand, commit it, and return from `run` (safe from a signal handler)."""
        self._stopping = True

    @property
    def stopping(self) -> bool:
        return self._stopping

    def run(self) -> Progress:
        """Deliver until the head seen at start (``once``) or until `stop`; return the figures."""
        c = self.config
        if c.report_cursor:
            self.cursor = CursorReport(c.name, c.url, token=c.token, ssl_context=c.ssl_context)
        try:
            self._step(self._open)
            if self.cursor is not None:
                self.cursor.delivered(self.progress.last_id)
            self.progress.state = "running"
            while not self._stopping:
                records = self._step(self._read)
                if records is None:  # --once: everything up to the head seen at start is delivered
                    break
                if records:
                    self._step(self._deliver, records)
                self._tick()
            self.progress.state = "stopped"
        except BaseException as exc:
            self.progress.state = "failed"
            self.progress.error = str(exc) or type(exc).__name__
            raise
        finally:
            self._close()
            self.reporter.close()
            if self.cursor is not None:
                self.cursor.close()
        log.info("sink_stopped", name=self.config.name, last_id=self.progress.last_id,
                 delivered=self.progress.delivered, dead_letters=self.progress.dead_letters)
        return self.progress

    def stopping_now(self) -> bool:
        return self._stopping

    # --- steps, each retried while something is unreachable ---------------------------

    def _step(self, fn: Callable[..., T], *args: Any) -> T:
        give_up = self.config.give_up_after_s
        self._give_up_at = float("inf") if give_up is None else time.monotonic() + give_up
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(_transient),
            wait=tenacity.wait_random_exponential(multiplier=self.config.retry_initial_s, max=self.config.retry_max_s),
            # After a stop request report the failure instead of waiting; likewise once the step's time is up.
            stop=lambda state: self._stopping or time.monotonic() >= self._give_up_at,
            before_sleep=self._retrying,
            sleep=self._sleep,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    return fn(*args)
        except BaseException as exc:
            if _transient(exc) and not self._stopping and time.monotonic() >= self._give_up_at:
                raise GaveUpError(f"gave up after {give_up:g} s of retrying: {exc}") from exc
            raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _retrying(self, state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        self.progress.state = "retrying"
        self.progress.error = str(exc)
        log.warning("sink_retrying", name=self.config.name, attempt=state.attempt_number,
                    wait_s=round(wait, 3), error=str(exc), error_type=type(exc).__name__)
        if isinstance(exc, DatabaseUnavailableError):
            self._close_target()
        else:
            self._close_source()
        self.reporter.tick()

    def _sleep(self, seconds: float) -> None:
        """Back off, looking at the stop flag now and then (a SIGTERM need not wait out the backoff)."""
        deadline = min(time.monotonic() + seconds, self._give_up_at)  # no backoff past --give-up-after
        while not self._stopping and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, POLL_S))

    def _open(self) -> None:
        """Open the target and learn where to start: right after its position."""
        if not self._target_open:
            self.target.open()
            self._target_open = True
        position = self.target.position()
        self.progress.last_id = position
        log.info("sink_started", name=self.config.name, target=self.target.describe(), table=self.config.table,
                 position=position, once=self.config.once)

    def _reader_ready(self) -> Reader:
        if self._reader is None:
            c = self.config
            source = LogSource(c.url, self.progress.last_id + 1 if self.progress.last_id else 0,
                               follow=not c.once, timeout=c.timeout, retry=self._logd_retry,
                               token=c.token, ssl_context=c.ssl_context)
            try:
                source.begin()
            except BaseException:
                source.close()
                raise
            self.progress.head = source.stop_at or self.progress.head
            kind = Prefetcher if self.target.reads_ahead else Reader
            self._reader = kind(source, c.batch, c.linger_ms / 1000, self.stopping_now)
        return self._reader

    def _read(self) -> list[RecordRow] | None:
        return self._reader_ready().get()

    def _deliver(self, records: list[RecordRow]) -> None:
        if not self._target_open:
            self.target.open()
            self._target_open = True
        target = self.target
        position = target.begin()
        first, last = records[0][0], records[-1][0]
        if position >= last:  # all delivered already (a commit whose reply was lost)
            target.rollback()
            self._delivered(position, 0, [])
            return
        if position + 1 < first:  # the database is behind what we read: read again from there
            target.rollback()
            log.warning("sink_repositioned", name=self.config.name, position=position, expected=first - 1)
            self._close_source()
            self.progress.last_id = position
            return
        records = records[position + 1 - first :]
        rows, unmapped = map_records(records, self.mapper, target.columns)
        done = deliver(target, rows, unmapped, last, self.config.on_error == "stop")
        self._delivered(last, done.rows, done.dead)

    def _delivered(self, last_id: int, rows: int, dead: list[Any]) -> None:
        p = self.progress
        p.last_id = last_id
        if self.cursor is not None:
            self.cursor.delivered(last_id)
        p.delivered += rows
        p.dead_letters += len(dead)
        p.state = "running"
        p.error = ""
        for letter in dead[:MAX_LOGGED_DEAD]:
            log.warning("sink_dead_letter", name=self.config.name, id=letter.id, error=letter.error)
        if len(dead) > MAX_LOGGED_DEAD:
            log.warning("sink_dead_letters", name=self.config.name, more=len(dead) - MAX_LOGGED_DEAD)

    def _tick(self) -> None:
        if self.reporter.due() and self._reader is not None:
            try:
                self.progress.head = self._reader.source.head()
            except errors.LogdError:
                pass  # only for the lag figure; the next read says whether logd is really gone
        self.reporter.tick()

    # --- closing ----------------------------------------------------------------------

    def _close_target(self) -> None:
        self._target_open = False
        try:
            self.target.close()
        except Exception:  # noqa: BLE001 - the connection is being thrown away
            pass

    def _close_source(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _close(self) -> None:
        self._close_source()
        self._close_target()
