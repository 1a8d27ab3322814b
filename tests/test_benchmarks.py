"""The parameter benchmark reproduces Table VI exactly (it exits non-zero otherwise)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # builds all six encoders and peft's models in a subprocess: ~30 s
def test_params_benchmark_reproduces_table_vi(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "params.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    data = json.loads((tmp_path / "params.json").read_text())
    assert data["adapter_vit_b"]["encoder_trainable"] == 14_201_880
    assert data["lora_vit_h"]["encoder_trainable"] == 4_587_648
    assert data["dfm_plus_decoder"] == 2_158_238 and data["paper_6_22M_explained"] == 6_222_798
    assert all(
        v["encoder_matches_paper"] for k, v in data.items() if isinstance(v, dict) and "encoder_matches_paper" in v
    )
    table = (tmp_path / "params.md").read_text()
    assert "| MMLoRA vit_l | 2,752,608 | 2.75 M |" in table
