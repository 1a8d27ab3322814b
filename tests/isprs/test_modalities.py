"""Any number of modalities and bands through the pipeline: Potsdam's RGB, near-infrared and nDSM
as three modalities (train, the seven-row ``eval --subsets`` table, figures with every modality,
``predict`` with one folder per modality), per-modality bands and statistics in the data config,
a 12-band modality, and the errors that name the file, modality, band, tile and folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from mmpeft_isprs.cli import main
from mmpeft_isprs.config import ConfigError, load_config
from mmpeft_isprs.data import ISPRS, DataError, index_to_colour, write_tiff
from mmpeft_isprs.data.splits import POTSDAM_SPLITS
from mmpeft_isprs.datamodule import make_tileset, modality_specs
from tests.helpers import assert_close
from tests.isprs.archives import TINY, make_potsdam_archive

THREE = "potsdam_rgb_nir_dsm_mmadapter_vit_b"
IDS = sorted({i for split in POTSDAM_SPLITS["authors"].values() for i in split})


@pytest.fixture(scope="module")
def potsdam(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("potsdam")
    make_potsdam_archive(root, IDS)
    return root


def test_potsdam_three_modalities_train_eval_subsets_predict(potsdam: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert (
        main(["train", THREE, f"data.root={potsdam}", f"train.run_dir={run}", *TINY, "eval.save_predictions=true"]) == 0
    )
    out = capsys.readouterr().out
    assert "modalities ['optical', 'nir', 'dsm']" in out
    assert main(["eval", THREE, "--weights", str(run / "best.safetensors"), "--subsets"]) == 0
    out = capsys.readouterr().out
    subsets = ["optical+nir+dsm", "optical+nir", "optical+dsm", "nir+dsm", "optical", "nir", "dsm"]
    table = out[out.index("IoU (%)") :].splitlines()
    assert [row.split()[0] for row in table[1:8]] == subsets  # one row per subset
    saved = json.loads(next(run.glob("eval_test*/subsets.json")).read_text())["subsets"]
    assert list(saved) == subsets
    tiles = POTSDAM_SPLITS["authors"]["test"]
    figures = next(run.glob("eval_test*/figures"))
    assert len(list(figures.glob("tile_*.png"))) == len(tiles)
    width = Image.open(next(figures.glob("tile_*.png"))).size[0]
    assert width == round(3.2 * 6 * 100)  # 3.2 inches at 100 dpi a panel: three modalities, truth, prediction, errors
    pred = tmp_path / "pred"  # nir reuses the RGBIR files (the same source)
    args = ["predict", "--weights", str(run / "best.safetensors"), "--stride", "32"]
    assert (
        main(
            [
                *args,
                "--optical",
                str(potsdam / "4_Ortho_RGBIR"),
                "--dsm",
                str(potsdam / "1_DSM_normalisation"),
                "--out",
                str(pred),
            ]
        )
        == 0
    )
    assert len(list(pred.glob("*_colour.png"))) == len(IDS)
    folders = tmp_path / "pred_folders"  # one folder per modality, named
    assert (
        main(
            [
                *args,
                "--input",
                f"optical={potsdam / '4_Ortho_RGBIR'}",
                "--input",
                f"nir={potsdam / '4_Ortho_RGBIR'}",
                "--input",
                f"dsm={potsdam / '1_DSM_normalisation'}",
                "--out",
                str(folders),
            ]
        )
        == 0
    )
    first = sorted(pred.glob("*_pred.png"))[0]
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(folders / first.name)))


def test_predict_names_the_tile_and_folder_a_modality_lacks(potsdam: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", THREE, f"data.root={potsdam}", f"train.run_dir={run}", *TINY, "data.val_fraction=0"]) == 0
    nir = tmp_path / "nir"
    nir.mkdir()
    for i in ("2_10", "2_11"):
        write_tiff(nir / f"nir_{i}.tif", np.zeros((32, 32, 4), np.uint8))
    opt = tmp_path / "optical"
    opt.mkdir()
    for i in ("2_10", "2_11", "2_12"):
        (opt / f"top_potsdam_{i}_RGBIR.tif").write_bytes(
            (potsdam / "4_Ortho_RGBIR" / f"top_potsdam_{i}_RGBIR.tif").read_bytes()
        )
    assert (
        main(
            [
                "predict",
                "--weights",
                str(run / "best.safetensors"),
                "--optical",
                str(opt),
                "--dsm",
                str(potsdam / "1_DSM_normalisation"),
                "--input",
                f"nir={nir}",
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"{opt / 'top_potsdam_2_12_RGBIR.tif'} (tile 2_12): no nir file of tile 2_12 in --input nir={nir}" in err
    assert (
        main(
            [
                "predict",
                "--weights",
                str(run / "best.safetensors"),
                "--optical",
                str(opt),
                "--input",
                f"sar={nir}",
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 2
    )
    assert "--input: this model has no modality ['sar']; it uses ['optical', 'nir', 'dsm']" in capsys.readouterr().err


def test_a_band_out_of_range_names_the_file_the_modality_and_the_band(potsdam: Path) -> None:
    cfg = load_config(THREE, [f"data.root={potsdam}", "data.modalities.nir.bands=[4]"])
    with pytest.raises(DataError) as info:
        make_tileset(cfg.data, "test")
    path = potsdam / "4_Ortho_RGBIR" / f"top_potsdam_{POTSDAM_SPLITS['authors']['test'][0]}_RGBIR.tif"
    assert f"{path}: modality 'nir' asks for band 4 (bands [4], counted from 0), the file has 4 band(s) (0..3)" in str(
        info.value
    )


def test_a_modality_folder_missing_a_tile_names_the_tile_and_the_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for stem in ("a", "b"):
        for folder, arr in (
            ("optical", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
            ("sar", rng.random((32, 32, 2)).astype(np.float32)),
            ("labels", rng.integers(0, 6, (32, 32), dtype=np.uint8)),
        ):
            write_tiff(tmp_path / folder / f"{stem}.tif", arr)
    (tmp_path / "sar" / "b.tif").unlink()
    cfg = load_config(
        "vaihingen_mmadapter_vit_b",
        [
            f"data.root={tmp_path}",
            "data.dataset=generic",
            "data.generic.modalities={optical: image, sar: image}",
            "data.splits={train: [a, b], test: [b]}",
            "data.val_fraction=0",
            "model.modalities=[optical, sar]",
        ],
    )
    with pytest.raises(DataError) as info:
        make_tileset(cfg.data, "train")
    assert f"{tmp_path / 'sar' / 'b.tif'} (tile b, modality sar, folder {tmp_path / 'sar'})" in str(info.value)


def test_bands_and_statistics_per_modality(potsdam: Path) -> None:
    mean, std = [0.3], [0.2]
    cfg = load_config(
        THREE, [f"data.root={potsdam}", f"data.modalities.nir.mean={mean}", f"data.modalities.nir.std={std}"]
    )
    specs = modality_specs(cfg.data)
    assert (specs["nir"].bands, specs["nir"].source, specs["nir"].kind) == ((3,), "optical", "image")
    assert specs["optical"].bands == (0, 1, 2) and specs["dsm"].kind == "elevation"
    tiles = make_tileset(cfg.data, "test")
    sample = tiles.load(0)
    raw = tifffile.imread(potsdam / "4_Ortho_RGBIR" / f"top_potsdam_{tiles.ids[0]}_RGBIR.tif")
    expected = (raw[..., 3].astype(np.float32) / 255 - 0.3) / 0.2  # by hand
    assert sample["nir"].shape == (1, 32, 32)
    assert_close(sample["nir"][0], torch.from_numpy(expected), rel=1e-5)
    assert_close(sample["optical"], torch.from_numpy(raw[..., :3].transpose(2, 0, 1) / 255).float(), rel=1e-5)


def test_modality_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model.modalities: potsdam provides \['optical', 'dsm'\].*not \['nir'\]"):
        load_config("potsdam_mmadapter_vit_b", ["model.modalities=[optical, nir, dsm]"])
    with pytest.raises(ConfigError, match=r"data.modalities.nir: give mean and std together"):
        load_config(THREE, ["data.modalities.nir.mean=[0.5]"])
    with pytest.raises(ConfigError, match=r"data.modalities.nir: mean and std have 2 numbers for 1 band"):
        load_config(THREE, ["data.modalities.nir.mean=[0.5, 0.5]", "data.modalities.nir.std=[1, 1]"])
    cfg = load_config(THREE, ["data.modalities.sar={source: sar}"])
    with pytest.raises(
        ConfigError, match=r"data.modalities.sar.source: potsdam has no file role 'sar'.*data.files.sar"
    ):
        modality_specs(cfg.data)


def test_a_twelve_band_modality_trains_through_the_pipeline(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    for stem in ("a", "b", "c"):
        write_tiff(tmp_path / "ms" / f"{stem}.tif", rng.integers(0, 2**16, (32, 32, 12), dtype=np.uint16))
        write_tiff(tmp_path / "dsm" / f"{stem}.tif", rng.random((32, 32)).astype(np.float32))
        write_tiff(tmp_path / "labels" / f"{stem}.tif", index_to_colour(rng.integers(0, 6, (32, 32)), ISPRS))
    run = tmp_path / "run"
    args = [
        f"data.root={tmp_path}",
        "data.dataset=generic",
        "data.generic.modalities={ms: image, dsm: elevation}",
        "data.generic.label_format=colour",
        "data.splits={train: [a, b], test: [c]}",
        "data.val_fraction=0",
        "model.modalities=[ms, dsm]",
        "model.stems={ms: [adapt, 12]}",
        f"train.run_dir={run}",
        *TINY,
    ]
    assert main(["train", "vaihingen_mmadapter_vit_b", *args, "train.batches_per_epoch=2"]) == 0
    assert main(["eval", "vaihingen_mmadapter_vit_b", "--weights", str(run / "best.safetensors")]) == 0
    assert "mIoU" in capsys.readouterr().out
    pred = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                "--weights",
                str(run / "best.safetensors"),
                "--input",
                f"ms={tmp_path / 'ms'}",
                "--dsm",
                str(tmp_path / "dsm"),
                "--out",
                str(pred),
                "--stride",
                "32",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in pred.glob("*_pred.*")) == ["a_pred.png", "b_pred.png", "c_pred.png"]


def test_a_file_two_modalities_share_is_read_once_per_tile(potsdam: Path, tmp_path: Path, monkeypatch) -> None:
    from collections import Counter

    import mmpeft_isprs.predict as predict_module
    from mmpeft_isprs.data import tiles as tiles_module

    reads: Counter[Path] = Counter()

    def counting(real):  # type: ignore[no-untyped-def]
        def read(path, *args):  # type: ignore[no-untyped-def]
            reads[Path(path)] += 1
            return real(path, *args)

        return read

    monkeypatch.setattr(tiles_module, "read_image", counting(tiles_module.read_image))
    cached = make_tileset(load_config(THREE, [f"data.root={potsdam}"]).data, "test")
    assert reads[cached.files(0).inputs["optical"]] == 1  # optical and nir from one RGBIR file
    lazy = make_tileset(load_config(THREE, [f"data.root={potsdam}", "data.cache=false"]).data, "test")
    reads.clear()
    monkeypatch.setattr(lazy._readers, "read", counting(lazy._readers.read))
    lazy.read_window(0, 0, 0, 8, 8)
    assert reads[lazy.files(0).inputs["optical"]] == 1
    run = tmp_path / "run"
    assert main(["train", THREE, f"data.root={potsdam}", f"train.run_dir={run}", *TINY, "data.val_fraction=0"]) == 0
    monkeypatch.setattr(predict_module, "read_image", counting(predict_module.read_image))
    reads.clear()
    assert (
        main(
            [
                "predict",
                "--weights",
                str(run / "best.safetensors"),
                "--optical",
                str(potsdam / "4_Ortho_RGBIR"),
                "--dsm",
                str(potsdam / "1_DSM_normalisation"),
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    assert len(reads) == 2 * len(IDS) and set(reads.values()) == {1}
