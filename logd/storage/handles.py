"""Read descriptors for segment files, shared by every reader through a bounded cache.

Each reader used to open (and keep) its own descriptor per segment: a busy
server could run out of descriptors with readers alone, and the failure
surfaced in odd places. Now a `HandleCache` keeps at most ``capacity`` open,
least recently used first out, and a failed open is an `UnavailableError`
(``ERR UNAVAILABLE`` to the reader) that names the file.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Protocol

from ..errors import UnavailableError


class _Mapped(Protocol):
    def close_index_map(self) -> None: ...


class ReadHandle:
    """A read-only file descriptor closed when the last reference goes.

    Readers hold the handle across awaits; retention may unlink the file
    meanwhile, and an unlinked file stays readable through an open
    descriptor. Closing on the last reference means a descriptor number is
    never reused under a reader's feet.
    """

    __slots__ = ("fd",)

    def __init__(self, path: str) -> None:
        self.fd = -1  # set first: __del__ runs even when the open below fails
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise UnavailableError(f"cannot open {path} for reading: {os.strerror(exc.errno or 0)}") from exc

    def __del__(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1


class HandleCache:
    """At most ``capacity`` open `ReadHandle`s, by path, least recently used evicted first.

    An evicted handle stays open while a reader still holds it.
    """

    def __init__(self, capacity: int = 64) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._handles: OrderedDict[str, ReadHandle] = OrderedDict()
        # Closed segments whose index is mapped: a mapping keeps a descriptor too.
        self._mapped: OrderedDict[int, _Mapped] = OrderedDict()

    def __len__(self) -> int:
        return len(self._handles)

    def get(self, path: str) -> ReadHandle:
        """The shared handle for ``path``, opened if needed (`UnavailableError` if it cannot be)."""
        handle = self._handles.get(path)
        if handle is not None:
            self._handles.move_to_end(path)
            return handle
        handle = ReadHandle(path)
        self._handles[path] = handle
        while len(self._handles) > self.capacity:
            self._handles.popitem(last=False)
        return handle

    def note_mapped(self, segment: _Mapped) -> None:
        """A segment mapped its index; unmap the least recently mapped ones beyond ``capacity``."""
        self._mapped[id(segment)] = segment
        self._mapped.move_to_end(id(segment))
        while len(self._mapped) > self.capacity:
            _key, old = self._mapped.popitem(last=False)
            old.close_index_map()

    def forget_mapped(self, segment: _Mapped) -> None:
        """The segment unmapped its index."""
        self._mapped.pop(id(segment), None)

    def forget(self, path: str) -> None:
        """Drop the cached handle for ``path`` (its file is being deleted or rewritten)."""
        self._handles.pop(path, None)

    def clear(self) -> None:
        """Drop every cached handle and unmap every index."""
        self._handles.clear()
        for seg in list(self._mapped.values()):
            seg.close_index_map()
        self._mapped.clear()
