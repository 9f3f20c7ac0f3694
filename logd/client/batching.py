"""What both producers share: the batch, its limits, and resolving a batch's futures from its reply.

`producer.Producer` (threads, `pending.PendingId`) and
`aio_producer.AsyncProducer` (event loop, `asyncio.Future`) fill `Batch`es
within the same `BatchLimits` and settle them the same way; the contract
they keep is described in `producer`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .. import errors
from ..protocol import ErrorReply, Reply
from .commands import last_id_of
from .pending import PendingId

__all__ = ["Batch", "BatchLimits", "Resolver", "lost_in_flight", "resolve_each", "settle"]

F = TypeVar("F", PendingId, asyncio.Future[int])

# Resolves a batch's futures: from the first id on (an int), or all with one error.
Resolver = Callable[[list[Any], "int | errors.LogdError"], None]


@dataclass
class Batch(Generic[F]):
    """Messages sent as one MSG, and the futures of their ids."""

    bodies: list[bytes] = field(default_factory=list)
    futures: list[F] = field(default_factory=list)
    nbytes: int = 0


@dataclass(frozen=True)
class BatchLimits:
    """When a batch is sealed (linger, size) and how many MSGs may be unacknowledged at once."""

    linger: float  # seconds
    max_messages: int
    max_bytes: int
    max_in_flight: int

    @classmethod
    def check(cls, linger_ms: float, max_messages: int, max_bytes: int, max_in_flight: int) -> BatchLimits:
        """Validate the producer's keyword arguments; ``linger_ms`` is in milliseconds."""
        if linger_ms < 0 or max_messages < 1 or max_bytes < 1 or max_in_flight < 1:
            raise ValueError("linger_ms >= 0 and positive batch limits and max_in_flight please")
        return cls(linger_ms / 1000, max_messages, max_bytes, max_in_flight)


def settle(batch: Batch[Any], reply: Reply | errors.LogdError, resolve: Resolver | None = None) -> None:
    """Resolve a batch's futures from its reply (``OK <last id>``, ``ERR``) or a failure.

    ``resolve`` does the resolving (`pending.resolve_batch` for `PendingId`s);
    by default each future's ``set_result`` / ``set_exception``.
    """
    futures = batch.futures
    outcome: int | errors.LogdError
    if isinstance(reply, ErrorReply):
        outcome = errors.error_from_reply(reply.code, reply.message)
    elif isinstance(reply, errors.LogdError):
        outcome = reply
    else:
        try:
            outcome = last_id_of([reply], len(futures)) - len(futures) + 1
        except errors.LogdError as exc:
            outcome = exc
    (resolve or resolve_each)(futures, outcome)


def resolve_each(futures: list[Any], outcome: int | errors.LogdError) -> None:
    """Resolve futures one by one (asyncio futures); a cancelled one is skipped."""
    if isinstance(outcome, errors.LogdError):
        for fut in futures:
            _resolve(fut.set_exception, outcome)
    else:
        for id, fut in enumerate(futures, outcome):
            _resolve(fut.set_result, id)


def _resolve(setter: Callable[[Any], None], value: object) -> None:
    try:
        setter(value)
    except asyncio.InvalidStateError:
        pass  # the caller cancelled this future: it no longer wants the outcome


def lost_in_flight(n: int, why: errors.LogdError) -> errors.ConnectionError:
    """The error for a batch of ``n`` messages written to a connection that failed before its reply."""
    return errors.ConnectionError(
        f"{why}; {n} message(s) were in flight and may or may not have been appended"
    )
