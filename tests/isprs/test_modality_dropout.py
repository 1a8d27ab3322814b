"""Missing modalities in MFNet and the ISPRS pipeline: the DFM over the present branches,
modality dropout in training, NaN errors naming tiles, and `eval --subsets`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmpeft import NonFiniteInputError
from mmpeft_isprs.cli import main
from mmpeft_isprs.config import ConfigError, load_config
from mmpeft_isprs.distributed import DistInfo
from mmpeft_isprs.task import SegmentationTask
from mmpeft_isprs.task.subsets import TrainingPresence, modality_subsets
from tests.helpers import close, rel_diff
from tests.isprs.runs import TINY_MFNET, TINY_SYNTHETIC, mixing_mfnet, synthetic_config_file


def _inputs(b: int = 2, s: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"optical": torch.rand(b, 3, s, s, generator=g), "dsm": torch.rand(b, 1, s, s, generator=g)}


def test_optical_alone_equals_the_documented_rule_by_hand() -> None:
    """Optical alone: encoder with the optical update only; DFM = SE_optical(pyramid_optical) at every level."""
    model = mixing_mfnet()
    x = _inputs()
    with torch.no_grad():
        out = model({"optical": x["optical"]})
        feat = model.encoder({"optical": x["optical"]})["optical"]
        pyramid, fusions = model.dfm.pyramids[0], model.dfm.fusions
        levels = [fusions[i].se[0](lv) for i, lv in enumerate(pyramid(feat))]  # the sum over one branch
        ref = model.decoder(levels, model.config.size)
        both = model(x)
    assert close(out, ref, rel=1e-5)
    assert rel_diff(out, both) > 1e-5  # the DSM matters when it is there


def test_all_ones_presence_equals_the_plain_path_and_per_sample_absence() -> None:
    model = mixing_mfnet()
    x = _inputs(b=3)
    with torch.no_grad():
        plain = model(x)
        ones = model(x, presence={"optical": torch.ones(3, dtype=torch.bool), "dsm": torch.ones(3, dtype=torch.bool)})
        x["dsm"][1] = float("nan")  # a failed sensor: absent in sample 1
        masked = model(x, presence={"dsm": torch.tensor([True, False, True])})
        alone = model({"optical": x["optical"][1:2]})
    assert close(plain, ones, rel=1e-5)
    assert close(masked[1:2], alone, rel=1e-5)
    assert close(masked[[0, 2]], plain[[0, 2]], rel=1e-5)


def test_gradients_flow_with_modality_dropout() -> None:
    model = mixing_mfnet().train()
    out = model(_inputs(b=2), presence={"dsm": torch.tensor([True, False])})
    out.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, missing[:5]
    assert all(torch.isfinite(g).all() for g in grads.values())


def _task(**train):
    values = {
        "data": {"dataset": "synthetic"},
        "model": {**TINY_MFNET, "fusion": "scalar", "method": "adapter"},
        "train": train,
        "eval": {"stride": 32, "val_stride": 32},
    }
    return SegmentationTask(load_config(values), DistInfo())


def test_training_presence_names_the_tile_and_maps_nan_to_absent() -> None:
    task = _task(modality_dropout={"dsm": 0.5})
    g = torch.Generator().manual_seed(0)
    batch = {**_inputs(b=2), "mask": torch.randint(0, 6, (2, 64, 64), generator=g), "name": ["area1", "area30"]}
    masks = [task.presence(batch) for _ in range(20)]
    assert all(m is not None and m["optical"].all() for m in masks)
    assert 0 < sum(int(m["dsm"].sum()) for m in masks) < 40  # some DSMs dropped, some kept
    assert torch.isfinite(task.training_step(batch))
    batch["dsm"][1, 0, :4, :4] = float("nan")
    with pytest.raises(NonFiniteInputError, match=r"dsm in tile 'area30': 16 of 4096 pixels"):
        task.training_step(batch)
    absent = _task(nonfinite="absent")
    mask = absent.presence(batch)
    assert mask is not None and mask["dsm"].tolist() == [True, False] and mask["optical"].all()
    assert torch.isfinite(absent.training_step(batch))


def test_bad_dropout_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="train.modality_dropout.*unknown modalities"):
        _task(modality_dropout={"sar": 0.5})
    assert isinstance(TrainingPresence, type) and modality_subsets(("optical", "dsm")) == [
        ("optical", "dsm"),
        ("optical",),
        ("dsm",),
    ]


def test_train_with_modality_dropout_then_eval_every_subset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = synthetic_config_file(tmp_path)
    run = [f"train.run_dir={tmp_path / 'run'}", *TINY_SYNTHETIC]
    assert main(["train", str(cfg), *run, "train.modality_dropout={dsm: 0.5, optical: 0.2}"]) == 0
    capsys.readouterr()
    assert main(["eval", str(cfg), "--weights", str(tmp_path / "run" / "best.safetensors"), *run, "--subsets"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("IoU (%)"))
    assert header.split()[2:] == ["optical+dsm", "optical", "dsm"]
    assert any(line.startswith("mIoU") and len(line.split()) == 4 for line in out.splitlines())
    saved = json.loads((next((tmp_path / "run").glob("eval_test_*_subsets")) / "subsets.json").read_text())["subsets"]
    assert list(saved) == ["optical+dsm", "optical", "dsm"] and all(0 <= v["mIoU"] <= 1 for v in saved.values())


def test_dropout_never_empties_a_sample_whose_other_modality_is_not_finite() -> None:
    """A NaN DSM (absent) and heavy dropout: the optical is kept for that tile, every draw."""
    task = _task(modality_dropout={"optical": 0.9, "dsm": 0.9}, nonfinite="absent")
    g = torch.Generator().manual_seed(0)
    batch = {**_inputs(b=2), "mask": torch.randint(0, 6, (2, 64, 64), generator=g), "name": ["a", "b"]}
    batch["dsm"][1, 0, :4, :4] = float("nan")
    for _ in range(50):
        mask = task.presence(batch)
        assert mask is not None and not mask["dsm"][1] and mask["optical"][1]  # the finite one stays
        assert all(bool(mask["optical"][i] | mask["dsm"][i]) for i in range(2))
