"""Consumers that resume from a checkpoint, and the stores that keep it.

A checkpoint is the id of the last record a consumer has processed (0: none
yet). The consumer reads from checkpoint + 1, hands the records over in
batches and, once the caller says it has processed them (`Consumer.commit`),
stores the new checkpoint. A crash between processing and commit means that
batch is handed over again after a restart: at-least-once delivery. When
`CallbackCheckpoint.save` writes into the same database transaction as the
processing, a batch is either processed and checkpointed or neither:
exactly-once.
"""

from __future__ import annotations

import os
import ssl
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .. import defaults
from ..storage.cursors import valid_name
from ..url import hide_token
from .commands import DEFAULT_URL, Record, Retry
from .sync import Client

__all__ = ["CallbackCheckpoint", "Checkpoint", "Consumer", "FileCheckpoint", "ServerCursor"]


class Checkpoint(ABC):
    """Where a consumer keeps the id of the last record it processed (0: none yet).

    A checkpoint only moves forward: saving an id lower than the stored one
    raises ValueError (it means a bug, or two consumers sharing one
    checkpoint); saving the stored id again does nothing.
    """

    def __init__(self) -> None:
        self._value: int | None = None

    def load(self) -> int:
        """The stored id (0 when nothing is stored yet)."""
        value = self._load()
        if value < 0:
            raise ValueError(f"bad checkpoint {value}")
        self._value = value
        return value

    def save(self, id: int) -> None:
        """Store ``id``, which must not be lower than the stored one."""
        current = self.load() if self._value is None else self._value
        if id < current:
            raise ValueError(f"a checkpoint only moves forward: {id} is below {current}")
        if id > current:
            self._save(id)
            self._value = id

    @abstractmethod
    def _load(self) -> int: ...

    @abstractmethod
    def _save(self, id: int) -> None: ...


class FileCheckpoint(Checkpoint):
    """A checkpoint in a small text file (the id in decimal), replaced atomically.

    Each save writes ``<path>.tmp``, fsyncs it, renames it over ``path`` and
    fsyncs the directory, so after a crash the file holds the old id or the
    new one, never a mix.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"FileCheckpoint({str(self.path)!r})"

    def _load(self) -> int:
        try:
            text = self.path.read_text().strip()
        except FileNotFoundError:
            return 0
        if not text.isdigit():
            raise ValueError(f"{self.path} does not hold a checkpoint id: {text[:40]!r}")
        return int(text)

    def _save(self, id: int) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            data = memoryview(b"%d\n" % id)
            while data:  # a write to a full disk may be short: the rename must not take a cut id
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)  # make the rename itself durable
        finally:
            os.close(dfd)


class CallbackCheckpoint(Checkpoint):
    """A checkpoint kept by the caller: ``load()`` returns it (None or 0: none), ``save(id)`` stores it.

    Typically ``save`` updates a row in the caller's own database, inside the
    transaction that applies the batch, so both commit or neither does.
    """

    def __init__(self, load: Callable[[], int | None], save: Callable[[int], None]) -> None:
        super().__init__()
        self._load_fn = load
        self._save_fn = save

    def _load(self) -> int:
        return self._load_fn() or 0

    def _save(self, id: int) -> None:
        self._save_fn(id)


class ServerCursor(Checkpoint):
    """A checkpoint kept on the server as a named cursor (``COMMIT``/``CURSOR``, protocol.md 3.1).

    The server keeps it durable under its fsync policy and passes it to its
    replicas, shows its lag in STATS and metrics, and (with
    ``--retention-keep-cursors``) keeps the records it still needs. ``url``
    None: the server of the `Consumer` it is given to. Keyword arguments go
    to the `Client`.
    """

    def __init__(self, name: str, url: str | None = None, **client_args: Any) -> None:
        super().__init__()
        if not valid_name(name):
            raise ValueError(f"bad cursor name {name!r}: 1 to 64 of A-Z a-z 0-9 . _ -")
        self.name = name
        self.url = url
        self._client_args = client_args
        self._client: Client | None = None

    def __repr__(self) -> str:
        return f"ServerCursor({self.name!r}, {hide_token(self.url) if self.url else None!r})"

    def client(self) -> Client:
        if self._client is None:
            self._client = Client.from_url(self.url or DEFAULT_URL, **self._client_args)
        return self._client

    def _load(self) -> int:
        return self.client().cursor(self.name)

    def _save(self, id: int) -> None:
        self.client().commit(self.name, id)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class Consumer:
    """Reads the log from the checkpoint + 1 and hands the records over in batches.

    ::

        consumer = logd.Consumer("logd://127.0.0.1:1774", logd.FileCheckpoint("app.ckpt"))
        for batch in consumer:          # list[Record], 1 .. max_batch records
            handle(batch)
            consumer.commit()           # the checkpoint becomes batch[-1].id

    Iterating follows the log forever (reconnecting as a `Tail` does); with
    ``follow=False`` it stops after the records that existed when it began.
    Records not committed are handed over again by the next consumer to
    start from this checkpoint. A consumer with no checkpoint yet starts at
    the oldest retained record; one whose next record was deleted by
    retention raises NotFoundError rather than skip records silently.
    """

    def __init__(
        self,
        url: str,
        checkpoint: Checkpoint,
        *,
        max_batch: int = 1000,
        follow: bool = True,
        timeout: float | None = defaults.CLIENT_TIMEOUT,
        retry: Retry = Retry(),  # noqa: B008 - frozen
        skip_corrupt: bool = False,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.url = url or DEFAULT_URL
        if isinstance(checkpoint, ServerCursor) and checkpoint.url is None:
            checkpoint.url = self.url
        self.checkpoint = checkpoint
        self.max_batch = max_batch
        self.follow = follow
        self._client_args: dict[str, Any] = {"timeout": timeout, "retry": retry, "token": token,
                                             "ssl_context": ssl_context}
        # A corrupt record raises CorruptRecordError (every restart stops at
        # it); with skip_corrupt it is logged with its id and skipped.
        self.skip_corrupt = skip_corrupt
        self._delivered = 0

    @property
    def delivered(self) -> int:
        """The id of the last record handed over (0: none yet)."""
        return self._delivered

    def __iter__(self) -> Iterator[list[Record]]:
        committed = self.checkpoint.load()
        self._delivered = committed
        with Client.from_url(self.url, **self._client_args) as client:
            start = committed + 1
            if not committed:
                start = client.first()
            stop = None if self.follow else client.head()
            if stop is not None and start > stop:
                return
            last = start - 1  # the last id handed over by this iteration
            with client.tail(start, skip_corrupt=self.skip_corrupt) as tail:
                while stop is None or last < stop:
                    size = self.max_batch if stop is None else min(self.max_batch, stop - last)
                    batch = tail.batch(size)
                    if batch:
                        last = self._delivered = batch[-1].id
                        yield batch

    def commit(self) -> int:
        """Store the id of the last record handed over as the checkpoint; return it."""
        if self._delivered:
            self.checkpoint.save(self._delivered)
        return self._delivered
