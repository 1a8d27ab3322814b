"""Loose input files for prediction: pairing optical and DSM files, reading them as model tensors.

The optical image is scaled by its dtype's maximum (uint8 / 255), the DSM by a
:class:`~.dsm.DsmNormalisation` rule (per tile min-max by default), as in training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .dsm import DsmNormalisation, normalise_dsm, valid_range
from .io import IMAGE_SUFFIXES, DataError, read_geotags, read_image
from .geo import with_file_nodata
from .patterns import tile_key_of_name

__all__ = ["pair_inputs", "optical_tensor", "dsm_tensor", "is_geotiff", "check_sizes"]


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


def pair_inputs(optical: Sequence[str | Path], dsm: Sequence[str | Path]) -> list[tuple[Path, Path | None]]:
    """Pair optical and DSM files: same file name stem, else the same tile id (the last number
    group of the name, zero padding ignored: ``top_potsdam_2_10_RGBIR`` and
    ``dsm_potsdam_02_10_normalized_lastools`` are tile ``2_10``).

    Explicit file lists of equal length are paired in order when no name matches.
    Raises FileNotFoundError naming each unpaired optical file and its tile id.
    """
    opt = _list_images(optical, "optical")
    if not dsm:
        return [(o, None) for o in opt]
    dem = _list_images(dsm, "dsm")
    by_stem = {d.stem: d for d in dem}
    if len(by_stem) == len(dem) and all(o.stem in by_stem for o in opt):
        return [(o, by_stem[o.stem]) for o in opt]
    by_key: dict[str, list[Path]] = {}
    for d in dem:
        by_key.setdefault(tile_key_of_name(d.stem), []).append(d)
    pairs, problems = [], []
    for o in opt:
        key = tile_key_of_name(o.stem)
        found = by_key.get(key, [])
        if len(found) == 1:
            pairs.append((o, found[0]))
        elif found:
            problems.append(f"{o} (tile {key}): several DSM files of this tile: {', '.join(str(d) for d in found)}")
        else:
            problems.append(f"{o} (tile {key}): no DSM file of tile {key} in --dsm {' '.join(str(x) for x in dsm)}")
    if not problems:
        return pairs
    if len(opt) == len(dem) and all(Path(x).is_file() for x in (*optical, *dsm)):
        return list(zip(opt, dem))
    raise FileNotFoundError(f"{len(problems)} optical file(s) without a DSM:\n  " + "\n  ".join(problems))


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
    """(1, H, W) float32 of the DSM file scaled by ``rule`` (no-data: the rule's, else the file's)."""
    arr = read_image(path)
    if arr.ndim == 3:
        arr = arr[..., 0]
    rule = with_file_nodata(rule, path)
    scaled = normalise_dsm(arr, rule, valid_range(arr, rule, str(path), tile_key_of_name(path.stem)))
    return torch.from_numpy(np.ascontiguousarray(scaled, dtype=np.float32))[None]


def is_geotiff(path: Path) -> bool:
    """True for a TIFF with georeferencing tags (outputs are then written on its grid)."""
    return path.suffix.lower() in (".tif", ".tiff") and bool(read_geotags(path))


def check_sizes(tile: str, tensors: Sequence[tuple[Path, torch.Tensor]]) -> None:
    """Raise DataError naming each file with its own size when the inputs of a tile differ."""
    if len({tuple(t.shape[-2:]) for _, t in tensors}) > 1:
        listing = ", ".join(f"{p} {t.shape[-2]}x{t.shape[-1]}" for p, t in tensors)
        raise DataError(f"tile {tile}: sizes differ: {listing}")
