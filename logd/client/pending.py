"""`PendingId`: what the blocking `Producer.send` returns, the id of a message once acknowledged.

A `concurrent.futures.Future` builds a `threading.Condition` and two lists
per instance: about nine GC-tracked objects per message, which at a few
hundred thousand messages a second made the cyclic GC the producer's main
cost. A `PendingId` is three slots until someone waits on it or adds a
callback; only then does it get an event or a callback list.

One module-wide lock orders that slow path against resolution: whoever
waits or adds a callback does so under the lock, and the producer's
acknowledgement thread resolves a whole batch of handles under it at once
(one acquire per MSG, not per message). Events are set and callbacks run
after the lock is released, in the thread that resolved the handle (or, for
a callback added to a finished handle, at once in the caller's thread), as
`concurrent.futures` does. A handle cannot be cancelled: a message handed to
the producer cannot be taken back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import structlog

from .. import errors

__all__ = ["PendingId", "resolve_batch"]

log = structlog.get_logger("logd.client")

# Guards the slow-path state of every handle: `_event`, `_callbacks`, and the
# pair (`_done`, outcome) while a handle is being resolved.
_LOCK = threading.Lock()


class PendingId:
    """The id a message will get: `result` waits for it, `done` tells whether it is known.

    Resolved only by the producer (`resolve_batch`), exactly once, to an id
    or to the `errors.LogdError` that failed the message's batch.
    """

    __slots__ = ("_done", "_outcome", "_event", "_callbacks")

    def __init__(self) -> None:
        self._done = False
        self._outcome: int | BaseException | None = None
        self._event: threading.Event | None = None
        self._callbacks: list[Callable[[PendingId], object]] | None = None

    def __repr__(self) -> str:
        state = f"finished {self._outcome!r}" if self._done else "pending"
        return f"<PendingId {state}>"

    def done(self) -> bool:
        """Whether the outcome (an id or an error) is known."""
        return self._done

    def cancel(self) -> bool:
        """A message handed to the producer cannot be taken back: always False."""
        return False

    def cancelled(self) -> bool:
        """Never: see `cancel`."""
        return False

    def result(self, timeout: float | None = None) -> int:
        """The message's id, waiting up to ``timeout`` seconds (None: no limit).

        Raises the error that failed the message, or `errors.TimeoutError`.
        """
        outcome = self._outcome if self._done else self._wait(timeout)
        if isinstance(outcome, BaseException):
            raise outcome
        assert outcome is not None
        return outcome

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The error that failed the message, or None once it has an id; waits like `result`."""
        outcome = self._outcome if self._done else self._wait(timeout)
        return outcome if isinstance(outcome, BaseException) else None

    def add_done_callback(self, fn: Callable[[PendingId], object]) -> None:
        """Call ``fn(self)`` once the outcome is known: now if it is, else in the resolving thread."""
        with _LOCK:
            if not self._done:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(fn)
                return
        _call(fn, self)

    def _wait(self, timeout: float | None) -> int | BaseException | None:
        with _LOCK:
            if not self._done:
                if self._event is None:
                    self._event = threading.Event()
                event = self._event
            else:
                event = None
        if event is not None and not event.wait(timeout):
            raise errors.TimeoutError(f"no acknowledgement within {timeout} s")
        return self._outcome


def resolve_batch(handles: Sequence[PendingId], outcome: int | errors.LogdError) -> None:
    """Resolve a batch's handles: ids from ``outcome`` on (an int), or every one failed with it.

    A handle already resolved is left as it is.
    """
    woken: list[PendingId] = []
    with _LOCK:
        for i, handle in enumerate(handles):
            if handle._done:
                continue
            handle._outcome = outcome if isinstance(outcome, BaseException) else outcome + i
            handle._done = True  # after the outcome: a reader that sees done sees it
            if handle._event is not None or handle._callbacks is not None:
                woken.append(handle)
    for handle in woken:
        if handle._event is not None:
            handle._event.set()
        for fn in handle._callbacks or ():
            _call(fn, handle)
        handle._callbacks = None


def _call(fn: Callable[[PendingId], object], handle: PendingId) -> None:
    # A failing callback must not stop the producer's thread or the other callbacks.
    try:
        fn(handle)
    except Exception:
        log.exception("done_callback_failed", callback=repr(fn))
