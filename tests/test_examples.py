"""The examples run end to end (a subprocess, as a user would run them)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "quickstart OK" in proc.stdout
    assert "outputs identical: True" in proc.stdout
    for name in ("sam_encoder", "timm_vit"):
        assert (tmp_path / name / "adapter_model.safetensors").is_file()
        assert (tmp_path / name / "mmpeft_config.json").is_file()
