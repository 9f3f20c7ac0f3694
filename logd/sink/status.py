"""How a sink shows its progress: a live line on a terminal, a log line otherwise, a JSON file.

The figures: rows delivered (and rows/s over the last interval), the last
id delivered, the lag (the log's head - the last id delivered), dead
letters so far, and the state (starting, running, retrying, stopped).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import structlog

__all__ = ["Progress", "StatusReporter"]

log = structlog.get_logger("logd.sink")


@dataclass
class Progress:
    """The sink's figures; the pipeline updates them, the reporter shows them."""

    name: str
    target: str
    table: str
    state: str = "starting"
    delivered: int = 0  # rows inserted by this run
    dead_letters: int = 0  # messages sent to the dead letters by this run
    last_id: int = 0  # the position: the last id delivered (or dead-lettered)
    head: int = 0  # the log's head when last asked
    rows_per_s: float = 0.0
    error: str = ""
    started_at: float = field(default_factory=time.time)

    @property
    def lag(self) -> int:
        return max(0, self.head - self.last_id)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["lag"] = self.lag
        out["updated_at"] = time.time()
        return out


class StatusReporter:
    """Shows `Progress` every ``interval`` s: a live line on a terminal, else a structlog line; and a JSON file."""

    def __init__(
        self,
        progress: Progress,
        *,
        json_path: str | os.PathLike[str] | None = None,
        interval: float | None = None,
        stream: TextIO | None = None,
        live: bool | None = None,
    ) -> None:
        self.progress = progress
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.interval = interval if interval is not None else (0.5 if self.live else 5.0)
        self.json_path = Path(json_path) if json_path is not None else None
        self._last_at = time.monotonic()
        self._last_delivered = 0
        self._shown = False

    def due(self) -> bool:
        """Whether the next `tick` will show the figures."""
        return time.monotonic() - self._last_at >= self.interval

    def tick(self, force: bool = False) -> None:
        """Show the figures if ``interval`` has passed since the last time (or ``force``)."""
        now = time.monotonic()
        elapsed = now - self._last_at
        if not force and elapsed < self.interval:
            return
        p = self.progress
        if elapsed > 0:
            p.rows_per_s = (p.delivered - self._last_delivered) / elapsed
        self._last_at, self._last_delivered = now, p.delivered
        if self.live:
            self.stream.write(
                f"\r{p.name} -> {p.table}: {p.rows_per_s:,.0f} rows/s, last id {p.last_id:,}, "
                f"lag {p.lag:,}, dead letters {p.dead_letters:,}, {p.state}\033[K"
            )
            self.stream.flush()
            self._shown = True
        else:
            log.info("sink_progress", name=p.name, table=p.table, state=p.state, rows_per_s=round(p.rows_per_s),
                     last_id=p.last_id, lag=p.lag, delivered=p.delivered, dead_letters=p.dead_letters)
        self.write_json()

    def write_json(self) -> None:
        """Replace the JSON status file atomically (a reader never sees half of it)."""
        if self.json_path is None:
            return
        tmp = self.json_path.with_name(self.json_path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self.progress.as_dict()) + "\n")
            os.replace(tmp, self.json_path)
        except OSError as exc:
            log.warning("sink_status_not_written", path=str(self.json_path), error=str(exc))

    def close(self) -> None:
        """Final figures; end the live line."""
        self.tick(force=True)
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
