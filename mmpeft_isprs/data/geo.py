"""Georeferencing beyond tag copying: the no-data value a GeoTIFF declares, and, with the
optional ``rasterio`` extra (``pip install mmpeft[geo]``), CRS / transform profiles and
Cloud-Optimized GeoTIFF output.

The default path needs only tifffile: the GDAL no-data tag (42113) is read directly, and
outputs copy the input's georeferencing tags (:func:`~.io.write_tiff`). rasterio is used where
it serves: reading a file's CRS and affine transform as GDAL sees them, and writing predictions
as Cloud-Optimized GeoTIFFs (tiled, with overviews) on the input's grid.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from .dsm import DsmNormalisation
from .io import TIFF_SUFFIXES, DataError

__all__ = ["GDAL_NODATA", "file_nodata", "with_file_nodata", "has_rasterio", "geo_profile", "write_cog"]

GDAL_NODATA = 42113
"""The TIFF tag in which GDAL writes a raster's no-data value (ASCII)."""


@lru_cache(maxsize=256)
def _nodata(path: str, mtime: float) -> float | None:
    try:
        with tifffile.TiffFile(path) as tif:
            tag = tif.pages.first.tags.get(GDAL_NODATA)
    except Exception:  # unreadable files are reported by the readers, with their names
        return None
    if tag is None:
        return None
    try:
        return float(str(tag.value).strip("\x00 "))
    except ValueError:
        return None


def file_nodata(path: str | Path) -> float | None:
    """The no-data value a GeoTIFF declares (GDAL_NODATA tag); None for other files or none declared."""
    path = Path(path)
    if path.suffix.lower() not in TIFF_SUFFIXES or not path.is_file():
        return None
    return _nodata(str(path), path.stat().st_mtime)


def with_file_nodata(rule: DsmNormalisation, path: str | Path) -> DsmNormalisation:
    """``rule`` with the file's declared no-data value when the config sets none."""
    if rule.nodata is not None:
        return rule
    value = file_nodata(path)
    return rule if value is None or np.isnan(value) else dataclasses.replace(rule, nodata=value)


def has_rasterio() -> bool:
    """True when the optional rasterio extra is installed."""
    try:
        import rasterio  # noqa: F401
    except ImportError:
        return False
    return True


def _rasterio(what: str) -> Any:
    try:
        import rasterio
    except ImportError:
        raise DataError(f"{what} needs the optional rasterio extra: pip install 'mmpeft[geo]'") from None
    return rasterio


def geo_profile(path: str | Path) -> dict[str, Any]:
    """CRS (WKT or None), affine transform (6 numbers), no-data, size and band count of a raster (rasterio)."""
    rasterio = _rasterio("geo_profile")
    try:
        with rasterio.open(path) as src:
            crs = src.crs.to_wkt() if src.crs else None
            return {
                "crs": crs,
                "transform": tuple(src.transform)[:6],
                "nodata": src.nodata,
                "height": src.height,
                "width": src.width,
                "count": src.count,
            }
    except rasterio.errors.RasterioError as exc:
        raise DataError(f"{path}: not a readable raster: {exc}") from None


def write_cog(path: str | Path, array: np.ndarray, like: str | Path) -> Path:
    """Write ``array`` (H, W) or (H, W, C) as a Cloud-Optimized GeoTIFF on the grid of ``like`` (rasterio)."""
    rasterio = _rasterio("Cloud-Optimized GeoTIFF output")
    with rasterio.open(like) as src:
        if (src.height, src.width) != tuple(array.shape[:2]):
            raise DataError(
                f"{path}: array size {array.shape[0]}x{array.shape[1]} differs from {like} ({src.height}x{src.width})"
            )
        crs, transform = src.crs, src.transform
    bands = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {
        "driver": "COG",
        "height": bands.shape[1],
        "width": bands.shape[2],
        "count": bands.shape[0],
        "dtype": bands.dtype.name,
        "crs": crs,
        "transform": transform,
        "compress": "deflate",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(bands)
    return path
