"""The CLUSTER file: settings a server learned from its leader or a promotion (protocol.md 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from logd.errors import StorageError
from logd.storage import cluster


def test_missing_file_is_no_setting(tmp_path: Path) -> None:
    assert cluster.load(str(tmp_path)) == {}


def test_round_trip_and_format(tmp_path: Path) -> None:
    settings = {"min_replicas": cluster.Saved(2, "leader"), "a_later_one": cluster.Saved(7, "promote")}
    cluster.save(str(tmp_path), settings)
    assert (tmp_path / "CLUSTER").read_text() == "a_later_one 7 promote\nmin_replicas 2 leader\n"
    assert cluster.load(str(tmp_path)) == settings
    assert not (tmp_path / "CLUSTER.tmp").exists()


@pytest.mark.parametrize("text", [
    "min_replicas 1\n",
    "min_replicas one leader\n",
    "min_replicas -1 leader\n",
    "min_replicas 1 config\n",
    "min_replicas 1 leader extra\n",
    "min-replicas 1 leader\n",
    "min_replicas 1234567890123456789 leader\n",
])
def test_a_file_that_cannot_be_parsed_is_refused(tmp_path: Path, text: str) -> None:
    (tmp_path / "CLUSTER").write_text(text)
    with pytest.raises(StorageError, match="CLUSTER line 1: cannot parse"):
        cluster.load(str(tmp_path))


def test_empty_lines_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "CLUSTER").write_text("\nmin_replicas 3 promote\n\n")
    assert cluster.load(str(tmp_path)) == {"min_replicas": cluster.Saved(3, "promote")}
