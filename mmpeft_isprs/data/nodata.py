"""No-data in image modalities: NaN, infinite and no-data pixels counted per band, filled or refused.

The DSM has its own rule (:mod:`.dsm`). Every other modality is checked here when its tile is
read (training, evaluation and ``predict`` alike) if its pixels can hold missing values: a float
raster (NaN and infinite values always count as missing, as does the no-data value the GeoTIFF
declares), or any raster whose modality declares a no-data value (``ModalitySpec.nodata``,
``data.modalities.<name>.nodata``). The policy is the modality's ``fill``:

- ``"min"`` (the default, as the DSM's): each band's missing pixels get that band's minimum over
  the valid pixels of the whole tile, and a :class:`~.dsm.DataWarning` names the file, the tile,
  the modality and each band with its pixel count;
- ``"zero"``: they get 0 (after the dtype scaling and before ``mean`` / ``std``), with the same warning;
- ``"raise"``: a :class:`~.io.DataError` naming the same, before anything trains.

Bands are named as counted in the file, from 0 (``band 7 of 12``), so the message points at the
band to look at in a GIS.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .dsm import DataWarning
from .geo import file_nodata
from .io import DataError
from .layouts import ModalitySpec

__all__ = ["FILLS", "checks_nodata", "band_fills", "fill_bands"]

FILLS = ("min", "zero", "raise")
"""The policies of an image modality's missing pixels (``data.modalities.<name>.fill``)."""


def checks_nodata(m: ModalitySpec, dtype: np.dtype) -> bool:
    """Whether an image modality of this dtype is checked: float data, or a declared no-data value."""
    return m.kind == "image" and (np.issubdtype(dtype, np.floating) or m.nodata is not None)


def _nodata(m: ModalitySpec, path: Path) -> float | None:
    """The modality's no-data value, else the one the file declares (NaN: none beyond NaN)."""
    if m.nodata is not None:
        return float(m.nodata)
    value = file_nodata(path)
    return None if value is None or np.isnan(value) else float(value)


def _invalid(arr: np.ndarray, nodata: float | None) -> np.ndarray:
    """(H, W, C) bool: NaN, infinite or equal to ``nodata``."""
    bad = ~np.isfinite(arr) if np.issubdtype(arr.dtype, np.floating) else np.zeros(arr.shape, bool)
    if nodata is not None:
        bad |= arr == nodata
    return bad


def _file_band(m: ModalitySpec, k: int) -> int:
    return m.bands[k] if m.bands is not None else k


def band_fills(arr: np.ndarray, m: ModalitySpec, path: Path, tile: str | None = None) -> np.ndarray | None:
    """Check a whole tile of image modality ``m`` and return each band's fill value (None: no
    missing pixel, nothing to fill).

    Args:
        arr: (H, W, C) pixels of the tile, the modality's bands already selected, in the file's dtype.
        m: the modality (its ``nodata`` and ``fill``).
        path: the file, for messages (and its declared no-data value).
        tile: the tile id, for messages.

    Returns:
        (C,) float64 values, in the file's units, or None.

    Raises:
        DataError: missing pixels under ``fill="raise"``, or a band without any valid pixel
            under ``fill="min"``; the message names the file, tile, modality and bands.
    """
    if not checks_nodata(m, arr.dtype):
        return None
    nodata = _nodata(m, path)
    bad = _invalid(arr, nodata)  # (H, W, C)
    counts = bad.reshape(-1, bad.shape[-1]).sum(0)
    if not counts.any():
        return None
    fill = m.fill or "min"
    where = f"{path} (tile {tile})" if tile is not None else str(path)
    per_band = ", ".join(f"band {_file_band(m, k)} {int(n)} px" for k, n in enumerate(counts) if n)
    k0 = int(np.flatnonzero(counts)[0])
    row, col = divmod(int(np.flatnonzero(bad[..., k0])[0]), bad.shape[1])
    what = (
        f"{where}: modality {m.name!r} has NaN/inf/no-data pixels (no-data value {nodata}) in {per_band} "
        f"(bands counted from 0 in the file), first at band {_file_band(m, k0)} (row {row}, col {col})"
    )
    key = f"data.modalities.{m.name}.fill"
    if fill == "raise":
        raise DataError(f"{what}; set {key}=min (each band's tile minimum) or {key}=zero to fill them")
    if fill == "zero":
        values = np.zeros(arr.shape[-1])
    else:
        empty = [_file_band(m, k) for k in range(arr.shape[-1]) if bad[..., k].all()]
        if empty:
            raise DataError(
                f"{what}; band(s) {empty} have no valid pixel to take a minimum from: set {key}=zero or raise"
            )
        values = np.array([float(arr[..., k][~bad[..., k]].min()) for k in range(arr.shape[-1])])
    how = "each band's tile minimum" if fill == "min" else "zero"
    warnings.warn(f"{what}: filled with {how} ({key}=raise rejects them)", DataWarning, stacklevel=2)
    return values


def fill_bands(arr: np.ndarray, m: ModalitySpec, path: Path, fills: np.ndarray | None) -> np.ndarray:
    """``arr`` (h, w, C) (a tile or a window of it) with its missing pixels replaced by ``fills``
    (from :func:`band_fills` of the whole tile); unchanged when ``fills`` is None."""
    if fills is None:
        return arr
    bad = _invalid(arr, _nodata(m, path))
    if not bad.any():
        return arr
    out = arr.copy()  # the file's dtype kept: integers are still scaled by their maximum afterwards
    out[bad] = np.broadcast_to(fills, arr.shape)[bad].astype(arr.dtype)
    return out
