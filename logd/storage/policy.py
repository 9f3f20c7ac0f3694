"""The fsync policy: when appended data is made durable (the ``--fsync`` flag)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FsyncPolicy:
    """When appended data is made durable: ``always``, ``interval:<ms>`` or ``never``."""

    mode: str = "always"
    interval_ms: int = 0

    @classmethod
    def parse(cls, text: str) -> FsyncPolicy:
        """Parse the ``--fsync`` flag; raise ValueError with a readable message."""
        text = text.strip().lower()
        if text in ("always", "never"):
            return cls(text)
        if text.startswith("interval:"):
            ms = text.split(":", 1)[1]
            if ms.isdigit() and int(ms) > 0:
                return cls("interval", int(ms))
        raise ValueError(f"fsync policy must be always, never or interval:<ms>, not {text!r}")

    def __str__(self) -> str:
        return f"interval:{self.interval_ms}" if self.mode == "interval" else self.mode
