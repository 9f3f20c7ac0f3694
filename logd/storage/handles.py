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

from ..errors import UnavailableError


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

    def forget(self, path: str) -> None:
        """Drop the cached handle for ``path`` (its file is being deleted or rewritten)."""
        self._handles.pop(path, None)

    def clear(self) -> None:
        """Drop every cached handle."""
        self._handles.clear()
