"""Files written atomically get the permissions of plainly created files (issue 13)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mmpeft.utils import atomic_write


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_follows_umask(tmp_path, umask: int) -> None:
    old = os.umask(umask)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        safe = tmp_path / "w.safetensors"
        atomic_write(safe, lambda p: save_file({"a": torch.zeros(2)}, p))  # safetensors writes 0600
        text = tmp_path / "t.json"
        atomic_write(text, lambda p: Path(p).write_text("{}"))
    finally:
        os.umask(old)
    assert _mode(safe) == _mode(plain) == 0o666 & ~umask
    assert _mode(text) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.txt", "t.json", "w.safetensors"]  # no temporaries


def test_atomic_write_keeps_old_file_on_failure(tmp_path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old")

    def fail(p: str) -> None:
        Path(p).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
