"""Loose input files for prediction: pairing the files of each modality by tile, reading them as model tensors.

Each modality is read as in training (:mod:`.bands`): its bands, images scaled by their dtype's
maximum (uint8 / 255), elevation by a :class:`~.dsm.DsmNormalisation` rule (per tile min-max by
default), then its ``mean`` / ``std`` when it has them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .bands import check_bands, select_bands, to_chw
from .dsm import DsmNormalisation, normalise_dsm, valid_range
from .geo import with_file_nodata
from .io import IMAGE_SUFFIXES, DataError, read_geotags, read_image
from .layouts import ModalitySpec
from .nodata import band_fills, fill_bands
from .patterns import tile_key_of_name

__all__ = ["pair_inputs", "pair_modalities", "modality_tensor", "dsm_tensor", "is_geotiff", "check_sizes"]


def _list_images(items: Sequence[str | Path], what: str) -> list[Path]:
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{what}: no images ({', '.join(IMAGE_SUFFIXES)}) in folder {p}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{what}: {p} not found")
    return files


def pair_inputs(optical: Sequence[str | Path], dsm: Sequence[str | Path]) -> list[tuple[Path, Path | None]]:
    """Pair optical and DSM files: same file name stem, else the same tile id (the last number
    group of the name, zero padding ignored: ``top_potsdam_2_10_RGBIR`` and
    ``dsm_potsdam_02_10_normalized_lastools`` are tile ``2_10``).

    Explicit file lists of equal length are paired in order when no name matches.
    Raises FileNotFoundError naming each unpaired optical file and its tile id.
    """
    opt = _list_images(optical, "--optical")
    if not dsm:
        return [(o, None) for o in opt]
    return list(zip(opt, _pair_one(opt, optical, dsm, "optical", "DSM", "--dsm")))


def pair_modalities(
    sources: Mapping[str, Sequence[str | Path]], flags: Mapping[str, str] | None = None
) -> list[dict[str, Path]]:
    """One ``{modality: file}`` per tile: the first modality's files are the tiles, every other
    modality's file is paired with each as :func:`pair_inputs` pairs a DSM (stem, else tile id,
    else the order of equal-length file lists). ``flags``: how the command line names each
    modality's files (``--input nir=``), for the errors.

    Raises FileNotFoundError naming each tile and the folder without its file.
    """
    names = list(sources)
    flags = {**{n: f"--input {n}=" for n in names}, **(flags or {})}
    first = _list_images(sources[names[0]], flags[names[0]].rstrip("="))
    columns = {names[0]: first}
    for name in names[1:]:
        columns[name] = _pair_one(first, sources[names[0]], sources[name], names[0], name, flags[name])
    return [{n: columns[n][i] for n in names} for i in range(len(first))]


def _pair_one(
    opt: list[Path], optical: Sequence[str | Path], dsm: Sequence[str | Path], first: str, label: str, flag: str
) -> list[Path]:
    """The file of ``dsm`` paired with each of ``opt`` (see :func:`pair_inputs`)."""
    dem = _list_images(dsm, flag.rstrip("="))
    by_stem = {d.stem: d for d in dem}
    if len(by_stem) == len(dem) and all(o.stem in by_stem for o in opt):
        return [by_stem[o.stem] for o in opt]
    by_key: dict[str, list[Path]] = {}
    for d in dem:
        by_key.setdefault(tile_key_of_name(d.stem), []).append(d)
    pairs, problems = [], []
    given = flag + ("" if flag.endswith("=") else " ") + " ".join(str(x) for x in dsm)
    for o in opt:
        key = tile_key_of_name(o.stem)
        found = by_key.get(key, [])
        if len(found) == 1:
            pairs.append(found[0])
        elif found:
            problems.append(f"{o} (tile {key}): several {label} files of this tile: {', '.join(str(d) for d in found)}")
        else:
            problems.append(f"{o} (tile {key}): no {label} file of tile {key} in {given}")
    if not problems:
        return pairs
    if len(opt) == len(dem) and all(Path(x).is_file() for x in (*optical, *dsm)):
        return dem
    raise FileNotFoundError(f"{len(problems)} {first} file(s) without a {label}:\n  " + "\n  ".join(problems))


def dsm_tensor(path: Path, rule: DsmNormalisation) -> torch.Tensor:
    """(1, H, W) float32 of the DSM file scaled by ``rule`` (no-data: the rule's, else the file's)."""
    return modality_tensor(path, ModalitySpec("dsm", "elevation"), rule)


def modality_tensor(
    path: Path, spec: ModalitySpec, rule: DsmNormalisation, channels: int | None = None, raw: np.ndarray | None = None
) -> torch.Tensor:
    """(C, H, W) float32 of modality ``spec`` read from ``path``: its bands (an elevation without
    bands: the first), scaled as in training (elevation by ``rule``, no-data: the rule's, else
    the file's), normalised by its statistics. ``channels``: the band count the model takes when
    ``spec`` keeps every band (a file with another count is an error saying to choose bands).
    ``raw``: ``path``'s pixels when already read (modalities sharing a file read it once)."""
    arr = read_image(path) if raw is None else raw
    have = 1 if arr.ndim == 2 else arr.shape[-1]
    if spec.kind == "elevation" and spec.bands is None:
        spec = dataclasses.replace(spec, bands=(0,))
    check_bands(spec, path, have)
    if spec.bands is None and channels is not None and have != channels:
        raise DataError(
            f"{path}: {spec.name} must have {channels} bands, has {have}; choose them with --bands (e.g. 0,1,2)"
        )
    arr = select_bands(spec, arr)
    if spec.kind == "elevation":
        rule = with_file_nodata(rule, path)
        arr = normalise_dsm(arr, rule, valid_range(arr, rule, str(path), tile_key_of_name(path.stem)))
    else:  # NaN / inf / no-data of an image modality, as in training
        arr = fill_bands(arr, spec, path, band_fills(arr, spec, path, tile_key_of_name(path.stem)))
    return to_chw(arr, spec)


def is_geotiff(path: Path) -> bool:
    """True for a TIFF with georeferencing tags (outputs are then written on its grid)."""
    return path.suffix.lower() in (".tif", ".tiff") and bool(read_geotags(path))


def check_sizes(tile: str, tensors: Sequence[tuple[Path, torch.Tensor]]) -> None:
    """Raise DataError naming each file with its own size when the inputs of a tile differ."""
    if len({tuple(t.shape[-2:]) for _, t in tensors}) > 1:
        listing = ", ".join(f"{p} {t.shape[-2]}x{t.shape[-1]}" for p, t in tensors)
        raise DataError(f"tile {tile}: sizes differ: {listing}")
