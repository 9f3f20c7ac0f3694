"""Deliver one batch: rows, dead letters and the new position, in id order, all at once.

The whole batch is tried in one insert. When the database refuses it for
its content (`BadRowsError`), the insert is undone (savepoint) and the
batch split in halves, recursively, until each bad row stands alone; it
becomes a dead letter and everything else is inserted. Ids go into the
database in ascending order, which ClickHouse relies on (its position is
the largest id present). A batch with one bad row costs about two inserts
of it; a clean batch costs one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import BadRowsError, PoisonMessageError
from .rows import DeadLetter, Rows
from .target import Target

__all__ = ["Delivery", "deliver"]


@dataclass
class Delivery:
    """What one batch did: rows inserted, dead letters written."""

    rows: int = 0
    dead: list[DeadLetter] = field(default_factory=list)


def deliver(
    target: Target, rows: Rows, unmapped: Sequence[DeadLetter], last_id: int, stop_on_error: bool
) -> Delivery:
    """Insert ``rows``, record ``unmapped`` as dead letters, set the position to ``last_id``, and commit.

    The transaction was started by the caller (`Target.begin`).

    With ``stop_on_error`` the first message that cannot be delivered ends
    it: what comes before it is committed (position: its id - 1) and
    PoisonMessageError is raised.
    """
    done = Delivery()
    try:
        for run, letter in _runs(rows, unmapped):
            if run:
                _insert(target, run, done, stop_on_error)
            if letter is not None:
                _dead(target, letter, done, stop_on_error)
        target.commit(last_id)
    except PoisonMessageError as exc:
        target.commit(exc.id - 1)
        raise
    except BaseException:
        target.rollback()
        raise
    return done


def _runs(rows: Rows, unmapped: Sequence[DeadLetter]) -> list[tuple[Rows, DeadLetter | None]]:
    """Split ``rows`` at each unmapped message, so everything stays in id order."""
    if not unmapped:
        return [(rows, None)]
    out: list[tuple[Rows, DeadLetter | None]] = []
    i = 0
    for letter in unmapped:
        j = i
        while j < len(rows) and rows[j][0] < letter.id:
            j += 1
        out.append((rows[i:j], letter))
        i = j
    out.append((rows[i:], None))
    return out


def _insert(target: Target, rows: Rows, done: Delivery, stop_on_error: bool) -> None:
    target.savepoint()
    try:
        target.insert(rows)
    except BadRowsError as exc:
        target.rollback_savepoint()
        if len(rows) == 1:
            row = rows[0]
            _dead(target, DeadLetter(row[0], row[1], str(exc)), done, stop_on_error)
            return
        mid = len(rows) // 2
        _insert(target, rows[:mid], done, stop_on_error)
        _insert(target, rows[mid:], done, stop_on_error)
        return
    target.release()
    done.rows += len(rows)


def _dead(target: Target, letter: DeadLetter, done: Delivery, stop_on_error: bool) -> None:
    if stop_on_error:
        raise PoisonMessageError(letter.id, letter.error)
    target.insert_dead([letter])
    done.dead.append(letter)
