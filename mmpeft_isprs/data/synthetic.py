"""A synthetic Vaihingen: same folders, file names and formats, generated in seconds.

``generate_synthetic_vaihingen(root)`` writes::

    root/top/top_mosaic_09cm_area{id}.tif                       IRRG uint8 (H, W, 3), GeoTIFF
    root/dsm/dsm_09cm_matching_area{id}.tif                     float32 DSM (H, W), metres, GeoTIFF
    root/gts_for_participants/top_mosaic_09cm_area{id}.tif      colour labels (H, W, 3)
    root/gts_eroded_for_participants/top_mosaic_09cm_area{id}_noBoundary.tif
                                                                colour labels, black boundaries
    root/synthetic_manifest.json                                generator version, params, splits

Tile ids are the paper's (train 1 3 23 26 7 11 13 28 17 32 34 37, test 5 21 15 30), so
``VaihingenLayout`` reads the folder unchanged, plus validation tiles 9 18 19 (ids no ISPRS
split uses) for model selection: ``VaihingenLayout(split=SplitSpec(val_ids=SYNTHETIC_VAL_IDS))``
or simply :func:`synthetic_layout`. Scenes: see :mod:`~mmpeft_isprs.data.scenes` (roofs look
like roads and trees like grass; only the DSM separates them).

Generation is idempotent: when the manifest matches the requested version and parameters and
every file exists, nothing is rewritten.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .io import PathLike, write_tiff
from .layouts import VAIHINGEN_SPLITS, SplitSpec, VaihingenLayout
from .palette import IGNORE_INDEX, ISPRS, index_to_colour
from .scenes import boundary_mask, render_scene

GENERATOR_VERSION = 1
MANIFEST = "synthetic_manifest.json"
SYNTHETIC_VAL_IDS: tuple[str, ...] = ("9", "18", "19")
_TRAIN = VAIHINGEN_SPLITS["authors"]["train"]
_TEST = VAIHINGEN_SPLITS["authors"]["test"]
DEFAULT_NUM_TILES = len(_TRAIN) + len(_TEST) + len(SYNTHETIC_VAL_IDS)  # 19
GSD = 0.09  # metres per pixel, written into the GeoTIFF tags


def synthetic_splits(num_tiles: int = DEFAULT_NUM_TILES) -> dict[str, list[str]]:
    """Tile ids per split for ``num_tiles`` tiles (>= 3: at least one train, val and test).

    The full default is the paper's 12 train / 4 test tiles plus 3 validation tiles; fewer
    tiles keep the same proportions, taking ids in the paper's order.
    """
    if not 3 <= num_tiles <= DEFAULT_NUM_TILES:
        raise ValueError(f"num_tiles must be in 3..{DEFAULT_NUM_TILES}, got {num_tiles}")
    n_test = max(1, round(num_tiles * len(_TEST) / DEFAULT_NUM_TILES))
    n_val = max(1, round(num_tiles * len(SYNTHETIC_VAL_IDS) / DEFAULT_NUM_TILES))
    n_train = num_tiles - n_test - n_val
    return {
        "train": list(_TRAIN[:n_train]),
        "val": list(SYNTHETIC_VAL_IDS[:n_val]),
        "test": list(_TEST[:n_test]),
    }


def _geotags(tile_index: int, size: int) -> list[tuple[int, int, int, Any]]:
    """UTM 32N georeferencing; tiles laid side by side (so each has its own position)."""
    x0, y0 = 496000.0 + tile_index * size * GSD, 5420000.0
    return [
        (33550, 12, 3, (GSD, GSD, 0.0)),
        (33922, 12, 6, (0.0, 0.0, 0.0, x0, y0, 0.0)),
        (34735, 3, 16, (1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32632)),
    ]


def _paths(layout: VaihingenLayout, root: Path, tile_id: str) -> dict[str, Path]:
    f = layout.tile_files(root, tile_id)
    assert f.labels is not None and f.eval_labels is not None
    return {"top": f.inputs["optical"], "dsm": f.inputs["dsm"], "gts": f.labels, "eroded": f.eval_labels}


def _write_tile(
    layout: VaihingenLayout, root: Path, tile_id: str, index: int, size: int, seed: int, radius: int
) -> list[str]:
    rng = np.random.default_rng([seed, int(tile_id)])
    scene = render_scene(rng, size, scale=min(1.0, max(0.5, size / 512)))
    paths = _paths(layout, root, tile_id)
    tags = _geotags(index, size)
    write_tiff(paths["top"], scene.image, geotags=tags)
    write_tiff(paths["dsm"], scene.dsm, geotags=tags)
    write_tiff(paths["gts"], index_to_colour(scene.classes, ISPRS))
    eroded = scene.classes.astype(np.int64)
    eroded[boundary_mask(scene.classes, radius)] = IGNORE_INDEX
    write_tiff(paths["eroded"], index_to_colour(eroded, ISPRS))
    return [str(p.relative_to(root)) for p in paths.values()]


def generate_synthetic_vaihingen(
    root: PathLike,
    num_tiles: int = DEFAULT_NUM_TILES,
    tile_size: int = 512,
    seed: int = 0,
    boundary_radius: int = 2,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a synthetic data set in the Vaihingen layout (see module doc), or reuse it.

    Args:
        root: output folder (created).
        num_tiles: tiles to write, 3..19 (default 19: 12 train, 3 val, 4 test).
        tile_size: tile side in pixels (>= 64).
        seed: scene seed; tile ``id`` uses ``default_rng([seed, id])``.
        boundary_radius: erosion radius of the "noBoundary" labels (pixels).
        overwrite: regenerate even when the manifest matches.

    Returns:
        The manifest: ``{"generator", "version", "params", "splits", "files"}``.

    Raises:
        FileExistsError: ``root`` holds other files but no synthetic manifest (nothing is
            overwritten unless ``overwrite=True``).
    """
    root = Path(root)
    if tile_size < 64:
        raise ValueError(f"tile_size must be >= 64, got {tile_size}")
    params = {
        "num_tiles": int(num_tiles),
        "tile_size": int(tile_size),
        "seed": int(seed),
        "boundary_radius": int(boundary_radius),
    }
    splits = synthetic_splits(num_tiles)
    existing = _read_manifest(root)
    if existing is not None and not overwrite and _matches(root, existing, params):
        return existing
    if existing is None and root.is_dir() and any(root.iterdir()) and not overwrite:
        raise FileExistsError(f"{root} is not empty and has no {MANIFEST}; pass overwrite=True")
    ids = splits["train"] + splits["val"] + splits["test"]
    files, layout = [], VaihingenLayout()
    for index, tile_id in enumerate(ids):
        files += _write_tile(layout, root, tile_id, index, tile_size, seed, boundary_radius)
    manifest = {
        "generator": "mmpeft_isprs.data.synthetic",
        "version": GENERATOR_VERSION,
        "params": params,
        "splits": splits,
        "files": files,
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: marks completion
    return manifest


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _matches(root: Path, manifest: dict[str, Any], params: dict[str, Any]) -> bool:
    return (
        manifest.get("version") == GENERATOR_VERSION
        and manifest.get("params") == params
        and all((root / f).is_file() for f in manifest.get("files", []))
    )


def synthetic_layout(root: PathLike, **layout_kwargs: Any) -> VaihingenLayout:
    """A ``VaihingenLayout`` with the splits recorded in ``root``'s manifest (incl. ``val``)."""
    manifest = _read_manifest(Path(root))
    if manifest is None:
        raise FileNotFoundError(f"{Path(root) / MANIFEST} not found: run generate_synthetic_vaihingen")
    layout_kwargs.setdefault("split", SplitSpec())
    return VaihingenLayout(splits=manifest["splits"], **layout_kwargs)


__all__ = [
    "generate_synthetic_vaihingen",
    "synthetic_splits",
    "synthetic_layout",
    "SYNTHETIC_VAL_IDS",
    "GENERATOR_VERSION",
    "DEFAULT_NUM_TILES",
]
