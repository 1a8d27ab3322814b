"""Palettes, raster I/O, layouts and splits, TileSet validation (crops and transforms: test_crops.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from mmpeft_isprs.data import (
    IGNORE_INDEX,
    ISPRS,
    MMHUNAN,
    DataError,
    DatasetInfo,
    DsmNormalisation,
    GenericLayout,
    MMHunanLayout,
    ModalitySpec,
    PotsdamLayout,
    SplitSpec,
    TiffWindowReader,
    TileSet,
    VaihingenLayout,
    colour_to_index,
    index_to_colour,
    normalise_index_labels,
    raster_info,
    read_geotags,
    read_image,
    read_window,
    write_tiff,
)
from tests.helpers import assert_close
from tests.isprs.archives import make_vaihingen, random_classes

# ------------------------------------------------------------------ helpers


# ------------------------------------------------------------------ palette


def test_colour_round_trip_and_black_is_ignored():
    rng = np.random.default_rng(0)
    cls = random_classes(rng, 17, 23)
    cls[3, 4] = IGNORE_INDEX
    rgb = index_to_colour(cls, ISPRS)
    assert rgb.shape == (17, 23, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[3, 4]) == (0, 0, 0)
    back = colour_to_index(rgb, ISPRS)
    assert back.dtype == np.int64
    np.testing.assert_array_equal(back, cls)
    m = np.arange(7)[None]
    np.testing.assert_array_equal(colour_to_index(index_to_colour(m, MMHUNAN), MMHUNAN), m)


def test_isprs_palette_is_the_benchmark_one():
    assert ISPRS.palette[1] == (0, 0, 255) and ISPRS.palette[4] == (255, 255, 0)
    assert ISPRS.eval_classes == (0, 1, 2, 3, 4) and MMHUNAN.eval_classes == tuple(range(7))


def test_unknown_colour_error_names_colour_count_pixel_and_file():
    rgb = index_to_colour(np.zeros((6, 8), np.int64), ISPRS)
    rgb[2, 5] = rgb[4, 1] = (12, 34, 56)
    with pytest.raises(ValueError) as exc:
        colour_to_index(rgb, ISPRS, source="tile_7.tif")
    msg = str(exc.value)
    assert "tile_7.tif" in msg and "(12, 34, 56)" in msg and "2 pixels" in msg
    assert "row 2, col 5" in msg


def test_colour_tolerance_snaps_to_nearest():
    rgb = np.array([[[252, 255, 250], [3, 2, 251]]], np.uint8)
    with pytest.raises(ValueError):
        colour_to_index(rgb, ISPRS)
    np.testing.assert_array_equal(colour_to_index(rgb, ISPRS, tolerance=6), [[0, 1]])


def test_index_labels_minus_one_ignored_and_bad_value_reported():
    lab = np.array([[0, 6, -1], [3, -1, 2]], np.int16)
    np.testing.assert_array_equal(normalise_index_labels(lab, MMHUNAN), [[0, 6, 255], [3, 255, 2]])
    lab[1, 2] = 9
    with pytest.raises(ValueError, match=r"m\.tif.*value 9.*row 1, col 2"):
        normalise_index_labels(lab, MMHUNAN, "m.tif")


def test_dataset_info_json_round_trip_and_validation():
    for info in (ISPRS, MMHUNAN):
        assert DatasetInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    with pytest.raises(ValueError, match="distinct"):
        DatasetInfo("x", ("a", "b"), ((1, 2, 3), (1, 2, 3)), (0,))
    with pytest.raises(ValueError, match="eval_classes"):
        DatasetInfo("x", ("a",), ((1, 2, 3),), (3,))
    with pytest.raises(ValueError, match="unknown keys"):
        DatasetInfo.from_dict({**ISPRS.to_dict(), "extra": 1})


# ------------------------------------------------------------------ io


@pytest.fixture
def image_300x400() -> np.ndarray:
    return (np.arange(300 * 400 * 3) % 251).astype(np.uint8).reshape(300, 400, 3)


WINDOWS = [(0, 0, 300, 400), (10, 20, 50, 60), (250, 350, 50, 50), (63, 63, 2, 2), (299, 0, 1, 400)]


@pytest.mark.parametrize("kind", ["tiled", "strips", "plain", "planar"])
def test_read_window_matches_full_read_without_decoding_everything(tmp_path, image_300x400, kind, monkeypatch):
    path = tmp_path / f"{kind}.tif"
    a = image_300x400
    if kind == "tiled":
        tifffile.imwrite(path, a, tile=(64, 64), compression="zlib", photometric="rgb")
    elif kind == "strips":
        tifffile.imwrite(path, a, rowsperstrip=16, compression="zlib", photometric="rgb")
    elif kind == "plain":
        tifffile.imwrite(path, a, photometric="rgb")
    else:
        tifffile.imwrite(path, np.moveaxis(a, -1, 0), photometric="rgb", planarconfig="separate", tile=(32, 32))
    np.testing.assert_array_equal(read_image(path), a)
    # From here on, decoding a whole page is forbidden: windows must come from segments/memmap.
    monkeypatch.setattr(tifffile.TiffPage, "asarray", lambda *a, **k: pytest.fail("whole page decoded"))
    with TiffWindowReader(path) as reader:
        assert reader.shape == (300, 400)
        for y0, x0, h, w in WINDOWS:
            np.testing.assert_array_equal(reader.read(y0, x0, h, w), a[y0 : y0 + h, x0 : x0 + w])
    np.testing.assert_array_equal(read_window(path, 5, 6, 7, 8), a[5:12, 6:14])
    with pytest.raises(DataError, match="outside"):
        read_window(path, 290, 0, 20, 10)


def test_tiled_window_reads_only_needed_tiles(tmp_path):
    a = np.random.default_rng(0).random((256, 256), dtype=np.float32)
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, a, tile=(64, 64), compression="zlib")
    with TiffWindowReader(path) as reader:
        calls = []
        page = reader._page
        orig = page.decode
        page.__dict__["decode"] = lambda data, index, **k: (calls.append(index), orig(data, index, **k))[1]
        np.testing.assert_array_equal(reader.read(70, 70, 40, 40), a[70:110, 70:110])
    assert calls == [5]  # one of the 16 tiles


def test_truncated_tiff_error_names_file(tmp_path, image_300x400):
    full = tmp_path / "ok.tif"
    tifffile.imwrite(full, image_300x400, photometric="rgb")
    data = full.read_bytes()
    for cut in (len(data) // 2, 100):
        bad = tmp_path / f"cut{cut}.tif"
        bad.write_bytes(data[:cut])
        with pytest.raises(DataError, match=f"cut{cut}.tif.*(truncated|corrupt)"):
            read_image(bad)
        with pytest.raises(DataError, match=f"cut{cut}.tif"):
            read_window(bad, 0, 0, 4, 4)
    with pytest.raises(DataError, match="nothere.tif: file not found"):
        read_image(tmp_path / "nothere.tif")


def test_pillow_formats_and_raster_info(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    grey16 = (np.arange(600).reshape(20, 30) * 50).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "d.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "j.jpg", quality=95)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "d.png"), grey16)
    assert read_image(tmp_path / "j.jpg").shape == (20, 30)
    np.testing.assert_array_equal(read_window(tmp_path / "a.png", 2, 3, 4, 5), rgb[2:6, 3:8])
    info = raster_info(tmp_path / "a.png")
    assert (info.height, info.width, info.channels, info.dtype) == (20, 30, 3, np.uint8)
    assert raster_info(tmp_path / "d.png").dtype == np.uint16
    (tmp_path / "broken.png").write_bytes((tmp_path / "a.png").read_bytes()[:60])
    with pytest.raises(DataError, match="broken.png"):
        read_image(tmp_path / "broken.png")


def test_write_geotiff_copies_georeferencing(tmp_path):
    src = tmp_path / "src.tif"
    tags = [
        (33550, 12, 3, (0.09, 0.09, 0.0)),
        (33922, 12, 6, (0.0, 0.0, 0.0, 496000.0, 5420000.0, 0.0)),
        (34735, 3, 16, (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32632)),
        (34736, 12, 2, (1.5, 2.5)),
        (34737, 2, 6, "UTM |"),
    ]
    write_tiff(src, np.zeros((12, 10, 3), np.uint8), geotags=tags)
    out = write_tiff(tmp_path / "sub" / "pred.tif", np.ones((12, 10), np.uint8), georef_from=src)
    got = {code: value for code, _, _, value in read_geotags(out)}
    assert got == {code: value for code, _, _, value in tags}
    assert tifffile.TiffFile(out).pages.first.is_geotiff
    with pytest.raises(DataError, match="differs"):
        write_tiff(tmp_path / "bad.tif", np.ones((5, 5), np.uint8), georef_from=src)


# ------------------------------------------------------------------ layouts and splits


def test_vaihingen_splits_paper_official_and_validation(tmp_path):
    lay = VaihingenLayout()
    assert lay.split_ids("test", tmp_path) == ["5", "21", "15", "30"]
    assert len(lay.split_ids("train", tmp_path)) == 12 and lay.split_ids("val", tmp_path) == []
    off = VaihingenLayout(SplitSpec(protocol="official"))
    assert len(off.split_ids("train", tmp_path)) == 16 and len(off.split_ids("test", tmp_path)) == 17
    held = VaihingenLayout(SplitSpec(val_ids=("3", "37")))
    assert held.split_ids("val", tmp_path) == ["3", "37"]
    assert "3" not in held.split_ids("train", tmp_path) and len(held.split_ids("train", tmp_path)) == 10
    frac = [VaihingenLayout(SplitSpec(val_fraction=0.25, val_seed=s)).split_ids("val", tmp_path) for s in (1, 1, 2)]
    assert len(frac[0]) == 3 and frac[0] == frac[1] and frac[0] != frac[2]
    with pytest.raises(ValueError, match="test split"):
        VaihingenLayout(SplitSpec(val_ids=("5",))).split_ids("train", tmp_path)
    with pytest.raises(ValueError, match="protocol"):
        VaihingenLayout(SplitSpec(protocol="nope")).split_ids("train", tmp_path)
    assert PotsdamLayout(SplitSpec(protocol="official")).split_ids("test", tmp_path)[-1] == "7_13"
    f = PotsdamLayout().tile_files(tmp_path, "2_10")
    assert f.inputs["dsm"].name == "dsm_potsdam_02_10_normalized_lastools.jpg"
    assert f.eval_labels.name == "top_potsdam_2_10_label_noBoundary.tif"


def test_tileset_full_vs_eroded_labels_and_sample_format(tmp_path):
    make_vaihingen(tmp_path, ["1", "3"])
    full = TileSet(VaihingenLayout(), tmp_path, ["1", "3"], labels="full")
    ero = TileSet(VaihingenLayout(), tmp_path, ["1", "3"], labels="eroded")
    s, e = full.load(1), ero.load(1)
    assert s["optical"].shape == (3, 40, 48) and s["optical"].dtype == torch.float32
    assert s["dsm"].shape == (1, 40, 48) and float(s["dsm"].min()) == 0.0 and float(s["dsm"].max()) == 1.0
    assert s["mask"].dtype == torch.int64 and s["name"] == "3"
    assert (e["mask"][0] == IGNORE_INDEX).all() and (s["mask"][0] != IGNORE_INDEX).all()
    assert_close(e["mask"][1:], s["mask"][1:], rel=1e-5)
    raw = tifffile.imread(tmp_path / "top" / "top_mosaic_09cm_area3.tif")
    assert_close(s["optical"], torch.from_numpy(raw).permute(2, 0, 1).float() / 255, rel=1e-5)
    lazy = TileSet(VaihingenLayout(), tmp_path, ["1", "3"], labels="eroded", cache=False)
    for k in ("optical", "dsm", "mask"):
        assert_close(lazy.read_window(1, 3, 5, 20, 30)[k], e[k][..., 3:23, 5:35], rel=1e-5)


def test_tileset_reports_all_missing_files(tmp_path):
    make_vaihingen(tmp_path, ["1"])
    (tmp_path / "dsm" / "dsm_09cm_matching_area1.tif").unlink()
    with pytest.raises(DataError) as exc:
        TileSet(VaihingenLayout(), tmp_path, ["1", "3"])
    msg = str(exc.value)
    assert "4 missing" in msg and "dsm_09cm_matching_area1.tif" in msg and "top_mosaic_09cm_area3.tif" in msg
    assert "noBoundary" not in msg  # eroded labels are not needed for training


def test_tileset_size_mismatch_and_unknown_colour_named(tmp_path):
    make_vaihingen(tmp_path, ["1", "3"])
    write_tiff(tmp_path / "dsm" / "dsm_09cm_matching_area1.tif", np.zeros((40, 47), np.float32))
    lab = tifffile.imread(tmp_path / "gts_for_participants" / "top_mosaic_09cm_area3.tif")
    lab[7, 9] = (1, 2, 3)
    write_tiff(tmp_path / "gts_for_participants" / "top_mosaic_09cm_area3.tif", lab)
    with pytest.raises(DataError) as exc:
        TileSet(VaihingenLayout(), tmp_path, ["1", "3"])
    msg = str(exc.value)
    assert "2 problem" in msg and "sizes differ" in msg and "40x47" in msg and "dsm_09cm_matching_area1.tif" in msg
    assert "(1, 2, 3)" in msg and "row 7, col 9" in msg and "area3.tif" in msg


def test_dsm_nodata_fill_raise_zero_range_and_global(tmp_path):
    make_vaihingen(tmp_path, ["1"], size=(8, 8))
    dsm = np.full((8, 8), 100.0, np.float32)
    dsm[0, 0], dsm[1, 1], dsm[2, 2] = np.nan, -9999, 110.0
    write_tiff(tmp_path / "dsm" / "dsm_09cm_matching_area1.tif", dsm)
    lay = VaihingenLayout()
    with pytest.raises(DataError, match=r"area1.tif.*2 NaN/no-data.*row 0, col 0"):
        TileSet(lay, tmp_path, ["1"], dsm=DsmNormalisation(nodata=-9999, fill="raise"))
    with pytest.warns(UserWarning, match=r"\(tile 1\): DSM has 2 NaN/no-data pixel\(s\)"):
        d = TileSet(lay, tmp_path, ["1"], dsm=DsmNormalisation(nodata=-9999)).load(0)["dsm"][0]
    assert float(d[0, 0]) == 0.0 and float(d[1, 1]) == 0.0 and float(d[2, 2]) == 1.0 and float(d[3, 3]) == 0.0
    with pytest.warns(UserWarning):
        g = TileSet(lay, tmp_path, ["1"], dsm=DsmNormalisation("global", min=90, max=130, nodata=-9999)).load(0)["dsm"][
            0
        ]
    assert float(g[3, 3]) == pytest.approx(0.25) and float(g[2, 2]) == pytest.approx(0.5)
    write_tiff(tmp_path / "dsm" / "dsm_09cm_matching_area1.tif", np.full((8, 8), 7.0, np.float32))
    flat = TileSet(lay, tmp_path, ["1"]).load(0)["dsm"]
    assert torch.equal(flat, torch.zeros(1, 8, 8))
    write_tiff(tmp_path / "dsm" / "dsm_09cm_matching_area1.tif", np.full((8, 8), np.nan, np.float32))
    with pytest.raises(DataError, match="no valid pixel"):
        TileSet(lay, tmp_path, ["1"])


def test_truncated_tiff_in_tileset_is_reported(tmp_path):
    make_vaihingen(tmp_path, ["1"])
    p = tmp_path / "top" / "top_mosaic_09cm_area1.tif"
    p.write_bytes(p.read_bytes()[:-500])
    with pytest.raises(DataError, match=r"top_mosaic_09cm_area1.tif.*truncated"):
        TileSet(VaihingenLayout(), tmp_path, ["1"])


def test_potsdam_irrg_bands_and_jpeg_ndsm(tmp_path):
    rng = np.random.default_rng(3)
    lay = PotsdamLayout(bands="irrg")
    f = lay.tile_files(tmp_path, "2_10")
    rgbir = rng.integers(0, 256, (16, 20, 4), dtype=np.uint8)
    write_tiff(f.inputs["optical"], rgbir)
    f.inputs["dsm"].parent.mkdir(parents=True)
    Image.fromarray(np.tile(np.arange(20, dtype=np.uint8) * 10, (16, 1))).save(f.inputs["dsm"], quality=100)
    write_tiff(f.labels, index_to_colour(random_classes(rng, 16, 20), ISPRS))
    s = TileSet(lay, tmp_path, ["2_10"]).load(0)
    assert_close(s["optical"], torch.from_numpy(rgbir[..., [3, 0, 1]]).permute(2, 0, 1).float() / 255, rel=1e-5)
    assert (
        s["dsm"].shape == (1, 16, 20)
        and float(s["dsm"][0, :, 0].max()) < 0.05
        and float(s["dsm"][0, :, -1].min()) > 0.95
    )


def test_mmhunan_layout_split_lists_and_ignore(tmp_path):
    rng = np.random.default_rng(4)
    lay = MMHunanLayout()
    for stem in ("a1", "a2", "b1"):
        f = lay.tile_files(tmp_path, stem)
        for p in (*f.inputs.values(), f.labels):
            p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(f.inputs["optical"])
        Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(f.inputs["dsm"])
        lab = rng.integers(-1, 7, (12, 12)).astype(np.int8)
        tifffile.imwrite(f.labels, lab)
    (tmp_path / "train.txt").write_text("a1\na2\n")
    (tmp_path / "test.txt").write_text("b1\n")
    ts = TileSet(lay, tmp_path, "train")
    assert ts.ids == ["a1", "a2"] and ts.num_classes == 7
    m = ts.load(0)["mask"].numpy()
    lab = tifffile.imread(lay.tile_files(tmp_path, "a1").labels)
    np.testing.assert_array_equal(m, np.where(lab == -1, 255, lab.astype(np.int64)))
    with pytest.raises(ValueError, match="no splits found"):
        MMHunanLayout().split_ids("train", tmp_path / "empty")


def test_generic_layout_any_modalities_colour_labels(tmp_path):
    rng = np.random.default_rng(5)
    lay = GenericLayout(
        modalities=(ModalitySpec("optical"), ModalitySpec("dsm", "elevation"), ModalitySpec("sar", bands=(1,))),
        label_format="colour",
        info=ISPRS,
        folders={"sar": "radar"},
    )
    cls = random_classes(rng, 10, 14)
    radars: dict[str, np.ndarray] = {}
    for split, stem in (("train", "x"), ("test", "y")):
        base = tmp_path / split
        write_tiff(base / "optical" / f"{stem}.tif", rng.integers(0, 256, (10, 14, 3), dtype=np.uint8))
        write_tiff(base / "dsm" / f"{stem}.tif", rng.random((10, 14)).astype(np.float32))
        radar = rng.integers(0, 65535, (10, 14, 2), dtype=np.uint16)
        write_tiff(base / "radar" / f"{stem}.tif", radar)
        radars[stem] = radar
        (base / "labels").mkdir(parents=True)
        Image.fromarray(index_to_colour(cls, ISPRS)).save(base / "labels" / f"{stem}.png")
    ts = TileSet(lay, tmp_path, "train")
    assert ts.ids == ["train/x"] and ts.modality_names == ("optical", "dsm", "sar")
    s = ts.load(0)
    assert_close(s["sar"][0], torch.from_numpy(radars["x"][..., 1].astype(np.float32)) / 65535, rel=1e-5)
    np.testing.assert_array_equal(s["mask"].numpy(), cls)
    assert TileSet(lay, tmp_path, "test").ids == ["test/y"]
