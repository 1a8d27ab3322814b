"""GeoTIFF inputs: the declared no-data value (tifffile, always), and with the optional rasterio
extra the CRS / transform profile and Cloud-Optimized GeoTIFF prediction outputs, on GeoTIFFs
the tests create."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from mmpeft_isprs.data import ISPRS, DataWarning, DsmNormalisation, TileSet, VaihingenLayout, write_prediction
from mmpeft_isprs.data.geo import GDAL_NODATA, file_nodata, has_rasterio
from mmpeft_isprs.data.inputs import dsm_tensor
from tests.isprs.archives import make_vaihingen_archive


def _dsm_with_declared_nodata(path: Path) -> np.ndarray:
    dsm = np.full((32, 32), 250.0, np.float32)
    dsm[3, 4] = dsm[5, 6] = -32767.0
    dsm[10:, :] = 260.0
    tifffile.imwrite(path, dsm, extratags=[(GDAL_NODATA, "s", 0, "-32767", True)])
    return dsm


def test_declared_nodata_is_used_when_the_config_sets_none(tmp_path: Path) -> None:
    make_vaihingen_archive(tmp_path, ["1"])
    path = tmp_path / "dsm" / "dsm_09cm_matching_area1.tif"
    _dsm_with_declared_nodata(path)
    assert file_nodata(path) == -32767.0 and file_nodata(tmp_path / "x.png") is None
    with pytest.warns(
        DataWarning,
        match=r"\(tile 1\): DSM has 2 NaN/no-data pixel\(s\) \(no-data value -32767.0\), first at \(row 3, col 4\)",
    ):
        tiles = TileSet(VaihingenLayout(), tmp_path, ["1"])
    dsm = tiles.load(0)["dsm"][0]
    assert float(dsm[3, 4]) == 0.0 and float(dsm.max()) == 1.0  # filled with the minimum 250, scaled over 250..260
    with pytest.warns(DataWarning, match="2 NaN/no-data"):
        torch_dsm = dsm_tensor(path, DsmNormalisation())
    assert float(torch_dsm[0, 5, 6]) == 0.0


@pytest.mark.skipif(has_rasterio(), reason="checks the message without the extra")
def test_cog_without_rasterio_names_the_extra(tmp_path: Path) -> None:
    from mmpeft_isprs.data import DataError

    with pytest.raises(DataError, match=r"needs the optional rasterio extra: pip install 'mmpeft\[geo\]'"):
        write_prediction(np.zeros((4, 4), np.uint8), tmp_path, "x", ISPRS, georef_from=tmp_path / "a.tif", cog=True)


def test_rasterio_profile_and_cloud_optimized_output(tmp_path: Path) -> None:
    rasterio = pytest.importorskip("rasterio")
    from rasterio.transform import from_origin

    from mmpeft_isprs.data.geo import geo_profile

    src = tmp_path / "top.tif"
    transform = from_origin(496000.0, 5420000.0, 0.09, 0.09)
    with rasterio.open(
        src,
        "w",
        driver="GTiff",
        height=64,
        width=48,
        count=3,
        dtype="uint8",
        crs="EPSG:32632",
        transform=transform,
        nodata=0,
    ) as dst:
        dst.write(np.random.default_rng(0).integers(1, 255, (3, 64, 48), dtype=np.uint8))
    prof = geo_profile(src)
    assert prof["transform"] == tuple(transform)[:6] and "32632" in prof["crs"] and prof["nodata"] == 0
    assert (prof["height"], prof["width"], prof["count"]) == (64, 48, 3)
    pred = np.random.default_rng(1).integers(0, 6, (64, 48)).astype(np.uint8)
    paths = write_prediction(pred, tmp_path / "out", "top", ISPRS, georef_from=src, cog=True)
    assert [p.name for p in paths] == ["top_pred.tif", "top_colour.tif", "top_colour.png"]
    with rasterio.open(paths[0]) as out:
        assert out.crs == rasterio.crs.CRS.from_epsg(32632) and out.transform == transform
        np.testing.assert_array_equal(out.read(1), pred)
        assert out.profile.get("tiled") or out.block_shapes[0][0] < 64  # COG: tiled layout
    with rasterio.open(paths[1]) as out:
        assert out.count == 3 and out.transform == transform
