"""Tiny archives laid out like the real downloads (Vaihingen, Potsdam, MMHunan) and the
overrides that make a run of them take seconds: shared by the application's tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from mmpeft_isprs.data import IGNORE_INDEX, ISPRS, VaihingenLayout, index_to_colour, write_tiff
from mmpeft_isprs.data.patterns import pad_id

TINY = [
    "model.backbone=vit_tiny",
    "model.embed_dim=32",
    "model.num_heads=2",
    "model.decode_channels=16",
    "model.window_size=4",
    "model.decoder_heads=2",
    "model.img_size=32",
    "model.checkpoint=null",
    "train.epochs=1",
    "train.batches_per_epoch=1",
    "train.batch_size=2",
    "train.num_workers=0",
    "train.progress=false",
    "eval.stride=32",
    "eval.val_stride=32",
]
SIZE = 32


def _colour_labels(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    classes = rng.integers(0, 6, (SIZE, SIZE))
    full = index_to_colour(classes, ISPRS)
    eroded = full.copy()
    eroded[::5] = 0  # black boundary rows, ignored
    return full, eroded


def make_vaihingen_archive(root: Path, ids: list[str], seed: int = 0) -> None:
    """``top/``, ``dsm/``, ``gts_for_participants/``, ``gts_eroded_for_participants/`` as unpacked."""
    rng = np.random.default_rng(seed)
    for i in ids:
        write_tiff(root / "top" / f"top_mosaic_09cm_area{i}.tif", rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
        write_tiff(
            root / "dsm" / f"dsm_09cm_matching_area{i}.tif", rng.uniform(240, 280, (SIZE, SIZE)).astype(np.float32)
        )
        full, eroded = _colour_labels(rng)
        write_tiff(root / "gts_for_participants" / f"top_mosaic_09cm_area{i}.tif", full)
        write_tiff(root / "gts_eroded_for_participants" / f"top_mosaic_09cm_area{i}_noBoundary.tif", eroded)


def make_potsdam_archive(root: Path, ids: list[str], seed: int = 0) -> None:
    """RGBIR tiles, the nDSM JPEGs with zero-padded ids (``dsm_potsdam_02_10_...``), and the labels
    of all tiles as the complete archives unpack (``5_Labels_all``, ``5_Labels_all_noBoundary``)."""
    rng = np.random.default_rng(seed)
    (root / "1_DSM_normalisation").mkdir(parents=True, exist_ok=True)
    for i in ids:
        write_tiff(
            root / "4_Ortho_RGBIR" / f"top_potsdam_{i}_RGBIR.tif", rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)
        )
        ndsm = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8))
        ndsm.save(root / "1_DSM_normalisation" / f"dsm_potsdam_{pad_id(i)}_normalized_lastools.jpg", quality=95)
        full, eroded = _colour_labels(rng)
        write_tiff(root / "5_Labels_all" / f"top_potsdam_{i}_label.tif", full)
        write_tiff(root / "5_Labels_all_noBoundary" / f"top_potsdam_{i}_label_noBoundary.tif", eroded)


def make_mmhunan_archive(root: Path, n: int, seed: int = 0) -> list[str]:
    """The three flat folders ``images_png/``, ``dsm_pngs/``, ``masks_png/`` (no split folders or lists)."""
    rng = np.random.default_rng(seed)
    for sub in ("images_png", "dsm_pngs", "masks_png"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    stems = [str(i) for i in range(n)]
    for s in stems:
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / "images_png" / f"{s}.png")
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)).save(root / "dsm_pngs" / f"{s}.png")
        tifffile.imwrite(root / "masks_png" / f"{s}.tif", rng.integers(-1, 7, (SIZE, SIZE)).astype(np.int8))
    return stems


def random_classes(rng: np.random.Generator, h: int, w: int, k: int = 6) -> np.ndarray:
    return rng.integers(0, k, (h, w)).astype(np.int64)


def make_vaihingen(root: Path, ids, size=(40, 48), seed=0) -> None:
    """Tiny Vaihingen-layout tiles with random content and valid colours."""
    rng = np.random.default_rng(seed)
    lay = VaihingenLayout()
    for i in ids:
        f = lay.tile_files(root, i)
        cls = random_classes(rng, *size)
        write_tiff(f.inputs["optical"], rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        write_tiff(f.inputs["dsm"], (250 + 10 * rng.random(size)).astype(np.float32))
        write_tiff(f.labels, index_to_colour(cls, ISPRS))
        eroded = cls.copy()
        eroded[0] = IGNORE_INDEX  # first row: "boundary"
        write_tiff(f.eval_labels, index_to_colour(eroded, ISPRS))
