"""``eval`` and ``predict`` rebuild the model and experiment saved with the weights: training
overrides need not be repeated, the command line changes only what it names, and a SAM file is
asked for (naming the key) only when the weights were trained from one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from mmpeft_isprs.cli import main
from mmpeft_isprs.evaluate import eval_config
from tests.isprs.archives import TINY, make_vaihingen_archive


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("weights")
    make_vaihingen_archive(base / "data", ["1", "5"])
    args = [
        f"data.root={base / 'data'}",
        f"train.run_dir={base / 'run'}",
        "data.splits={train: [1], test: [5]}",
        "data.val_fraction=0",
        *TINY,
    ]
    assert main(["train", "vaihingen_mmlora_vit_b", *args]) == 0
    return base


def _with_sam(weights: Path, out: Path, sam: str) -> Path:
    """A copy of ``weights`` that says it was trained from the SAM file ``sam``."""
    with safe_open(str(weights), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model = json.loads(meta["config"])
    model["checkpoint"] = sam
    experiment = json.loads(meta["experiment"])
    experiment["model"]["checkpoint"] = sam
    meta.update(config=json.dumps(model), experiment=json.dumps(experiment))
    save_file(tensors, str(out), metadata=meta)
    return out


def test_eval_uses_the_saved_experiment_and_only_the_given_overrides(run: Path, capsys) -> None:
    weights = run / "run" / "best.safetensors"
    cfg = eval_config("vaihingen_mmlora_vit_b", weights, ["eval.stride=16"], log=lambda _: None)
    assert cfg.data.root == str(run / "data") and cfg.model.backbone == "vit_tiny" and cfg.model.checkpoint is None
    assert cfg.eval.stride == 16 and cfg.train.run_dir == str(run / "run") and cfg.model_preset is None
    assert (
        main(["eval", "vaihingen_mmlora_vit_b", "--weights", str(weights), "eval.stride=16", f"--out={run / 'e16'}"])
        == 0
    )
    assert json.loads((run / "e16" / "metrics.json").read_text())["protocol"]["stride"] == 16
    assert f"note: using the experiment saved with {weights}" in capsys.readouterr().out


def test_sam_path_ignored_when_the_weights_need_none(run: Path) -> None:
    weights = run / "run" / "best.safetensors"
    assert (
        main(
            [
                "eval",
                "vaihingen_mmlora_vit_b",
                "--weights",
                str(weights),
                "model.checkpoint=/gone/sam_vit_b_01ec64.pth",
                f"--out={run / 'e_ign'}",
            ]
        )
        == 0
    )


def test_missing_sam_checkpoint_names_the_key(run: Path, capsys) -> None:
    weights = _with_sam(run / "run" / "best.safetensors", run / "sam.safetensors", "/gone/sam_vit_b_01ec64.pth")
    assert main(["eval", "vaihingen_mmlora_vit_b", "--weights", str(weights)]) == 2
    why = f"SAM checkpoint /gone/sam_vit_b_01ec64.pth not found: {weights} was trained from sam_vit_b_01ec64.pth (its frozen encoder is not stored in the weights)"
    assert capsys.readouterr().err.strip().endswith(f"{why}; set model.checkpoint=/path/to/sam_vit_b_01ec64.pth")
    top, dsm = run / "data" / "top", run / "data" / "dsm"
    assert (
        main(["predict", "--weights", str(weights), "--optical", str(top), "--dsm", str(dsm), "--out", str(run / "p")])
        == 2
    )
    assert capsys.readouterr().err.strip() == f"error: {why}; set --checkpoint=/path/to/sam_vit_b_01ec64.pth"
    assert (
        main(
            [
                "predict",
                "--weights",
                str(weights),
                "--optical",
                str(top),
                "--dsm",
                str(dsm),
                "--out",
                str(run / "p"),
                "--checkpoint",
                "/elsewhere/sam_vit_b_01ec64.pth",
            ]
        )
        == 2
    )
    assert "SAM checkpoint /elsewhere/sam_vit_b_01ec64.pth not found" in capsys.readouterr().err
