"""logd.sink.status: the live line, the JSON status file."""

from __future__ import annotations

import io
import json
from pathlib import Path

from logd.sink.status import Progress, StatusReporter


def test_the_json_status_file_has_the_figures_and_the_lag(tmp_path: Path) -> None:
    progress = Progress("n1", "sqlite:x.db", "ev", state="running", delivered=10, last_id=40, head=55)
    StatusReporter(progress, json_path=tmp_path / "s.json", stream=io.StringIO(), live=False).tick(force=True)
    status = json.loads((tmp_path / "s.json").read_text())
    assert {k: status[k] for k in ("name", "table", "state", "delivered", "last_id", "head", "lag")} == {
        "name": "n1", "table": "ev", "state": "running", "delivered": 10, "last_id": 40, "head": 55, "lag": 15}
    assert not (tmp_path / "s.json.tmp").exists()


def test_on_a_terminal_one_line_is_rewritten_in_place() -> None:
    stream = io.StringIO()
    progress = Progress("n1", "t", "ev", state="running")
    reporter = StatusReporter(progress, stream=stream, live=True, interval=0)
    progress.last_id, progress.head = 1234, 2000
    reporter.tick()
    reporter.close()
    text = stream.getvalue()
    assert text.startswith("\rn1 -> ev: ") and "last id 1,234" in text and "lag 766" in text
    assert text.endswith("\n") and text.count("\n") == 1


def test_between_intervals_nothing_is_shown(tmp_path: Path) -> None:
    progress = Progress("n1", "t", "ev")
    reporter = StatusReporter(progress, json_path=tmp_path / "s.json", stream=io.StringIO(), live=False,
                              interval=3600)
    reporter.tick()
    assert not (tmp_path / "s.json").exists()
    assert not reporter.due()
