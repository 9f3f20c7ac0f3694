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
"""

from __future__ import annotations

import os
from bisect import bisect_right
from dataclasses import dataclass, field

from ..errors import StorageError
from .files import replace_durably

FILE = "EPOCHS"


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

    @classmethod
    def load(cls, directory: str) -> Epochs:
        """Read ``EPOCHS`` from ``directory`` (none: epoch 0 from id 1, writable).

        Raises `StorageError` for a file that cannot be read or parsed: going
        on without it could let a fenced leader accept writes again.
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
        for n, raw in enumerate(text.splitlines(), 1):
            words = raw.split()
            if words == [b"refused"]:
                out.refused = True
            elif len(words) == 2 and words[0] == b"seen" and words[1].isdigit():
                out.seen = int(words[1])
            elif len(words) == 2 and words[0].isdigit() and words[1].isdigit():
                epoch, first = int(words[0]), int(words[1])
                if out.entries and (epoch <= out.entries[-1][0] or first < out.entries[-1][1]):
                    raise StorageError(f"{path} line {n}: epochs must increase and first ids not decrease")
                out.entries.append((epoch, first))
            elif words:
                raise StorageError(f"{path} line {n}: cannot parse {raw[:60]!r}")
        if not out.entries or out.entries[0] != (0, 1):
            out.entries.insert(0, (0, 1))
        out.seen = max(out.seen, out.entries[-1][0])
        return out

    # --- queries ---------------------------------------------------------------

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

    def start(self, epoch: int, first_id: int, *, refused: bool | None = None) -> None:
        """Begin ``epoch`` at ``first_id`` (a promotion, or a leader's new epoch seen by a follower)."""
        last_epoch, last_first = self.entries[-1]
        if epoch <= last_epoch or first_id < last_first:
            raise ValueError(f"epoch {epoch} at {first_id} does not follow epoch {last_epoch} at {last_first}")
        self.entries.append((epoch, first_id))
        self.seen = max(self.seen, epoch)
        if refused is not None:
            self.refused = refused
        self.save()

    def see(self, epoch: int, *, refused: bool | None = None) -> None:
        """Remember that ``epoch`` exists (and REFUSE, if given); saved only if something changed."""
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
        """Write the file whole: temp file, fsync, rename, fsync of the directory."""
        lines = [b"%d %d\n" % pair for pair in self.entries]
        lines.append(b"seen %d\n" % self.seen)
        if self.refused:
            lines.append(b"refused\n")
        replace_durably(os.path.join(self.directory, FILE), b"".join(lines))
