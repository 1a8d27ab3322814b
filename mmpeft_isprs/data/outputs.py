"""Prediction maps as files: a class index map and its colour rendering (georeferenced for GeoTIFF inputs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .geo import write_cog
from .io import write_tiff
from .palette import DatasetInfo, index_to_colour

__all__ = ["write_prediction"]


def write_prediction(
    pred: np.ndarray,
    out_dir: str | Path,
    stem: str,
    info: DatasetInfo,
    georef_from: str | Path | None = None,
    cog: bool = False,
) -> list[Path]:
    """Write ``pred`` (H, W) class indices as index map and colour map; returns the paths.

    With ``georef_from`` (a GeoTIFF of the same size) the index map is a GeoTIFF on its grid
    and a georeferenced colour GeoTIFF is written beside the colour PNG; ``cog=True`` writes
    both as Cloud-Optimized GeoTIFFs (needs the rasterio extra).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = np.asarray(pred).astype(np.uint8)
    colour = index_to_colour(index, info)
    paths = []
    if georef_from is not None and cog:
        paths.append(write_cog(out / f"{stem}_pred.tif", index, georef_from))
        paths.append(write_cog(out / f"{stem}_colour.tif", colour, georef_from))
    elif georef_from is not None:
        paths.append(write_tiff(out / f"{stem}_pred.tif", index, georef_from=georef_from))
        paths.append(write_tiff(out / f"{stem}_colour.tif", colour, georef_from=georef_from))
    else:
        Image.fromarray(index, mode="L").save(out / f"{stem}_pred.png")
        paths.append(out / f"{stem}_pred.png")
    Image.fromarray(colour, mode="RGB").save(out / f"{stem}_colour.png")
    paths.append(out / f"{stem}_colour.png")
    return paths
