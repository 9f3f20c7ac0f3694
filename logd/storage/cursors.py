"""Named cursors on disk: the ``CURSORS`` file of a data directory (protocol.md section 2).

A cursor is a name and the id of the last record its consumer has
processed. Each commit appends one line ``<name> <id> <crc>\\n`` to
``CURSORS``, where ``crc`` is the CRC-32C of ``<name> <id>`` in 8 lowercase
hex digits; a drop (``DROP``) appends ``<name> - <crc>\\n`` (the CRC of
``<name> -``), after which the name is free: a later commit makes a new
cursor, from any id. The last drops are kept (``KEPT_DROPS``, through
compactions too) so that a follower that was away hears of them. The file is synced with the log (`Log.attach`): under
``fsync=always`` a commit is acknowledged only after the group commit's
sync covered its line. When the file has grown well past its live content
it is rewritten (one line per cursor) to a temporary file, synced and
renamed over, on a thread of its own so the server's loop never waits for
those fsyncs (see `CursorStore._compact_in_background`).

At open every line is checked; a bad or cut-off line (a torn tail after a
crash, or zeros) is skipped, and if there was one the file is rewritten
without it. Lines are read in order: a cursor's value is the highest id of
its lines after its last drop line (between drops a cursor only moves
forward, so the order of those lines does not matter).
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Callable

import structlog
from crc32c import crc32c

from .files import fsync_dir, replace_durably, write_all

log = structlog.get_logger("logd.cursors")

FILE = "CURSORS"
MAX_NAME = 64
NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Rewrite the file once it is over this size and over 4 times its live content.
COMPACT_MIN_BYTES = 64 * 1024
# The newest drops kept as drop lines (and sent to each new replica stream): a follower away for
# more drops than this may keep a dropped cursor. Bounded, so creating and dropping names costs no
# unbounded memory or file.
KEPT_DROPS = 10_000
DROPPED = b"-"  # the value field of a drop line
_LINE = re.compile(rb"([A-Za-z0-9._-]{1,64}) ([0-9]{1,19}|-) ([0-9a-f]{8})")


def _no_step(step: str) -> None:
    """The default ``compaction_step``: nothing."""


def valid_name(name: str) -> bool:
    """Whether ``name`` is a cursor name: 1 to 64 of ``A-Z a-z 0-9 . _ -``."""
    return NAME.fullmatch(name) is not None


def encode_line(name: str, id: int) -> bytes:
    """One line of the ``CURSORS`` file."""
    text = b"%s %d" % (name.encode("ascii"), id)
    return b"%s %08x\n" % (text, crc32c(text))


def encode_drop(name: str) -> bytes:
    """The line that drops cursor ``name``."""
    text = b"%s %s" % (name.encode("ascii"), DROPPED)
    return b"%s %08x\n" % (text, crc32c(text))


def decode_lines(data: bytes) -> tuple[dict[str, int], int]:
    """The cursors held in ``data`` and the number of bad lines skipped (`decode_file` without the drops)."""
    cursors, _dropped, bad = decode_file(data)
    return cursors, bad


def decode_file(data: bytes) -> tuple[dict[str, int], list[str], int]:
    """The cursors held in ``data`` (per name, the highest id since its last drop line), the names
    dropped (each once, oldest drop first) and the number of bad lines skipped."""
    cursors: dict[str, int] = {}
    dropped: dict[str, None] = {}
    bad = 0
    lines = data.split(b"\n")
    if lines[-1]:
        bad += 1  # a last line without its LF: cut off by a crash
    for line in lines[:-1]:
        m = _LINE.fullmatch(line)
        if m is None or int(m.group(3), 16) != crc32c(b"%s %s" % (m.group(1), m.group(2))):
            bad += 1
            continue
        name = m.group(1).decode("ascii")
        if m.group(2) == DROPPED:
            cursors.pop(name, None)
            dropped.pop(name, None)  # a name dropped again counts as its newest drop
            dropped[name] = None
            continue
        id = int(m.group(2))
        if id > cursors.get(name, -1):
            cursors[name] = id
    return cursors, list(dropped), bad


class CursorStore:
    """The cursors of a data directory: read at open, appended to on commit, synced with the log.

    `set` runs on the server's loop thread and never waits for a sync;
    `sync` may run on the log's sync thread at the same time, and a
    compaction on its own thread. `_write_lock` orders `set`'s writes with
    the compaction's swap of the file (so no line goes to a file about to be
    replaced); `_sync_lock` is held across the fdatasync and while the old
    descriptor is closed, so a sync never meets a closed descriptor.

    ``compaction_step``, if given, is called on the compaction's thread at
    each of its steps (see `_compact`); tests pass one that waits on an
    event, to hold a compaction at a chosen moment.
    """

    def __init__(self, directory: str, compaction_step: Callable[[str], None] | None = None) -> None:
        self.directory = directory
        self._step = compaction_step or _no_step
        self.path = os.path.join(directory, FILE)
        self._sync_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._compactor: threading.Thread | None = None
        self._written_meanwhile: list[bytes] | None = None  # lines `set` wrote while a compaction runs
        self._dir_unsynced = False  # a compaction renamed the file and has not fsynced the dir yet
        self.compaction_error: OSError | None = None  # the last background compaction's failure
        # The file size past which a compaction may start: after a failed one, twice the size it
        # failed at, so a lasting fault costs a thread and a log line per doubling, not per COMMIT.
        self._compact_past = COMPACT_MIN_BYTES
        self._cursors: dict[str, int] = {}
        # The newest drops, name -> its drop's number (1, 2, ...; none is reused), oldest first.
        self._dropped: dict[str, int] = {}
        self.drops = 0  # the number of the newest drop (0: none), so a replica feed can tell what is new
        self._dirty = False
        self.version = 0  # bumped on every change, so a replica feed can tell nothing moved
        self.bad_lines_skipped = 0
        self._size = 0
        self._fd = -1
        self._open()

    def _open(self) -> None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = None
        if data is None:
            self._rewrite({})  # create it, durably, so a later append has a file to go to
            return
        self._cursors, dropped, self.bad_lines_skipped = decode_file(data)
        for name in dropped[-KEPT_DROPS:]:
            self.drops += 1
            self._dropped[name] = self.drops
        if self.bad_lines_skipped:
            self._rewrite(self._cursors)
        else:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            self._size = len(data)

    # --- reading ------------------------------------------------------------

    def get(self, name: str) -> int:
        """The cursor's id (0 when it was never committed)."""
        return self._cursors.get(name, 0)

    def items(self) -> dict[str, int]:
        """Every cursor, name -> id (a copy, sorted by name)."""
        return dict(sorted(self._cursors.items()))

    def __len__(self) -> int:
        return len(self._cursors)

    def __contains__(self, name: object) -> bool:
        return name in self._cursors

    def lowest(self) -> int | None:
        """The lowest cursor id, or None without cursors (what retention must keep past)."""
        return min(self._cursors.values()) if self._cursors else None

    def dropped_since(self, number: int) -> list[str]:
        """The names of the kept drops numbered above ``number``, oldest first."""
        out = []
        for name, n in reversed(self._dropped.items()):
            if n <= number:
                break
            out.append(name)
        out.reverse()
        return out

    # --- writing ------------------------------------------------------------

    def set(self, name: str, id: int) -> None:
        """Move cursor ``name`` to ``id`` (written to the OS; durable at the next `sync`).

        The caller has checked that it only moves forward. Raises OSError if the write fails.
        """
        self._append(encode_line(name, id))
        self._cursors[name] = id
        self.version += 1
        self._maybe_compact()

    def drop(self, name: str) -> bool:
        """Drop cursor ``name`` (written to the OS; durable at the next `sync`); False if there is none.

        Raises OSError if the write fails (the cursor is then still there).
        """
        if name not in self._cursors:
            return False
        self._append(encode_drop(name))
        del self._cursors[name]
        self.drops += 1
        self._dropped.pop(name, None)
        self._dropped[name] = self.drops
        if len(self._dropped) > KEPT_DROPS:
            del self._dropped[next(iter(self._dropped))]
        self.version += 1
        self._maybe_compact()
        return True

    def _append(self, line: bytes) -> None:
        with self._write_lock:
            os.write(self._fd, line)
            self._size += len(line)
            if self._written_meanwhile is not None:
                self._written_meanwhile.append(line)
            self._dirty = True  # with the write: `sync` reads the file and the flag under this lock

    def _maybe_compact(self) -> None:
        if self._compactor is None and self._size > self._compact_past and self._size > 4 * self._live_bytes():
            self._compact_in_background()

    @property
    def dirty(self) -> bool:
        """Whether something was written since the last `sync`."""
        return self._dirty

    def sync(self) -> None:
        """Make every committed line durable (fdatasync), if any was written since the last sync."""
        with self._sync_lock:
            # The file, the flags and the lines in it are read together: a compaction swaps
            # the file under the same lock, so the flag cleared here is for lines this fd holds
            # (read apart, a swap and a line between them left that line unsynced, flag cleared).
            with self._write_lock:
                fd = self._fd
                dir_unsynced = self._dir_unsynced
                dirty, self._dirty = self._dirty, False  # a line written during the sync dirties it again
            try:
                if dir_unsynced:
                    # Lines in a renamed-in file are durable only once the rename is.
                    fsync_dir(self.directory)
                if dirty:
                    os.fdatasync(fd)
            except OSError:
                if dirty:
                    self._dirty = True
                raise

    def compact(self) -> None:
        """Rewrite the file with one line per cursor (temporary file, fsync, rename, fsync of the directory)."""
        self.wait_compacted()
        self._rewrite(self._cursors)

    @property
    def compacting(self) -> bool:
        """Whether a background compaction is running."""
        return self._compactor is not None

    def wait_compacted(self) -> None:
        """Wait for a background compaction to finish."""
        compactor = self._compactor  # read once: the thread clears it as it ends
        if compactor is not None:
            compactor.join()

    def _compact_in_background(self) -> None:
        """Start rewriting the file on a thread; `set` goes on appending to the current file meanwhile.

        Crash safety is the synchronous rewrite's: the new file is complete
        and fsynced before it is renamed over, so a crash leaves the old file
        or the new one, each holding every line written so far. Lines written
        during the compaction are copied to the new file (and it fsynced again)
        until none came in since the last copy; only then, under the write
        lock, is it renamed in. Until the directory is fsynced after that,
        `sync` fsyncs it too, so no commit counts as durable on a rename that
        is not.
        """
        snapshot = self._encode_all(self._cursors)
        with self._write_lock:
            self._written_meanwhile = []
        self._compactor = threading.Thread(target=self._compact, args=(snapshot,), name="logd-cursors", daemon=True)
        self._compactor.start()

    def _compact(self, data: bytes) -> None:
        """The compaction's thread. Its steps, as passed to ``compaction_step``:

        ``"copied"``: the new file holds the snapshot, or the lines written
        meanwhile, and is fsynced; next it looks for more lines under the lock,
        and renames it in if none came. ``"renamed"``: the new file is
        ``CURSORS`` and `set` appends to it; next the old descriptor is closed
        and the directory fsynced.
        """
        tmp = self.path + ".tmp"
        fd = -1
        try:
            # Opened for appending now: after the rename this descriptor is the file's, so
            # nothing can fail between the rename and the swap (an open could: EMFILE).
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o644)
            size = 0
            while True:
                write_all(fd, data)
                size += len(data)
                os.fsync(fd)
                self._step("copied")
                with self._write_lock:
                    assert self._written_meanwhile is not None
                    data = b"".join(self._written_meanwhile)
                    self._written_meanwhile.clear()
                    if data:
                        continue  # copy them outside the lock, then look again
                    os.replace(tmp, self.path)
                    self._dir_unsynced = True  # before the swap: a sync that reads the new fd sees it
                    old, self._fd, fd = self._fd, fd, -1
                    self._written_meanwhile = None
                    self._size = size
                    self._compact_past = COMPACT_MIN_BYTES
                    break
            self._step("renamed")
            with self._sync_lock:
                os.close(old)
            fsync_dir(self.directory)
            self._dir_unsynced = False
        except OSError as exc:
            # The current file is untouched and still appended to: only the compaction is lost.
            self.compaction_error = exc
            with self._write_lock:
                self._written_meanwhile = None
                self._compact_past = 2 * self._size
            log.warning("cursor_compaction_failed", path=self.path, error=str(exc), retry_past_bytes=self._compact_past)
            if fd >= 0:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        finally:
            self._compactor = None

    def _live_bytes(self) -> int:
        return sum(len(name) + 30 for name in self._cursors) + sum(len(name) + 12 for name in self._dropped)

    def _encode_all(self, cursors: dict[str, int]) -> bytes:
        """The file's content with one line per cursor, after the kept drops (oldest first: a name
        dropped and made again reads back as its new cursor)."""
        drops = b"".join(encode_drop(name) for name in self._dropped)
        return drops + b"".join(encode_line(name, id) for name, id in sorted(cursors.items()))

    def _rewrite(self, cursors: dict[str, int]) -> None:
        data = self._encode_all(cursors)
        # Nothing writes to the old file meanwhile: `set` runs on this thread, no compaction is running.
        replace_durably(self.path, data)
        with self._sync_lock:
            old, self._fd = self._fd, os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            if old >= 0:
                os.close(old)
            self._size = len(data)
            self._dirty = False  # the new file was synced whole

    def close(self) -> None:
        """Wait for a compaction, sync and close the file."""
        self.wait_compacted()
        if self._fd < 0:
            return
        try:
            self.sync()
        finally:
            os.close(self._fd)
            self._fd = -1
