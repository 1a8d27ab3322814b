"""Which tiles form each split: the named presets (``authors``: the published runs; ``official``:
the ISPRS benchmark), split lists on disk, and seeded ratio splits of flat folders (MMHunan)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .io import IMAGE_SUFFIXES

__all__ = ["VAIHINGEN_SPLITS", "POTSDAM_SPLITS", "SPLIT_PRESETS", "list_splits", "ratio_split", "read_id_list"]

SPLIT_PRESETS = ("authors", "official")
"""Named splits of Vaihingen and Potsdam (``paper`` is an older name of ``authors``)."""


def _ids(text: str) -> list[str]:
    return text.split()


VAIHINGEN_SPLITS: dict[str, dict[str, list[str]]] = {
    "authors": {
        "train": _ids("1 3 23 26 7 11 13 28 17 32 34 37"),
        "test": _ids("5 21 15 30"),
    },
    "official": {
        "train": _ids("1 3 5 7 11 13 15 17 21 23 26 28 30 32 34 37"),
        "test": _ids("2 4 6 8 10 12 14 16 20 22 24 27 29 31 33 35 38"),
    },
}

POTSDAM_SPLITS: dict[str, dict[str, list[str]]] = {
    "authors": {
        "train": _ids("6_10 7_10 2_12 3_11 2_10 7_8 5_10 3_12 5_12 7_11 7_9 6_9 7_7 4_12 6_8 6_12 6_7 4_11"),
        "test": _ids("4_10 5_11 2_11 3_10 6_11 7_12"),
    },
    "official": {
        "train": _ids(
            "2_10 2_11 2_12 3_10 3_11 3_12 4_10 4_11 4_12 5_10 5_11 5_12 6_7 6_8 6_9 6_10 "
            "6_11 6_12 7_7 7_8 7_9 7_10 7_11 7_12"
        ),
        "test": _ids("2_13 2_14 3_13 3_14 4_13 4_14 4_15 5_13 5_14 5_15 6_13 6_14 6_15 7_13"),
    },
}


VAIHINGEN_SPLITS["paper"] = VAIHINGEN_SPLITS["authors"]
POTSDAM_SPLITS["paper"] = POTSDAM_SPLITS["authors"]


def read_id_list(path: Path) -> list[str]:
    """Tile ids of a list file: one per line (blank lines and ``#`` comments skipped)."""
    if not path.is_file():
        raise FileNotFoundError(f"split list {path} not found")
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def ratio_split(ids: Sequence[str], train_ratio: float, seed: int) -> dict[str, list[str]]:
    """A seeded random split: ``round(train_ratio * n)`` ids train, the rest test (each sorted)."""
    ids = sorted(ids)
    n_train = int(round(train_ratio * len(ids)))
    order = np.random.default_rng(seed).permutation(len(ids))
    train = sorted(ids[i] for i in order[:n_train])
    return {"train": train, "test": sorted(set(ids) - set(train))}


def list_splits(root: Path, probe_dir: str, names: Sequence[str]) -> dict[str, list[str]]:
    """Splits from ``root/{split}/{probe_dir}`` folders or ``root/[splits/]{split}.txt`` lists."""
    found: dict[str, list[str]] = {}
    for name in names:
        folder = root / name / probe_dir
        lists = [root / "splits" / f"{name}.txt", root / f"{name}.txt"]
        if folder.is_dir():
            stems = sorted({p.stem for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES})
            found[name] = [f"{name}/{s}" for s in stems]
        elif any(p.is_file() for p in lists):
            found[name] = read_id_list(next(p for p in lists if p.is_file()))
    if not found:
        raise ValueError(
            f"{root}: no splits found: expected folders {root}/<split>/{probe_dir}, lists "
            f"{root}/splits/<split>.txt or {root}/<split>.txt (splits {list(names)}), or "
            "pass splits={...} to the layout"
        )
    return found
