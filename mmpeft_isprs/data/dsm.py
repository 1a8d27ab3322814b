"""DSM (elevation) handling: no-data filling and scaling to [0, 1].

The paper min-max scales each DSM tile to [0, 1] (``mode="tile"``, the default); a raw DSM
"looks blank" until scaled. ``mode="global"`` uses a fixed (min, max) for every tile, so
heights are comparable across tiles. A tile with zero range scales to zeros.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .io import DataError


@dataclass(frozen=True)
class DsmNormalisation:
    """How elevation rasters become float32 in [0, 1].

    Attributes:
        mode: ``"tile"``: per-tile min-max of the valid pixels (the paper);
            ``"global"``: ``(x - min) / (max - min)`` with the given bounds, clipped to [0, 1];
            ``"none"``: values kept as float32.
        min: lower bound for ``"global"``.
        max: upper bound for ``"global"``.
        nodata: value marking missing pixels (NaN is always missing), e.g. ``-32767``.
        fill: ``"min"``: missing pixels get the tile minimum of the valid pixels;
            ``"raise"``: missing pixels are an error.
    """

    mode: Literal["tile", "global", "none"] = "tile"
    min: float | None = None
    max: float | None = None
    nodata: float | None = None
    fill: Literal["min", "raise"] = "min"

    def __post_init__(self) -> None:
        if self.mode not in ("tile", "global", "none"):
            raise ValueError(f"DsmNormalisation: unknown mode {self.mode!r}")
        if self.fill not in ("min", "raise"):
            raise ValueError(f"DsmNormalisation: fill must be 'min' or 'raise', got {self.fill!r}")
        if self.mode == "global" and (self.min is None or self.max is None):
            raise ValueError("DsmNormalisation: mode='global' needs min and max")


def invalid_mask(dsm: np.ndarray, nodata: float | None) -> np.ndarray:
    """(H, W) bool: NaN, infinite or equal to ``nodata``."""
    bad = ~np.isfinite(dsm)
    if nodata is not None:
        bad |= dsm == nodata
    return bad


class DataWarning(UserWarning):
    """A data defect that was repaired (e.g. DSM no-data pixels filled); the message names the file."""


def valid_range(dsm: np.ndarray, cfg: DsmNormalisation, source: str, tile: str | None = None) -> tuple[float, float]:
    """(min, max) of the valid pixels of a whole DSM tile, after checking no-data.

    Missing pixels under ``fill="min"`` give a :class:`DataWarning` with the file, the tile
    and the pixel count (they are filled with the tile minimum); under ``fill="raise"`` an error.

    Args:
        dsm: (H, W) elevation of a whole tile.
        cfg: no-data value and policy.
        source: file name for messages.
        tile: tile id for messages.

    Raises:
        DataError: no valid pixel, or missing pixels while ``cfg.fill == "raise"``.
    """
    dsm = np.asarray(dsm, dtype=np.float64)
    bad = invalid_mask(dsm, cfg.nodata)
    where = f"{source} (tile {tile})" if tile is not None else source
    if bad.all():
        raise DataError(f"{where}: DSM has no valid pixel (all {bad.size} NaN or no-data {cfg.nodata})")
    if bad.any():
        row, col = divmod(int(np.flatnonzero(bad)[0]), dsm.shape[1])
        what = f"{where}: DSM has {int(bad.sum())} NaN/no-data pixel(s) (no-data value {cfg.nodata}), first at (row {row}, col {col})"
        if cfg.fill == "raise":
            raise DataError(f"{what}; set data.dsm_fill=min to fill them with the tile minimum")
        lo = float(dsm[~bad].min())
        warnings.warn(
            f"{what}: filled with the tile minimum {lo:g} (data.dsm_fill=raise rejects them)", DataWarning, stacklevel=2
        )
    valid = dsm[~bad]
    return float(valid.min()), float(valid.max())


def normalise_dsm(dsm: np.ndarray, cfg: DsmNormalisation, tile_range: tuple[float, float]) -> np.ndarray:
    """Fill missing pixels and scale.

    Args:
        dsm: (h, w) elevation, a whole tile or a window of it.
        cfg: the scaling rule.
        tile_range: (min, max) of the valid pixels of the whole tile (:func:`valid_range`);
            missing pixels are filled with its min, ``"tile"`` mode scales with it.

    Returns:
        (h, w) float32; in [0, 1] unless ``mode="none"``. Zero range gives zeros.
    """
    x = np.asarray(dsm, dtype=np.float32).copy()
    x[invalid_mask(x, cfg.nodata)] = tile_range[0]
    if cfg.mode == "none":
        return x
    lo, hi = tile_range if cfg.mode == "tile" else (float(cfg.min), float(cfg.max))  # type: ignore[arg-type]
    if hi - lo <= 0:
        return np.zeros_like(x)
    x = (x - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(x, 0.0, 1.0, out=x)


__all__ = ["DsmNormalisation", "DataWarning", "invalid_mask", "valid_range", "normalise_dsm"]
