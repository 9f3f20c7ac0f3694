"""Cluster settings a server learned from its leader or from a promotion (protocol.md 2, ``CLUSTER``).

A follower keeps its leader's ``--min-replicas`` here, so that once promoted
(and after any restart) it runs with the durability the cluster ran with,
instead of the asynchronous default. One line per setting, ``<name> <value>
<source>``; rewritten whole and durably on every change, which is rare.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import StorageError
from .files import replace_durably

FILE = "CLUSTER"
SOURCES = ("leader", "promote")  # told by the leader in the REPLICATE handshake; `logd promote --min-replicas`
MAX_VALUE_DIGITS = 18  # below 2^63, as every number on the wire


@dataclass(frozen=True)
class Saved:
    """One saved setting: its value and where it came from."""

    value: int
    source: str


def load(directory: str) -> dict[str, Saved]:
    """The settings saved in ``directory`` (none: an empty dict).

    Raises `StorageError` for a file that cannot be read or parsed: a server
    that silently forgot its ``min_replicas`` would acknowledge writes no
    replica holds.
    """
    path = os.path.join(directory, FILE)
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 16)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc}") from None
    out: dict[str, Saved] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        words = raw.split()
        if not words:
            continue
        if (len(words) != 3 or not words[0].replace(b"_", b"").isalpha() or not words[1].isdigit()
                or len(words[1]) > MAX_VALUE_DIGITS or words[2].decode("latin-1") not in SOURCES):
            raise StorageError(f"{path} line {n}: cannot parse {raw[:60]!r} (expected <name> <value> "
                               f"{'|'.join(SOURCES)})")
        out[words[0].decode("ascii")] = Saved(int(words[1]), words[2].decode("ascii"))
    return out


def save(directory: str, settings: dict[str, Saved]) -> None:
    """Write every setting (temp file, fsync, rename, fsync of the directory) before it takes effect."""
    lines = [b"%s %d %s\n" % (name.encode("ascii"), s.value, s.source.encode("ascii"))
             for name, s in sorted(settings.items())]
    replace_durably(os.path.join(directory, FILE), b"".join(lines))
