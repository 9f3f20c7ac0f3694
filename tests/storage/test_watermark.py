"""The saved high watermark file (protocol.md section 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from logd.storage import watermark


def test_missing_file_is_zero(tmp_path: Path) -> None:
    assert watermark.load(tmp_path) == 0


def test_save_then_load(tmp_path: Path) -> None:
    watermark.save(tmp_path, 12345)
    assert (tmp_path / watermark.FILE).read_bytes() == b"12345\n"
    assert watermark.load(tmp_path) == 12345
    watermark.save(tmp_path, 12346)
    assert watermark.load(tmp_path) == 12346
    assert not (tmp_path / (watermark.FILE + ".tmp")).exists()


@pytest.mark.parametrize("content", [b"", b"\n", b"-5\n", b"12x\n", b"9" * 25, b"\xff\xfe"])
def test_unreadable_content_is_zero(tmp_path: Path, content: bytes) -> None:
    (tmp_path / watermark.FILE).write_bytes(content)
    assert watermark.load(tmp_path) == 0
