"""A modality's pixels: its bands picked from the source file, scaled, normalised, as model tensors.

One path for training tiles (:class:`~.tiles.TileSet`) and loose prediction inputs
(:mod:`.inputs`): :func:`check_bands` (the file has the bands the modality asks for),
:func:`select_bands` (keep them, in order), :func:`to_chw` (``(h, w[, C])`` array -> ``(C, h, w)``
float32: images divided by their dtype's maximum, elevation as scaled, then the modality's
``(x - mean) / std`` when it has statistics).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .io import DataError
from .layouts import ModalitySpec

__all__ = ["check_bands", "select_bands", "to_chw"]


def check_bands(m: ModalitySpec, path: Path, channels: int) -> None:
    """Raise DataError naming the file, the modality and the band when ``path`` (``channels``
    bands) lacks a band ``m`` asks for, or an elevation keeps more than one band, or the
    statistics do not match the kept bands."""
    missing = [b for b in (m.bands or ()) if b >= channels]
    if missing:
        raise DataError(
            f"{path}: modality {m.name!r} asks for band {missing[0]} (bands {list(m.bands or ())}, counted from 0), "
            f"the file has {channels} band(s) (0..{channels - 1}); set data.modalities.{m.name}.bands"
        )
    kept = len(m.bands) if m.bands is not None else channels
    if m.kind == "elevation" and kept != 1:
        raise DataError(
            f"{path}: elevation {m.name} must have one band, has {kept}; choose it with data.modalities.{m.name}.bands"
        )
    if m.mean is not None and len(m.mean) != kept:
        raise DataError(
            f"{path}: modality {m.name!r} keeps {kept} band(s), its mean and std have {len(m.mean)} numbers "
            f"(data.modalities.{m.name}.mean / std: one per band)"
        )


def select_bands(m: ModalitySpec, arr: np.ndarray) -> np.ndarray:
    """Keep the modality's bands: -> (H, W) for elevation, (H, W, C) for images."""
    arr = arr[..., None] if arr.ndim == 2 else arr
    if m.bands is not None:
        arr = arr[..., list(m.bands)]
    return arr[..., 0] if m.kind == "elevation" else arr


def to_chw(arr: np.ndarray, m: ModalitySpec) -> torch.Tensor:
    """(h, w) or (h, w, C) array -> (C, h, w) float32 tensor (images scaled by dtype max), then
    normalised by the modality's ``mean`` / ``std`` when it has them."""
    if m.kind == "elevation":
        t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None]
    else:
        t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr, -1, 0)))
        t = t.float().div_(float(np.iinfo(arr.dtype).max)) if np.issubdtype(arr.dtype, np.integer) else t.float()
    if m.mean is not None and m.std is not None:
        mean = torch.tensor(m.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(m.std, dtype=torch.float32).view(-1, 1, 1)
        t = (t - mean) / std  # (C, h, w)
    return t
