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

A line is written whole or not at all (`CursorStore.set`, `drop`): a write cut short
(a full disk) is truncated back to the end of the last whole line before the
error is raised, so a torn line can never swallow the next one's start. If
even that truncation fails, the next line is written after an LF of its own,
so the torn bytes stay a bad line of their own that readers skip.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Callable, Mapping

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
LINE_BYTES = 30  # about a cursor line's length besides its name: a space, an id, a space, a CRC, LF
DROP_LINE_BYTES = 12  # a drop line's besides its name


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
        # name -> the `version` of its last change, oldest change first: a replica feed reads
        # only the names changed since it last looked, newest first (`changed_since`).
        self._changes: dict[str, int] = {}
        self._live = 0  # the bytes a compacted file would hold: kept as a count, so `set` is O(1)
        # The newest drops, name -> its drop's number (1, 2, ...; none is reused), oldest first.
        self._dropped: dict[str, int] = {}
        self.drops = 0  # the number of the newest drop (0: none), so a replica feed can tell what is new
        self._dirty = False
        self.version = 0  # bumped on every change, so a replica feed can tell nothing moved
        self.bad_lines_skipped = 0
        self.rewrite_error: OSError | None = None  # why the file could not be rewritten at open
        self._size = 0  # the end of the last whole line in the file
        self._torn = False  # bytes past `_size` that a failed write left and truncation could not cut
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
        cursors, dropped, self.bad_lines_skipped = decode_file(data)
        for name in dropped[-KEPT_DROPS:]:
            self._keep_drop(name)
        for name, id in cursors.items():
            self._remember(name, id)
        if self.bad_lines_skipped:
            try:
                self._rewrite(self._cursors)
                return
            except OSError as exc:
                # A full disk must not stop the server: the bad lines stay (they are skipped at
                # every open), and a torn last line is cut below, which needs no space.
                self.rewrite_error = exc
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        whole = data.rfind(b"\n") + 1  # the end of the last whole line
        self._size = len(data)
        if whole < len(data):
            self._size = whole
            self._torn = True
            self._cut_torn()

    # --- reading ------------------------------------------------------------

    def get(self, name: str) -> int:
        """The cursor's id (0 when it was never committed)."""
        return self._cursors.get(name, 0)

    def items(self) -> dict[str, int]:
        """Every cursor, name -> id (a copy, sorted by name)."""
        return dict(sorted(self._cursors.items()))

    def view(self) -> Mapping[str, int]:
        """Every cursor, name -> id, in no order and not copied: O(1), for a caller that reads
        it at once on the thread that calls `set` (a page of CURSORS, the most lagging)."""
        return self._cursors

    def __len__(self) -> int:
        return len(self._cursors)

    def __contains__(self, name: object) -> bool:
        return name in self._cursors

    def lowest(self) -> int | None:
        """The lowest cursor id, or None without cursors (what retention must keep past)."""
        return min(self._cursors.values()) if self._cursors else None

    # --- writing ------------------------------------------------------------

    def set(self, name: str, id: int) -> None:
        """Move cursor ``name`` to ``id`` (written to the OS; durable at the next `sync`).

        The caller has checked that it only moves forward. Raises OSError if the
        line could not be written whole; the file then ends as it did before
        (see `_append`) and the cursor keeps its old value. O(1) in the number
        of cursors.
        """
        self._write_line(encode_line(name, id))
        self._remember(name, id)
        self._maybe_compact()

    def drop(self, name: str) -> bool:
        """Drop cursor ``name`` (written to the OS; durable at the next `sync`); False if there is none.

        Raises OSError if the line could not be written whole (the cursor is then still there, and
        the file ends as it did before). O(1) in the number of cursors.
        """
        if name not in self._cursors:
            return False
        self._write_line(encode_drop(name))
        del self._cursors[name]
        self._live -= len(name) + LINE_BYTES
        self._keep_drop(name)
        self._changed(name)
        self._maybe_compact()
        return True

    def dropped_since(self, number: int) -> list[str]:
        """The names of the kept drops numbered above ``number``, oldest first."""
        out = []
        for name, n in reversed(self._dropped.items()):
            if n <= number:
                break
            out.append(name)
        out.reverse()
        return out

    def _write_line(self, line: bytes) -> None:
        with self._write_lock:
            self._append(line)
            if self._written_meanwhile is not None:
                self._written_meanwhile.append(line)
            self._dirty = True  # with the write: `sync` reads the file and the flag under this lock

    def _maybe_compact(self) -> None:
        if self._compactor is None and self._size > self._compact_past and self._size > 4 * self._live:
            self._compact_in_background()

    def _remember(self, name: str, id: int) -> None:
        if name not in self._cursors:
            self._live += len(name) + LINE_BYTES
        self._cursors[name] = id
        self._changed(name)

    def _keep_drop(self, name: str) -> None:
        """Number a drop and keep it among the newest `KEPT_DROPS` (a compacted file holds their lines)."""
        self.drops += 1
        if self._dropped.pop(name, None) is None:
            self._live += len(name) + DROP_LINE_BYTES
        self._dropped[name] = self.drops
        if len(self._dropped) > KEPT_DROPS:
            oldest = next(iter(self._dropped))
            del self._dropped[oldest]
            self._live -= len(oldest) + DROP_LINE_BYTES

    def _changed(self, name: str) -> None:
        self.version += 1
        self._changes.pop(name, None)
        self._changes[name] = self.version

    def changed_since(self, version: int) -> list[str]:
        """The names changed after ``version`` (a `version` read earlier), newest change first.

        Costs what changed, not the number of cursors.
        """
        out: list[str] = []
        changes = self._changes
        for name in reversed(changes):
            if changes[name] <= version:
                break
            out.append(name)
        return out

    def _append(self, data: bytes) -> None:
        """Write one whole line at the end of the file, or raise OSError with the file ending as before.

        Called under `_write_lock`. A write cut short (ENOSPC part-way: the
        disk took part of a page) is truncated back to the end of the last
        whole line; shrinking a file needs no space. If that fails too, the
        torn bytes stay and `_torn` makes the next line start with an LF of
        its own, so they remain one bad line that readers skip and never
        the start of an acknowledged one.
        """
        if self._torn:
            self._cut_torn()
        if self._torn:
            data = b"\n" + data
        start = self._size
        try:
            write_all(self._fd, data)
        except OSError:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                self._torn = True
            raise
        if self._torn:
            self._size = os.fstat(self._fd).st_size  # past the torn bytes we could not measure
            self._torn = False
        else:
            self._size = start + len(data)

    def _cut_torn(self) -> None:
        """Try again to cut the bytes a failed write left after the last whole line."""
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            return
        self._torn = False

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

    def cut_back(self, last_id: int) -> dict[str, int]:
        """Move every cursor past ``last_id`` back to it (the log was cut there); return their old ids.

        Cursors only move forward line by line, so this rewrites the file
        whole (temporary file, fsync, rename). Raises OSError if it cannot;
        nothing changed then.
        """
        past = {name: id for name, id in self._cursors.items() if id > last_id}
        if not past:
            return {}
        self.wait_compacted()
        self._rewrite({**self._cursors, **dict.fromkeys(past, last_id)})
        for name in past:
            self._remember(name, last_id)
        return past

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
                    self._torn = False  # the torn bytes, if any, were in the old file
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
            self._torn = False
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
