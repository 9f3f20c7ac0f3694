"""Leader epochs: which leader wrote which ids, and whether this server refuses writes (protocol.md 2).

Every promotion (ACCEPT) starts a new *epoch*, numbered one above the highest
this data dir has seen, at the next id. The file ``EPOCHS`` keeps the list of
``(epoch, first id)`` pairs of this log's history, the highest epoch seen
(which may have no record here yet), and whether REFUSE is in force. It is
small and changes rarely, so every change rewrites it whole: a temp file,
fsync, rename, fsync of the directory, before the change takes effect (before
the first record of a new epoch is written, before REFUSE is answered).

With the epochs, two servers can find where their histories part without
comparing records (Kafka's leader epochs, KIP-101/279): epoch ``e`` ends
where the first later epoch starts.

The file ends with ``crc <8 hex digits>``, the CRC-32C of every byte before
that line. A file without it (empty, cut short, or from an older logd) or
whose CRC does not match may have lost its ``refused`` line, so it *fails
closed*: it loads as refused (`Epochs.unverified` says why) and the server
starts read-only until an ACCEPT. Epochs and ids are 0 .. 2^63-1, like every
number on the wire: ``ACCEPT`` when the highest epoch seen is already the
largest is refused rather than written.
"""

from __future__ import annotations

import os
import re
from bisect import bisect_right
from dataclasses import dataclass, field

from crc32c import crc32c

from ..errors import StorageError
from .files import replace_durably

FILE = "EPOCHS"
MAX_EPOCH = (1 << 63) - 1  # the largest epoch (and id): what the wire's numbers allow
_TRAILER = re.compile(rb"crc ([0-9a-f]{8})")


@dataclass
class Epochs:
    """The epochs of a data dir's history; changes are durable before the methods return.

    ``entries`` always starts with ``(0, 1)``: a log written before any
    promotion (or by an older logd) is epoch 0.
    """

    directory: str
    entries: list[tuple[int, int]] = field(default_factory=lambda: [(0, 1)])
    seen: int = 0  # highest epoch heard of, here or from a peer
    refused: bool = False  # REFUSE (or a step-down) in force until ACCEPT
    unverified: str | None = None  # why the file read could not be trusted (it then loads as refused)

    @classmethod
    def load(cls, directory: str) -> Epochs:
        """Read ``EPOCHS`` from ``directory`` (none: epoch 0 from id 1, writable).

        Raises `StorageError` for a file that cannot be read or parsed: going
        on without it could let a fenced leader accept writes again. A file
        whose ``crc`` line is missing or wrong loads as refused, with the
        reason in ``unverified``.
        """
        path = os.path.join(directory, FILE)
        try:
            with open(path, "rb") as f:
                text = f.read(1 << 20)
        except FileNotFoundError:
            return cls(directory)
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc}") from None
        out = cls(directory, entries=[])
        body, out.unverified = _verify(text)
        for n, raw in enumerate(body.splitlines(), 1):
            words = raw.split()
            if words == [b"refused"]:
                out.refused = True
            elif len(words) == 2 and words[0] == b"seen" and words[1].isdigit():
                out.seen = _number(words[1], path, n)
            elif len(words) == 2 and words[0].isdigit() and words[1].isdigit():
                epoch, first = _number(words[0], path, n), _number(words[1], path, n)
                if out.entries and (epoch <= out.entries[-1][0] or first < out.entries[-1][1]):
                    raise StorageError(f"{path} line {n}: epochs must increase and first ids not decrease")
                out.entries.append((epoch, first))
            elif words and not (out.unverified and words[0] == b"crc"):  # a crc line that failed, or cut
                raise StorageError(f"{path} line {n}: cannot parse {raw[:60]!r}")
        if not out.entries or out.entries[0] != (0, 1):
            out.entries.insert(0, (0, 1))
        out.seen = max(out.seen, out.entries[-1][0])
        if out.unverified:
            out.refused = True  # fail closed: the file may have lost its `refused` line
        return out

    # --- queries ---------------------------------------------------------------

    @property
    def path(self) -> str:
        return os.path.join(self.directory, FILE)

    @property
    def current(self) -> int:
        """The epoch of the newest entry: the epoch this server's next records belong to."""
        return self.entries[-1][0]

    def epoch_of(self, id: int) -> tuple[int, int | None]:
        """The epoch holding ``id`` and the first id of the next epoch (None: still open)."""
        i = bisect_right([first for _e, first in self.entries], id) - 1
        # Epochs that hold no record share their first id with the next: the last one holds id.
        nxt = self.entries[i + 1][1] if i + 1 < len(self.entries) else None
        return self.entries[i][0], nxt

    def end_of(self, epoch: int, next_id: int) -> tuple[int, int]:
        """Where ``epoch`` ends in this history (Kafka's OffsetsForLeaderEpoch).

        Returns ``(found, end)``: ``found`` is the largest epoch here that is
        ``<= epoch``, and ``end`` the first id that is not in it (the first id
        of the next epoch, or ``next_id`` if ``found`` is the newest).
        """
        k = 0
        for i, (e, _first) in enumerate(self.entries):
            if e <= epoch:
                k = i
        found = self.entries[k][0]
        end = self.entries[k + 1][1] if k + 1 < len(self.entries) else next_id
        return found, end

    # --- changes (each durable before it returns) ------------------------------

    @property
    def next_epoch(self) -> int | None:
        """The epoch a promotion would start (one above the highest seen); None when none is left."""
        nxt = max(self.seen, self.current) + 1
        return nxt if nxt <= MAX_EPOCH else None

    def start(self, epoch: int, first_id: int, *, refused: bool | None = None) -> None:
        """Begin ``epoch`` at ``first_id`` (a promotion, or a leader's new epoch seen by a follower)."""
        last_epoch, last_first = self.entries[-1]
        if epoch > MAX_EPOCH:
            raise ValueError(f"epoch {epoch} is past the largest, {MAX_EPOCH}")
        if epoch <= last_epoch or first_id < last_first:
            raise ValueError(f"epoch {epoch} at {first_id} does not follow epoch {last_epoch} at {last_first}")
        self.entries.append((epoch, first_id))
        self.seen = max(self.seen, epoch)
        if refused is not None:
            self.refused = refused
        self.save()

    def see(self, epoch: int, *, refused: bool | None = None) -> None:
        """Remember that ``epoch`` exists (and REFUSE, if given); saved only if something changed."""
        if epoch > MAX_EPOCH:
            raise ValueError(f"epoch {epoch} is past the largest, {MAX_EPOCH}")
        changed = epoch > self.seen or (refused is not None and refused != self.refused)
        self.seen = max(self.seen, epoch)
        if refused is not None:
            self.refused = refused
        if changed:
            self.save()

    def truncate_after(self, last_id: int) -> None:
        """Forget the epochs that start after ``last_id`` (the log is cut there); ``seen`` stays."""
        keep = [(e, f) for e, f in self.entries if f <= last_id] or [(0, 1)]
        if keep != self.entries:
            self.entries = keep
            self.save()

    def save(self) -> None:
        """Write the file whole, its ``crc`` line last: temp file, fsync, rename, fsync of the directory."""
        lines = [b"%d %d\n" % pair for pair in self.entries]
        lines.append(b"seen %d\n" % self.seen)
        if self.refused:
            lines.append(b"refused\n")
        body = b"".join(lines)
        replace_durably(self.path, body + b"crc %08x\n" % crc32c(body))
        self.unverified = None


def _verify(text: bytes) -> tuple[bytes, str | None]:
    """The lines before the ``crc`` line, and None if it is there and matches (else why not)."""
    if not text.strip():
        return text, "the file is empty"
    start = text.rfind(b"\n", 0, len(text) - 1) + 1  # the last line
    m = _TRAILER.fullmatch(text[start:].rstrip(b"\n"))
    if m is None or not text.endswith(b"\n"):
        return text, "it does not end with its crc line (cut short, or written by an older logd)"
    body = text[:start]
    if int(m.group(1), 16) != crc32c(body):
        return body, "its crc line does not match its content"
    return body, None


def _number(token: bytes, path: str, line: int) -> int:
    if len(token) > 19 or int(token) > MAX_EPOCH:
        raise StorageError(f"{path} line {line}: {token[:30]!r} is out of range (at most {MAX_EPOCH})")
    return int(token)
