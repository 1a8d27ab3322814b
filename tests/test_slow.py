"""Full-size checks (slow: run by `make test-slow` and CI, not by `make test`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import close

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_timm_vit_base_patch16_224(method: str) -> None:
    import timm

    from mmpeft import count_parameters, wrap_multimodal

    torch.manual_seed(0)
    base = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    ref = {k: v.clone() for k, v in base.state_dict().items()}
    x = {"optical": torch.rand(1, 3, 224, 224), "dsm": torch.rand(1, 1, 224, 224)}
    with torch.no_grad():
        plain = base(x["optical"])
    wrapped = wrap_multimodal(base, method=method)
    with torch.no_grad():
        assert close(wrapped(x)["optical"], plain, rel=1e-5)  # identity at init
    rep = count_parameters(wrapped)
    assert rep.trainable == (
        12 * (28 * 4 * 768 + 4) if method == "lora" else 12 * (4 * (768 * 192 * 2 + 192 + 768) + 2)
    )
    wrapped.train()
    out = wrapped(x)
    (out["optical"].sum() + out["dsm"].sum()).backward()
    assert all(
        torch.equal(v, ref[k.replace("base_layer.", "")])
        for k, v in wrapped.base_model.state_dict().items()
        if "lora_" not in k and "adapter_" not in k
    )


def test_mfnet_vit_b_training_step() -> None:
    from mmpeft_isprs.model import build_mfnet

    torch.manual_seed(0)
    model = build_mfnet(backbone="vit_b", method="adapter").train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    x = {"optical": torch.rand(1, 3, 256, 256), "dsm": torch.rand(1, 1, 256, 256)}
    y = torch.randint(0, 6, (1, 256, 256))
    for _ in range(2):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)
    ]
    assert not missing, missing[:5]


def test_speed_benchmark_quick_runs(tmp_path: Path) -> None:
    """benchmarks/speed.py end to end on a tiny backbone: every scheme's JSON record and the ratios."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
    cmd = [
        sys.executable,
        str(script),
        "--quick",
        "--methods",
        "lora",
        "--steps",
        "1",
        "--inference",
        "--tile",
        "300x300",
        "--out",
        str(tmp_path),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    data = json.loads((tmp_path / "speed.json").read_text())
    res = data["results"]["lora"]
    assert set(res) == {
        "ours",
        "ours_ckpt",
        "ours_padded",
        "per_modality",
        "per_modality_sam",
        "floor",
        "floor_efficient",
    }
    assert all(r["median_s"] > 0 and r["peak_mb"] > 0 for r in res.values())
    assert data["ratios"]["lora"]["a_over_b"] == pytest.approx(
        res["ours"]["median_s"] / res["per_modality"]["median_s"]
    )
    inf = data["inference"]["lora"]
    assert set(inf) == {"inference", "inference_padded"} and inf["inference"]["windows"] == 4
    assert "| lora | ours |" in (tmp_path / "speed.md").read_text()
