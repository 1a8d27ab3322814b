"""Rasters of their own beside a standard archive (``data.files.<role>`` for a new role), and
missing pixels of every float modality named by file and band (issue 30, items 1 and 2).

A 12-band float multispectral raster (``ms/``) and a 2-band SAR raster (``sar/``) sit beside a
Vaihingen archive laid out as downloaded; nothing is renamed or rebuilt as a generic tree."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

from mmpeft_isprs.cli import main
from mmpeft_isprs.config import ConfigError, load_config
from mmpeft_isprs.data import DataError, DataWarning, ModalitySpec, TileSet, write_tiff
from mmpeft_isprs.data.inputs import modality_tensor
from mmpeft_isprs.data.nodata import band_fills, fill_bands
from mmpeft_isprs.datamodule import DsmNormalisation, make_layout, make_tileset
from tests.isprs.archives import SIZE, TINY, make_vaihingen_archive

IDS = ["1", "3", "5", "7"]
MS = ["data.files.ms=ms/ms_area{id}.tif", "data.files.sar=sar/sar_area{id}.tif"]
SPLITS = ["data.splits={train: [1, 3, 7], test: [5]}", "data.val_fraction=0"]
MODEL = ["model.modalities=[optical, ms, sar, dsm]", "model.stems={ms: [adapt, 12], sar: [conv1x1, 2]}"]


def make_archive(root: Path) -> None:
    """A Vaihingen archive plus ``ms/ms_area{id}.tif`` (12 float bands) and ``sar/sar_area{id}.tif`` (2)."""
    make_vaihingen_archive(root, IDS)
    rng = np.random.default_rng(1)
    for i in IDS:
        write_tiff(root / "ms" / f"ms_area{i}.tif", rng.uniform(0, 0.5, (SIZE, SIZE, 12)).astype(np.float32))
        write_tiff(root / "sar" / f"sar_area{i}.tif", rng.normal(-10, 3, (SIZE, SIZE, 2)).astype(np.float32))


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vaihingen_ms")
    make_archive(root)
    return root


def _cfg(root: Path, *extra: str):  # type: ignore[no-untyped-def]
    return load_config("vaihingen_mmadapter_vit_b", [f"data.root={root}", *MS, *SPLITS, *MODEL, *TINY, *extra])


def _with_nan(root: Path, tmp_path: Path, band: int = 7) -> Path:
    """A copy of the archive whose ms tile 3 has NaN in ``band`` (rows 0-1)."""
    copy = tmp_path / "archive"
    make_archive(copy)
    path = copy / "ms" / "ms_area3.tif"
    ms = tifffile.imread(path)
    ms[:2, :, band] = np.nan
    write_tiff(path, ms)
    return copy


def test_new_roles_are_modalities_read_beside_the_archive(archive: Path) -> None:
    cfg = _cfg(archive)
    layout = make_layout(cfg.data)
    specs = {m.name: m for m in layout.modalities}
    assert specs["ms"].role == "ms" and specs["sar"].role == "sar" and specs["ms"].kind == "image"
    tiles = make_tileset(cfg.data, "train", layout=layout)
    sample = tiles.load(0)
    assert sample["ms"].shape == (12, SIZE, SIZE) and sample["sar"].shape == (2, SIZE, SIZE)
    expected = tifffile.imread(archive / "sar" / "sar_area1.tif")
    assert np.array_equal(sample["sar"].numpy(), np.moveaxis(expected, -1, 0))  # float data kept as stored


def test_a_new_role_refined_by_data_modalities_keeps_its_bands(archive: Path) -> None:
    cfg = load_config(
        "vaihingen_mmadapter_vit_b",
        [
            f"data.root={archive}",
            MS[1],
            *SPLITS,
            *TINY,
            "data.modalities.vv={source: sar, bands: [0]}",
            "model.modalities=[optical, vv, dsm]",
        ],
    )
    tiles = make_tileset(cfg.data, "train")
    assert tiles.load(0)["vv"].shape == (1, SIZE, SIZE)
    assert "sar" not in tiles.modality_names  # the role is read through vv only


def test_a_new_role_that_no_modality_reads_is_refused_with_the_close_role() -> None:
    with pytest.raises(ConfigError, match=r"data\.files\.dms: no modality reads the role 'dms'.*did you mean dsm"):
        load_config("vaihingen_mmadapter_vit_b", ["data.files.dms=ndsm/dsm_{id}.tif"])
    with pytest.raises(ConfigError, match=r"data\.files\.sar.*pattern.*\{id\}"):
        load_config("vaihingen_mmadapter_vit_b", ["data.files.sar=sar/sar.tif", "model.modalities=[optical, sar]"])


def test_a_new_roles_missing_file_and_size_are_named(archive: Path, tmp_path: Path) -> None:
    copy = tmp_path / "archive"
    make_archive(copy)
    (copy / "sar" / "sar_area3.tif").unlink()
    write_tiff(copy / "ms" / "ms_area7.tif", np.zeros((SIZE, SIZE + 8, 12), np.float32))
    with pytest.raises(DataError) as err:
        make_tileset(_cfg(copy).data, "train")
    assert f"{copy / 'sar' / 'sar_area3.tif'} (tile 3, modality sar, folder {copy / 'sar'})" in str(err.value)
    (copy / "sar" / "sar_area3.tif").write_bytes((archive / "sar" / "sar_area3.tif").read_bytes())
    with pytest.raises(DataError, match=rf"tile 7: sizes differ: .*{copy / 'ms' / 'ms_area7.tif'} 32x40"):
        make_tileset(_cfg(copy).data, "train")


def test_new_roles_in_the_other_layouts(tmp_path: Path) -> None:
    """Potsdam, MMHunan and generic take a new role the same way (here one file pattern each)."""
    for dataset in ("potsdam", "mmhunan"):
        cfg = load_config(
            f"{dataset}_mmlora_vit_b",
            [f"data.root={tmp_path}", "data.files.sar=sar/{id}.tif", "model.modalities=[optical, sar, dsm]"],
        )
        files = make_layout(cfg.data).tile_files(tmp_path, "2_10")
        assert files.inputs["sar"] == tmp_path / "sar" / "2_10.tif", dataset
    generic = load_config(
        "vaihingen_mmadapter_vit_b",
        [
            f"data.root={tmp_path}",
            "data.dataset=generic",
            "data.files.sar=radar/s1_{id}_vv.tif",
            "model.modalities=[optical, sar, dsm]",
        ],
    )
    files = make_layout(generic.data).tile_files(tmp_path, "a1")
    assert files.inputs["sar"] == tmp_path / "radar" / "s1_a1_vv.tif"
    assert files.inputs["optical"].parent == tmp_path / "optical"


@pytest.mark.slow
def test_ms_and_sar_beside_vaihingen_train_evaluate_subsets_and_predict(archive: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    args = [f"data.root={archive}", f"train.run_dir={run}", *MS, *SPLITS, *MODEL, *TINY]
    assert main(["train", "vaihingen_mmadapter_vit_b", *args]) == 0
    weights = str(run / "best.safetensors")
    assert main(["eval", "vaihingen_mmadapter_vit_b", "--weights", weights, "--subsets"]) == 0
    folder = next(run.glob("eval_test_*_subsets"))
    subsets = json.loads((folder / "subsets.json").read_text())
    assert len(subsets["subsets"]) == 15  # 2^4 - 1 subsets of optical, ms, sar, dsm
    assert all(len(s["confusion"]) == 6 and len(s["support"]) == 6 for s in subsets["subsets"].values())
    out = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                "--weights",
                weights,
                "--optical",
                str(archive / "top"),
                "--dsm",
                str(archive / "dsm"),
                "--input",
                f"ms={archive / 'ms'}",
                "--input",
                f"sar={archive / 'sar'}",
                "--out",
                str(out),
                "--stride",
                "32",
            ]
        )
        == 0
    )
    assert len(list(out.glob("*_colour.png"))) == len(IDS)
    assert "error" not in capsys.readouterr().err


# ------------------------------------------------------------------ missing pixels of float modalities


def test_a_nan_band_is_named_with_file_and_band_in_both_policies(tmp_path: Path) -> None:
    root = _with_nan(tmp_path / "a", tmp_path)
    path = root / "ms" / "ms_area3.tif"
    with pytest.warns(DataWarning) as got:
        tiles = make_tileset(_cfg(root).data, "train")
    text = "\n".join(str(w.message) for w in got)
    assert f"{path} (tile 3): modality 'ms' has NaN/inf/no-data pixels" in text and "band 7 64 px" in text
    sample = tiles.load(tiles.ids.index("3"))["ms"]
    assert bool(np.isfinite(sample.numpy()).all())  # filled: no NaN reaches the model
    valid = tifffile.imread(path)[2:, :, 7]
    assert float(sample[7, 0, 0]) == float(valid.min())  # the band's tile minimum
    with pytest.raises(
        DataError, match=rf"{path} \(tile 3\): modality 'ms'.*band 7 64 px.*data\.modalities\.ms\.fill=min"
    ):
        make_tileset(_cfg(root, "data.modalities.ms.fill=raise").data, "train")


def test_a_nan_band_refused_before_training_leaves_no_run(tmp_path: Path, capsys) -> None:
    root = _with_nan(tmp_path / "a", tmp_path, band=11)
    run = tmp_path / "run"
    args = [f"data.root={root}", f"train.run_dir={run}", *MS, *SPLITS, *MODEL, *TINY, "data.modalities.ms.fill=raise"]
    assert main(["train", "vaihingen_mmadapter_vit_b", *args]) == 2
    err = capsys.readouterr().err
    assert f"{root / 'ms' / 'ms_area3.tif'} (tile 3): modality 'ms'" in err and "band 11" in err
    assert not (run / "last.pt").exists() and not (run / "log.csv").exists()


def test_fill_policies_and_lazy_windows_agree(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    arr[0, 0, 1] = np.nan
    arr[1, 2, 0] = np.inf
    m = ModalitySpec("ms")
    with pytest.warns(DataWarning, match=r"band 0 1 px, band 1 1 px"):
        fills = band_fills(arr, m, tmp_path / "x.tif", "9")
    assert fills is not None and list(fills) == [0.0, 3.0]  # each band's minimum over its valid pixels
    out = fill_bands(arr, m, tmp_path / "x.tif", fills)
    assert out[0, 0, 1] == 3.0 and out[1, 2, 0] == 0.0 and np.isfinite(out).all()
    with pytest.warns(DataWarning):
        zero = band_fills(arr, ModalitySpec("ms", fill="zero"), tmp_path / "x.tif")
    assert list(zero) == [0.0, 0.0]  # type: ignore[arg-type]
    nodata = np.full((2, 2, 1), 5, np.uint16)
    nodata[0, 0] = 0
    with pytest.warns(DataWarning, match="no-data value 0"):
        assert list(band_fills(nodata, ModalitySpec("s2", nodata=0), tmp_path / "y.tif")) == [5.0]  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # integer data without a declared no-data value: nothing to check
        assert band_fills(nodata, ModalitySpec("s2"), tmp_path / "y.tif") is None


def test_cached_and_lazy_tiles_fill_the_same(tmp_path: Path) -> None:
    root = _with_nan(tmp_path / "a", tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        cached = make_tileset(_cfg(root).data, "train")
        lazy = make_tileset(_cfg(root, "data.cache=false").data, "train")
    i = cached.ids.index("3")
    assert np.array_equal(
        cached.read_window(i, 0, 4, 8, 8)["ms"].numpy(), lazy.read_window(i, 0, 4, 8, 8)["ms"].numpy()
    )


def test_predict_reads_a_nan_band_by_the_same_policy(tmp_path: Path) -> None:
    root = _with_nan(tmp_path / "a", tmp_path, band=2)
    path = root / "ms" / "ms_area3.tif"
    rule = DsmNormalisation()
    with pytest.warns(DataWarning, match=rf"{path}.*modality 'ms'.*band 2 64 px"):
        t = modality_tensor(path, ModalitySpec("ms"), rule)
    assert bool(t.isfinite().all())
    with pytest.raises(DataError, match=rf"{path}.*band 2 64 px"):
        modality_tensor(path, ModalitySpec("ms", fill="raise"), rule)


def test_tileset_without_a_config_checks_float_modalities(tmp_path: Path) -> None:
    """The data layer alone (no config): a TileSet of a layout with a float modality checks it too."""
    from mmpeft_isprs.data import VaihingenLayout

    root = _with_nan(tmp_path / "a", tmp_path)
    layout = VaihingenLayout(splits={"train": ["3"]}, files={"ms": "ms/ms_area{id}.tif"})
    layout.modalities = (*layout.modalities, ModalitySpec("ms", fill="raise"))
    with pytest.raises(DataError, match=r"ms_area3\.tif \(tile 3\): modality 'ms'.*band 7"):
        TileSet(layout, root, "train")
