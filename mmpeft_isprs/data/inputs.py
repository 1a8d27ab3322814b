"""Loose input files for prediction: pairing optical and DSM files, reading them as model tensors.

The optical image is scaled by its dtype's maximum (uint8 / 255), the DSM by a
:class:`~.dsm.DsmNormalisation` rule (per tile min-max by default), as in training.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .dsm import DsmNormalisation, normalise_dsm, valid_range
from .io import IMAGE_SUFFIXES, DataError, read_geotags, read_image

__all__ = ["pair_inputs", "optical_tensor", "dsm_tensor", "is_geotiff"]


def _list_images(items: Sequence[str | Path], what: str) -> list[Path]:
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"--{what}: no images ({', '.join(IMAGE_SUFFIXES)}) in folder {p}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"--{what}: {p} not found")
    return files


def _tile_key(stem: str) -> str:
    """The tile id in a file name: the last number group (``area5`` -> 5, ``potsdam_2_10_...`` -> 2_10)."""
    groups = re.findall(r"\d+(?:_\d+)*", stem)
    return groups[-1] if groups else stem


def pair_inputs(optical: Sequence[str | Path], dsm: Sequence[str | Path]) -> list[tuple[Path, Path | None]]:
    """Pair optical and DSM files: same file name stem, else the same tile number.

    Explicit file lists of equal length are paired in order when no name matches.
    Raises FileNotFoundError naming the unpaired files.
    """
    opt = _list_images(optical, "optical")
    if not dsm:
        return [(o, None) for o in opt]
    dem = _list_images(dsm, "dsm")
    for key in (lambda p: p.stem, lambda p: _tile_key(p.stem)):
        table = {key(d): d for d in dem}
        if len(table) == len(dem) and all(key(o) in table for o in opt):
            return [(o, table[key(o)]) for o in opt]
    if len(opt) == len(dem) and all(Path(x).is_file() for x in (*optical, *dsm)):
        return list(zip(opt, dem))
    raise FileNotFoundError(
        "cannot pair optical and DSM files by name or tile number: optical "
        f"{[o.name for o in opt][:8]}, dsm {[d.name for d in dem][:8]}; give files in matching order"
    )


def optical_tensor(path: Path, bands: Sequence[int] | None) -> torch.Tensor:
    """(C, H, W) float32 in [0, 1] of the optical file (3 bands, or the chosen ``bands``)."""
    arr = read_image(path)
    arr = arr[..., None] if arr.ndim == 2 else arr
    if bands is not None:
        if max(bands) >= arr.shape[-1]:
            raise DataError(f"{path}: has {arr.shape[-1]} band(s), --bands asks for {list(bands)}")
        arr = arr[..., list(bands)]
    elif arr.shape[-1] != 3:
        raise DataError(f"{path}: optical must have 3 bands, has {arr.shape[-1]}; choose them with --bands (e.g. 0,1,2)")
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr, -1, 0)))
    if np.issubdtype(arr.dtype, np.integer):
        return t.float().div_(float(np.iinfo(arr.dtype).max))
    return t.float()


def dsm_tensor(path: Path, rule: DsmNormalisation) -> torch.Tensor:
    """(1, H, W) float32 of the DSM file scaled by ``rule``."""
    arr = read_image(path)
    if arr.ndim == 3:
        arr = arr[..., 0]
    scaled = normalise_dsm(arr, rule, valid_range(arr, rule, str(path)))
    return torch.from_numpy(np.ascontiguousarray(scaled, dtype=np.float32))[None]


def is_geotiff(path: Path) -> bool:
    """True for a TIFF with georeferencing tags (outputs are then written on its grid)."""
    return path.suffix.lower() in (".tif", ".tiff") and bool(read_geotags(path))
