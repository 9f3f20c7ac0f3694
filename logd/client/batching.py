"""What both producers share: the batch, its limits, and resolving a batch's futures from its reply.

`producer.Producer` (threads, `concurrent.futures.Future`) and
`aio_producer.AsyncProducer` (event loop, `asyncio.Future`) fill `Batch`es
within the same `BatchLimits` and settle them the same way; the contract
they keep is described in `producer`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .. import errors
from ..protocol import ErrorReply, Reply
from .commands import last_id_of

__all__ = ["Batch", "BatchLimits", "lost_in_flight", "settle"]

F = TypeVar("F", concurrent.futures.Future[int], asyncio.Future[int])


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


def settle(batch: Batch[Any], reply: Reply | errors.LogdError) -> None:
    """Resolve a batch's futures from its reply (``OK <last id>``, ``ERR``) or a failure."""
    futures = batch.futures
    if isinstance(reply, ErrorReply):
        reply = errors.error_from_reply(reply.code, reply.message)
    if not isinstance(reply, errors.LogdError):
        try:
            first = last_id_of([reply], len(futures)) - len(futures) + 1
        except errors.LogdError as exc:
            reply = exc
    if isinstance(reply, errors.LogdError):
        for fut in futures:
            _resolve(fut.set_exception, reply)
    else:
        for id, fut in enumerate(futures, first):
            _resolve(fut.set_result, id)


def _resolve(setter: Callable[[Any], None], value: object) -> None:
    try:
        setter(value)
    except _CANCELLED:
        pass  # the caller cancelled this future: it no longer wants the outcome


_CANCELLED = (concurrent.futures.InvalidStateError, asyncio.InvalidStateError)


def lost_in_flight(n: int, why: errors.LogdError) -> errors.ConnectionError:
    """The error for a batch of ``n`` messages written to a connection that failed before its reply."""
    return errors.ConnectionError(
        f"{why}; {n} message(s) were in flight and may or may not have been appended"
    )
