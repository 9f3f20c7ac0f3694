"""What can go wrong in a sink, sorted by what the pipeline does about it.

- `BadRowsError`: the database refused some rows for what they contain (a
  type mismatch, a constraint). The rows are split until the bad one is
  found; it goes to the dead letters (or stops the sink, ``--on-error stop``).
- `DatabaseUnavailableError`: the database (or logd) cannot be reached, or dropped
  the connection. Retried with jittered backoff, resuming where it was.
- `SinkError` itself, and `SchemaError`: a mistake that retrying will not fix
  (a missing table or column, a bad URL). The sink stops with a message.
- `PoisonMessageError`: ``--on-error stop`` met a row it cannot deliver.
- `GaveUpError`: ``--give-up-after``: the database or logd stayed unreachable that long.
"""

from __future__ import annotations

from ..errors import LogdError


class SinkError(LogdError):
    """A sink cannot go on; retrying would not help."""


class SchemaError(SinkError):
    """The target table, a column or one of the sink's own tables is missing or of the wrong type."""


class BadRowsError(SinkError):
    """The database refused the rows for what they contain; ``message`` is its reason."""


class DatabaseUnavailableError(SinkError):
    """The database cannot be reached right now; worth retrying."""


class GaveUpError(SinkError):
    """The database or logd stayed unreachable for ``--give-up-after`` seconds (the last error is the cause)."""


class PoisonMessageError(SinkError):
    """A message could not be delivered and the sink was told to stop on errors."""

    def __init__(self, id: int, reason: str) -> None:
        super().__init__(f"message {id} cannot be delivered: {reason}")
        self.id = id
        self.reason = reason
