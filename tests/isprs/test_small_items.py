"""The smaller items of issue 30: a SAM2 file given to a SAM (v1) backbone named for what it is,
the official split's missing test files told apart (images or labels), a backbone override in the
run's name and folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmpeft_isprs.config import load_config
from mmpeft_isprs.data.splits import VAIHINGEN_SPLITS
from mmpeft_isprs.datamodule import ISPRSDataModule
from mmpeft_isprs.model.encoder_weights import EncoderCheckpointError
from mmpeft_isprs.model.mfnet import _base_encoder
from tests.isprs.archives import TINY, make_vaihingen_archive


def test_a_sam2_file_for_a_sam_backbone_says_what_it_is(tmp_path: Path) -> None:
    path = tmp_path / "sam2_hiera_tiny.pt"
    state = {"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(96, 3, 7, 7)}
    state["image_encoder.trunk.blocks.0.norm1.weight"] = torch.zeros(96)
    torch.save({"model": state}, path)
    tiny = [x for x in TINY if not x.startswith("model.checkpoint")]
    cfg = load_config("vaihingen_mmadapter_vit_b", [*tiny, f"model.checkpoint={path}"])
    with pytest.raises(
        EncoderCheckpointError, match=r"is a SAM2 checkpoint \(image_encoder\.trunk\.\*: width 96.*SAM \(v1\)"
    ):
        _base_encoder(cfg.model)


def _official_warning(root: Path, tmp_path: Path) -> str:
    lines: list[str] = []
    cfg = load_config(
        "vaihingen_mmadapter_vit_b",
        [f"data.root={root}", f"train.run_dir={tmp_path / 'run'}", "data.split=official", "data.val_fraction=0", *TINY],
    )
    ISPRSDataModule(cfg, log=lines.append).setup()
    return next(x for x in lines if x.startswith("warning: data.split=official"))


def test_the_official_splits_missing_files_are_told_apart(tmp_path: Path) -> None:
    official = VAIHINGEN_SPLITS["official"]
    root = tmp_path / "v"
    make_vaihingen_archive(root, [*official["train"], *official["test"]])
    for i in official["test"]:  # the participants' archives: no labels of the test tiles
        (root / "gts_for_participants" / f"top_mosaic_09cm_area{i}.tif").unlink()
        (root / "gts_eroded_for_participants" / f"top_mosaic_09cm_area{i}_noBoundary.tif").unlink()
    (root / "top" / "top_mosaic_09cm_area2.tif").unlink()  # and one image
    text = _official_warning(root, tmp_path)
    n = len(official["test"])
    assert f"{n} of the {n} official test tiles lack files" in text
    assert (
        f"missing 1 image file(s) (first: {root / 'top' / 'top_mosaic_09cm_area2.tif'} (tile 2, modality optical"
        in text
    )
    assert f"{n} label file(s) (first: " in text and "ground_truth_eroded_COMPLETE" in text


def test_a_backbone_override_renames_the_run_and_its_folder() -> None:
    cfg = load_config("vaihingen_mmadapter_vit_b", ["model.backbone=sam2_hiera_tiny"])
    assert (cfg.name, cfg.train.run_dir) == (
        "vaihingen_mmadapter_sam2_hiera_tiny",
        "runs/vaihingen_mmadapter_sam2_hiera_tiny",
    )
    cfg = load_config("vaihingen_mmadapter_vit_b", ["model.backbone=vit_l", "name=mine", "train.run_dir=runs/x"])
    assert (cfg.name, cfg.train.run_dir) == ("mine", "runs/x")  # given: kept


def test_an_elevation_modalitys_fill_is_set_where_it_acts() -> None:
    from mmpeft_isprs.config import ConfigError

    with pytest.raises(ConfigError, match=r"data\.modalities\.dsm\.fill: dsm is an elevation modality.*data\.dsm_fill"):
        load_config("vaihingen_mmadapter_vit_b", ["data.modalities.dsm.fill=raise"])
    with pytest.raises(ConfigError, match=r"data\.modalities\.dem\.nodata: .*data\.dsm_nodata"):
        load_config("vaihingen_mmadapter_vit_b", ["data.modalities.dem={source: dsm, nodata: -9999}"])
