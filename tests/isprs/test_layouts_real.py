"""The data sets as downloaded: real archive file names and folders (Potsdam's zero-padded nDSM
ids, the complete ground-truth folders, MMHunan's flat folders), split presets and lists, file
patterns from the config, and every data defect named with file, tile and pixel count.

Tiles are tiny generated files laid out like the real archives; nothing is renamed."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml

from mmpeft_isprs.cli import main
from mmpeft_isprs.config import ConfigError, load_config
from mmpeft_isprs.data import (
    DataError,
    DataWarning,
    DsmNormalisation,
    MMHunanLayout,
    PotsdamLayout,
    SplitSpec,
    TileSet,
    VaihingenLayout,
    pair_inputs,
    write_tiff,
)
from mmpeft_isprs.data.inputs import dsm_tensor
from mmpeft_isprs.data.patterns import pad_id, tile_key, tile_key_of_name
from mmpeft_isprs.data.splits import POTSDAM_SPLITS, VAIHINGEN_SPLITS
from mmpeft_isprs.datamodule import make_layout, split_ids
from tests.isprs.archives import SIZE, TINY, make_mmhunan_archive, make_potsdam_archive, make_vaihingen_archive


def _all_ids(table: dict[str, dict[str, list[str]]]) -> list[str]:
    return sorted({i for split in table["authors"].values() for i in split})


# ------------------------------------------------------------------ end to end from the archives


def _train_eval_predict(tmp_path: Path, config: str, root: Path, optical: Path, dsm: Path, capsys) -> dict:
    run = tmp_path / "run"
    assert main(["train", config, f"data.root={root}", f"train.run_dir={run}", *TINY]) == 0
    # eval with no override repeated: the experiment saved with the weights is used
    assert main(["eval", config, "--weights", str(run / "best.safetensors")]) == 0
    err = capsys.readouterr().err
    assert "error" not in err
    metrics = json.loads((next(run.glob("eval_test_stride32_logit_sum_*")) / "metrics.json").read_text())
    k = 7 if "mmhunan" in config else 6
    assert len(metrics["confusion"]) == k and all(len(row) == k for row in metrics["confusion"])
    out = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                "--weights",
                str(run / "best.safetensors"),
                "--optical",
                str(optical),
                "--dsm",
                str(dsm),
                "--out",
                str(out),
                "--stride",
                "32",
            ]
        )
        == 0
    )
    assert len(list(out.glob("*_colour.png"))) == len([p for p in optical.iterdir() if p.is_file()])
    return metrics


def test_vaihingen_archive_trains_evaluates_predicts(tmp_path: Path, capsys) -> None:
    root = tmp_path / "vaihingen"
    make_vaihingen_archive(root, _all_ids(VAIHINGEN_SPLITS))
    m = _train_eval_predict(tmp_path, "vaihingen_mmadapter_vit_b", root, root / "top", root / "dsm", capsys)
    assert m["protocol"]["tiles"] == ["5", "21", "15", "30"]


def test_potsdam_archive_zero_padded_ndsm_trains_evaluates_predicts(tmp_path: Path, capsys) -> None:
    root = tmp_path / "potsdam"
    make_potsdam_archive(root, _all_ids(POTSDAM_SPLITS))
    assert (root / "1_DSM_normalisation" / "dsm_potsdam_02_10_normalized_lastools.jpg").is_file()
    m = _train_eval_predict(
        tmp_path, "potsdam_mmlora_vit_b", root, root / "4_Ortho_RGBIR", root / "1_DSM_normalisation", capsys
    )
    assert m["protocol"]["tiles"] == ["4_10", "5_11", "2_11", "3_10", "6_11", "7_12"]
    assert sorted(p.name for p in (tmp_path / "pred").glob("*_pred.*"))[0] == "top_potsdam_2_10_RGBIR_pred.png"


def test_mmhunan_flat_archive_seeded_split_recorded(tmp_path: Path, capsys) -> None:
    root = tmp_path / "mmhunan"
    make_mmhunan_archive(root, 20)
    m = _train_eval_predict(tmp_path, "mmhunan_mmlora_vit_b", root, root / "images_png", root / "dsm_pngs", capsys)
    assert len(m["protocol"]["tiles"]) == 2  # 18 / 2 of 20 with the default ratio 0.9
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    assert recorded["train_ratio"] == 0.9 and recorded["split_seed"] == 0


# ------------------------------------------------------------------ names, splits, patterns


def test_tile_ids_ignore_zero_padding() -> None:
    assert tile_key("02_10") == "2_10" and tile_key("05") == "5" and tile_key("a1") == "a1"
    assert pad_id("2_10") == "02_10" and pad_id("7_7") == "07_07"
    assert tile_key_of_name("dsm_potsdam_02_10_normalized_lastools") == "2_10"
    assert tile_key_of_name("top_potsdam_2_10_RGBIR") == "2_10" and tile_key_of_name("dsm_09cm_matching_area5") == "5"


def test_potsdam_real_names_and_unpadded_copies(tmp_path: Path) -> None:
    f = PotsdamLayout().tile_files(tmp_path, "2_10")
    assert f.inputs["dsm"] == tmp_path / "1_DSM_normalisation" / "dsm_potsdam_02_10_normalized_lastools.jpg"
    assert f.labels == tmp_path / "5_Labels_for_participants" / "top_potsdam_2_10_label.tif"
    # a copy whose nDSM names are not padded still pairs with tile 2_10
    (tmp_path / "1_DSM_normalisation").mkdir()
    (tmp_path / "1_DSM_normalisation" / "dsm_potsdam_2_10_normalized_lastools.jpg").write_bytes(b"x")
    assert PotsdamLayout().tile_files(tmp_path, "2_10").inputs["dsm"].name == "dsm_potsdam_2_10_normalized_lastools.jpg"
    # and an id written padded in a split list finds the unpadded RGBIR file
    (tmp_path / "4_Ortho_RGBIR").mkdir()
    (tmp_path / "4_Ortho_RGBIR" / "top_potsdam_2_10_RGBIR.tif").write_bytes(b"x")
    assert PotsdamLayout().tile_files(tmp_path, "02_10").inputs["optical"].name == "top_potsdam_2_10_RGBIR.tif"


def test_vaihingen_complete_ground_truth_folders(tmp_path: Path) -> None:
    full = tmp_path / "ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE" / "top_mosaic_09cm_area2.tif"
    eroded = (
        tmp_path
        / "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE"
        / "top_mosaic_09cm_area2_noBoundary.tif"
    )
    for p in (full, eroded):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
    f = VaihingenLayout().tile_files(tmp_path, "2")
    assert f.labels == full and f.eval_labels == eroded


def test_file_patterns_from_the_config(tmp_path: Path) -> None:
    root = tmp_path / "potsdam"
    make_potsdam_archive(root, ["2_10", "7_12"])
    (root / "1_DSM_normalisation").rename(root / "ndsm")  # the user's copy: another folder name
    cfg = load_config(
        "potsdam_mmlora_vit_b",
        [
            f"data.root={root}",
            "data.splits={train: [2_10], test: [7_12]}",
            "data.val_fraction=0",
            "data.files.dsm=ndsm/dsm_potsdam_{id0}_normalized_lastools.jpg",
        ],
    )
    layout = make_layout(cfg.data)
    assert layout.tile_files(root, "7_12").inputs["dsm"] == root / "ndsm" / "dsm_potsdam_07_12_normalized_lastools.jpg"
    assert TileSet(layout, root, "train").ids == ["2_10"]
    with pytest.raises(
        ConfigError, match=r"^data\.files\.ndsm: no modality reads the role 'ndsm'.*did you mean dsm\?$"
    ):
        load_config("potsdam_mmlora_vit_b", ["data.files.ndsm=x/{id}.jpg"])  # a new role nothing reads: a typo
    with pytest.raises(ConfigError, match=r"must contain \{id\} \(the tile id\) or \{id0\}"):
        load_config("potsdam_mmlora_vit_b", ["data.files.dsm=x/dsm.jpg"])


def test_split_presets_authors_and_official() -> None:
    for name, sizes in (
        ("vaihingen_mmadapter_vit_b", {"authors": (12, 4), "official": (16, 17)}),
        ("potsdam_mmadapter_vit_b", {"authors": (18, 6), "official": (24, 14)}),
    ):
        for preset, (n_train, n_test) in sizes.items():
            data = load_config(name, [f"data.split={preset}", "data.val_fraction=0"]).data
            assert (len(split_ids(data, "train")), len(split_ids(data, "test"))) == (n_train, n_test)
    assert load_config("vaihingen_mmadapter_vit_b").data.split == "authors"
    old = load_config("vaihingen_mmadapter_vit_b", ["data.split=paper", "data.val_fraction=0"]).data
    assert split_ids(old, "test") == ["5", "21", "15", "30"]  # older runs' name of the same split
    assert VaihingenLayout(SplitSpec(protocol="official")).split_ids("test", Path("."))[:3] == ["2", "4", "6"]


def test_mmhunan_default_split_is_seeded_450_50(tmp_path: Path) -> None:
    root = tmp_path / "mmhunan"
    for sub in ("images_png", "dsm_pngs", "masks_png"):
        (root / sub).mkdir(parents=True)
    for i in range(500):
        (root / "images_png" / f"{i}.png").write_bytes(b"x")
    cfg = load_config("mmhunan_mmlora_vit_b", [f"data.root={root}", "data.val_fraction=0"]).data
    train, test = split_ids(cfg, "train"), split_ids(cfg, "test")
    assert (len(train), len(test)) == (450, 50) and not set(train) & set(test)
    assert split_ids(cfg, "test") == test  # the same draw every time
    other = load_config("mmhunan_mmlora_vit_b", [f"data.root={root}", "data.val_fraction=0", "data.split_seed=1"]).data
    assert split_ids(other, "test") != test
    assert MMHunanLayout().split_source(root) == "seeded ratio 0.9 (data.train_ratio, seed data.split_seed=0)"


def test_mmhunan_split_from_id_list_files_or_explicit_lists(tmp_path: Path) -> None:
    root = tmp_path / "mmhunan"
    make_mmhunan_archive(root, 5)
    (root / "lists").mkdir()
    (root / "lists" / "tr.txt").write_text("0\n1\n# a comment\n2\n")
    (root / "lists" / "te.txt").write_text("3 \n4\n")
    cfg = load_config(
        "mmhunan_mmlora_vit_b",
        [f"data.root={root}", "data.val_fraction=0", "data.split_files={train: lists/tr.txt, test: lists/te.txt}"],
    )
    assert TileSet(make_layout(cfg.data), root, "test").ids == ["3", "4"]
    assert split_ids(cfg.data, "train") == ["0", "1", "2"]
    explicit = load_config(
        "mmhunan_mmlora_vit_b", [f"data.root={root}", "data.val_fraction=0", "data.splits={train: [4], test: [0]}"]
    ).data
    assert split_ids(explicit, "test") == ["0"]
    gone = load_config("mmhunan_mmlora_vit_b", [f"data.root={root}", "data.split_files={train: lists/nope.txt}"]).data
    with pytest.raises(ConfigError, match=f"^data.split_files: split list {root / 'lists' / 'nope.txt'} not found$"):
        split_ids(gone, "train")


# ------------------------------------------------------------------ data defects, named


def _nan_vaihingen(root: Path) -> Path:
    make_vaihingen_archive(root, ["1"])
    path = root / "dsm" / "dsm_09cm_matching_area1.tif"
    dsm = tifffile.imread(path)
    dsm[0, 3] = dsm[2, 5] = dsm[4, 4] = np.nan
    write_tiff(path, dsm)
    return path


def test_dsm_nodata_warns_with_file_tile_and_count_and_raise_fails(tmp_path: Path) -> None:
    path = _nan_vaihingen(tmp_path)
    first = "DSM has 3 NaN/no-data pixel(s) (no-data value None), first at (row 0, col 3)"
    with pytest.warns(DataWarning) as record:  # training / evaluation tiles
        TileSet(VaihingenLayout(), tmp_path, ["1"])
    (w,) = [r for r in record if r.category is DataWarning]
    lo = float(np.nanmin(tifffile.imread(path)))
    assert (
        str(w.message)
        == f"{path} (tile 1): {first}: filled with the tile minimum {lo:g} (data.dsm_fill=raise rejects them)"
    )
    with pytest.warns(DataWarning, match=r"\(tile 1\): DSM has 3 NaN/no-data pixel"):  # predict
        dsm_tensor(path, DsmNormalisation())
    with pytest.raises(DataError) as info:
        TileSet(VaihingenLayout(), tmp_path, ["1"], dsm=DsmNormalisation(fill="raise"))
    assert info.value.args[0].endswith(
        f"{path} (tile 1): {first}; set data.dsm_fill=min to fill them with the tile minimum"
    )
    with pytest.raises(DataError, match=r"\(tile 1\): DSM has 3 NaN/no-data pixel\(s\).*data.dsm_fill=min"):
        dsm_tensor(path, DsmNormalisation(fill="raise"))


def test_dsm_nodata_warning_reaches_the_command_line(tmp_path: Path, capsys) -> None:
    root = tmp_path / "vaihingen"
    make_vaihingen_archive(root, ["1", "5"])
    path = root / "dsm" / "dsm_09cm_matching_area5.tif"
    dsm = tifffile.imread(path)
    dsm[1, 1] = -9999
    write_tiff(path, dsm)
    run = tmp_path / "run"
    args = [
        f"data.root={root}",
        f"train.run_dir={run}",
        "data.splits={train: [1], test: [5]}",
        "data.val_fraction=0",
        "data.dsm_nodata=-9999",
        *TINY,
    ]
    assert main(["train", "vaihingen_mmadapter_vit_b", *args]) == 0
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["eval", "vaihingen_mmadapter_vit_b", "--weights", str(run / "best.safetensors")]) == 0
    assert any(
        f"{path} (tile 5): DSM has 1 NaN/no-data pixel(s) (no-data value -9999.0)" in str(w.message) for w in seen
    )
    assert (
        main(["eval", "vaihingen_mmadapter_vit_b", "--weights", str(run / "best.safetensors"), "data.dsm_fill=raise"])
        == 2
    )
    assert f"{path} (tile 5): DSM has 1 NaN/no-data pixel(s)" in capsys.readouterr().err


def test_predict_names_the_unpaired_file(tmp_path: Path) -> None:
    root = tmp_path / "potsdam"
    make_potsdam_archive(root, ["2_10", "7_12"])
    dsm_dir = root / "1_DSM_normalisation"
    pairs = pair_inputs([root / "4_Ortho_RGBIR"], [dsm_dir])
    assert [(o.name, d.name) for o, d in pairs] == [
        ("top_potsdam_2_10_RGBIR.tif", "dsm_potsdam_02_10_normalized_lastools.jpg"),
        ("top_potsdam_7_12_RGBIR.tif", "dsm_potsdam_07_12_normalized_lastools.jpg"),
    ]
    (dsm_dir / "dsm_potsdam_07_12_normalized_lastools.jpg").unlink()
    with pytest.raises(FileNotFoundError) as info:
        pair_inputs([root / "4_Ortho_RGBIR"], [dsm_dir])
    opt = root / "4_Ortho_RGBIR" / "top_potsdam_7_12_RGBIR.tif"
    assert (
        str(info.value)
        == f"1 optical file(s) without a DSM:\n  {opt} (tile 7_12): no DSM file of tile 7_12 in --dsm {dsm_dir}"
    )


def test_size_mismatch_names_each_file_with_its_own_size(tmp_path: Path) -> None:
    import torch

    from mmpeft_isprs.data import check_sizes

    a, b = tmp_path / "top_potsdam_2_10_RGBIR.tif", tmp_path / "dsm_potsdam_02_10_normalized_lastools.jpg"
    with pytest.raises(DataError) as info:
        check_sizes("2_10", [(a, torch.zeros(3, 40, 30)), (b, torch.zeros(1, 32, 32))])
    assert str(info.value) == f"tile 2_10: sizes differ: {a} 40x30, {b} 32x32"
    root = tmp_path / "v"
    make_vaihingen_archive(root, ["1"])
    top = root / "top" / "top_mosaic_09cm_area1.tif"
    write_tiff(top, np.zeros((SIZE, SIZE + 3, 3), np.uint8))
    with pytest.raises(DataError) as info:
        TileSet(VaihingenLayout(), root, ["1"])
    dsm, lab = root / "dsm" / "dsm_09cm_matching_area1.tif", root / "gts_for_participants" / "top_mosaic_09cm_area1.tif"
    assert f"tile 1: sizes differ: {top} 32x35, {dsm} 32x32, {lab} 32x32" in str(info.value)
