"""`logd token add` on a real full disk (issue 22): the auth file is written whole or left as it was."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from logd.auth import add_token, load_table
from tests.fulldisk import PAGE, fill, tmpfs


def test_token_add_on_a_full_disk_fails_clearly_and_keeps_every_token(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "1m") as disk:
        path = disk / "tokens"
        for i in range(60):  # about 5.5 KB: the new file needs two pages
            add_token(str(path), f"app{i:02d}", "read")
        before = path.read_bytes()
        assert len(before) > PAGE + 1000
        spare = disk / "spare"
        spare.write_bytes(bytes(PAGE))
        fill(disk)
        spare.unlink()  # one page free: the new file's first page is written, its second is not
        done = subprocess.run(
            [sys.executable, "-m", "logd.cli", "token", "add", "late", "--role", "read", "--auth-file", str(path)],
            capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 1, done  # it was 0: the file cut at 4096 bytes, tokens lost
        assert "No space left on device" in done.stderr and "Traceback" not in done.stderr
        assert done.stdout == ""  # no token printed that the file does not hold
        assert path.read_bytes() == before and len(load_table(str(path)).entries) == 60
        assert sorted(os.listdir(disk)) == ["filler", "tokens"]
