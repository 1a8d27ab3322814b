"""Where a data set's files are and which tiles form each split.

A layout maps ``(root, tile_id)`` to the files of one tile (:class:`TileFiles`) and a split
name (``"train"``, ``"val"``, ``"test"``) to tile ids. It reads no pixels; :class:`TileSet`
does. Layouts for ISPRS Vaihingen and Potsdam and MMHunan here;
:class:`~.generic.GenericLayout` for a user's own tiles.

Splits: the authors' split by default (``SplitSpec(protocol="authors")``); the official ISPRS
split with ``protocol="official"``; MMHunan's flat folders split by a seeded ratio. A validation split is carved out of the training tiles
(``val_ids`` or a seeded ``val_fraction``) for model selection; the authors had none and picked
the best epoch on the test set.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .palette import ISPRS, MMHUNAN, DatasetInfo
from .patterns import merge_patterns, resolve_file, tile_key
from .splits import POTSDAM_SPLITS, VAIHINGEN_SPLITS, list_splits, ratio_split

LabelFormat = Literal["colour", "index"]


@dataclass(frozen=True)
class ModalitySpec:
    """One input modality.

    Attributes:
        name: key of the modality in samples (e.g. ``"optical"``, ``"dsm"``, ``"nir"``).
        kind: ``"image"``: integer values divided by their dtype's maximum (uint8 / 255),
            floats kept; ``"elevation"``: no-data handling and DSM scaling to [0, 1]
            (see :class:`~mmpeft_isprs.data.tiles.DsmNormalisation`).
        bands: channel indices to keep, in order (e.g. ``(3, 0, 1)`` = IRRG from RGBIR);
            ``None`` keeps all.
        source: the file role it is read from (a key of the layout's patterns, or for
            :class:`~.generic.GenericLayout` a folder); ``None``: its own name. Two modalities may
            share a source (Potsdam's RGB and near-infrared from one RGBIR tile).
        mean, std: per-band normalisation after the scaling, ``(x - mean) / std`` (None: none).
        nodata: an image modality's no-data value (NaN and infinite values of float data always
            count as missing; None: the value the GeoTIFF declares, if any); see :mod:`.nodata`.
        fill: what an image modality's missing pixels become: ``"min"`` (each band's tile
            minimum, with a warning naming file and band; None means this), ``"zero"``, or
            ``"raise"`` (an error). Elevation modalities follow their DSM rule instead.
    """

    name: str
    kind: Literal["image", "elevation"] = "image"
    bands: tuple[int, ...] | None = None
    source: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    nodata: float | None = None
    fill: Literal["min", "zero", "raise"] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("image", "elevation"):
            raise ValueError(f"ModalitySpec {self.name}: kind must be image or elevation")
        if self.fill not in (None, "min", "zero", "raise"):
            raise ValueError(f"ModalitySpec {self.name}: fill must be min, zero or raise, got {self.fill!r}")
        if (self.mean is None) != (self.std is None) or (
            self.mean is not None and len(self.mean) != len(self.std or ())
        ):
            raise ValueError(f"ModalitySpec {self.name}: give mean and std together, one number per band each")

    @property
    def role(self) -> str:
        """The file role (pattern key or folder) this modality is read from."""
        return self.source or self.name


@dataclass(frozen=True)
class TileFiles:
    """Files of one tile: one per modality, full labels (training), eroded labels (scoring)."""

    tile_id: str
    inputs: dict[str, Path]
    labels: Path | None
    eval_labels: Path | None


@dataclass(frozen=True)
class SplitSpec:
    """Which tiles form train / val / test.

    Attributes:
        protocol: ``"authors"`` (the published runs; ``"paper"`` is the older name) or
            ``"official"`` (the ISPRS benchmark) for Vaihingen and Potsdam.
        val_ids: training tiles held out for validation (ids not in the training split are
            used as extra validation tiles; ids of the test split are an error).
        val_fraction: hold out this fraction of the training tiles instead (at least one),
            chosen with ``val_seed``.
        val_seed: seed of the random hold-out.
        train_ratio: flat folders without split lists (MMHunan as downloaded): this fraction of
            the tiles trains, the rest tests (the paper's 450 / 50 of 500 patches: 0.9).
        ratio_seed: seed of that split.
    """

    protocol: str = "authors"
    val_ids: tuple[str, ...] = ()
    val_fraction: float = 0.0
    val_seed: int = 0
    train_ratio: float = 0.9
    ratio_seed: int = 0

    def __post_init__(self) -> None:
        if self.val_ids and self.val_fraction:
            raise ValueError("SplitSpec: give val_ids or val_fraction, not both")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"SplitSpec: val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 < self.train_ratio < 1.0:
            raise ValueError(f"SplitSpec: train_ratio must be in (0, 1), got {self.train_ratio}")
        object.__setattr__(self, "val_ids", tuple(str(i) for i in self.val_ids))


FilePatterns = Mapping[str, "str | Sequence[str]"]


class Layout(ABC):
    """Base class: file patterns and splits of a data set.

    Subclasses set ``info``, ``modalities``, ``label_format`` and ``patterns`` (role ->
    patterns, see :mod:`.patterns`; roles are the modality names, ``labels`` and
    ``eval_labels``) and implement :meth:`base_splits`. ``files`` replaces patterns by role
    (``data.files`` in the config) for copies whose names differ from the archive's.
    """

    info: DatasetInfo
    modalities: tuple[ModalitySpec, ...]
    label_format: LabelFormat
    colour_tolerance: int = 0
    patterns: dict[str, tuple[str, ...]] = {}

    def __init__(self, split: SplitSpec | None = None, splits: Mapping[str, Sequence[str]] | None = None) -> None:
        self.split = split or SplitSpec()
        self._splits = {k: [str(i) for i in v] for k, v in splits.items()} if splits else None

    def _set_patterns(self, defaults: dict[str, tuple[str, ...]], files: FilePatterns | None) -> None:
        self.patterns = merge_patterns(defaults, files)

    def tile_files(self, root: Path, tile_id: str) -> TileFiles:
        """Paths of the files of tile ``tile_id`` under ``root`` (they need not exist)."""
        base, stem = _split_tile(Path(root), tile_id)
        p = self.patterns
        evals = resolve_file(base, p["eval_labels"], stem) if "eval_labels" in p else None
        inputs = {m.name: resolve_file(base, p[m.role], stem) for m in self.modalities}
        return TileFiles(tile_id, inputs, resolve_file(base, p["labels"], stem), evals)

    @abstractmethod
    def base_splits(self, root: Path) -> dict[str, list[str]]:
        """Split name -> tile ids before the validation hold-out (``self.split.protocol``)."""

    def split_ids(self, split: str, root: Path | str) -> list[str]:
        """Tile ids of ``split`` (``train`` excludes the validation tiles).

        Raises:
            ValueError: unknown split or protocol, or validation tiles taken from the test set.
        """
        base = self._splits if self._splits is not None else self.base_splits(Path(root))
        train = list(base.get("train", []))
        val = self._val_ids(train, base)
        test = {tile_key(i) for i in base.get("test", [])}
        leak = sorted(i for i in val if tile_key(i) in test)
        if leak:
            raise ValueError(f"validation tiles {leak} are in the test split")
        held = {tile_key(i) for i in val}
        splits = {**base, "train": [i for i in train if tile_key(i) not in held], "val": val}
        if split not in splits:
            raise ValueError(f"unknown split {split!r}; available: {sorted(splits)}")
        if not splits[split] and split != "val":
            raise ValueError(f"split {split!r} is empty")
        return list(splits[split])

    def _val_ids(self, train: list[str], base: Mapping[str, Sequence[str]]) -> list[str]:
        spec = self.split
        if spec.val_ids:
            return list(spec.val_ids)
        if spec.val_fraction:
            n = max(1, int(round(spec.val_fraction * len(train))))
            rng = np.random.default_rng(spec.val_seed)
            picked = rng.choice(len(train), size=n, replace=False)
            return [train[i] for i in sorted(picked)]
        return list(base.get("val", []))

    def _protocol(self, table: Mapping[str, dict[str, list[str]]]) -> dict[str, list[str]]:
        if self.split.protocol not in table:
            raise ValueError(
                f"{type(self).__name__}: unknown protocol {self.split.protocol!r}; available: {sorted(table)}"
            )
        return {k: list(v) for k, v in table[self.split.protocol].items()}


VAIHINGEN_FILES = {
    "optical": ("top/top_mosaic_09cm_area{id}.tif",),
    "dsm": ("dsm/dsm_09cm_matching_area{id}.tif",),
    "labels": (
        "gts_for_participants/top_mosaic_09cm_area{id}.tif",
        "ISPRS_semantic_labeling_Vaihingen_ground_truth_COMPLETE/top_mosaic_09cm_area{id}.tif",
    ),
    "eval_labels": (
        "gts_eroded_for_participants/top_mosaic_09cm_area{id}_noBoundary.tif",
        "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE/top_mosaic_09cm_area{id}_noBoundary.tif",
    ),
}
"""Vaihingen's file names as in the archives (labels: participants' folder, else the complete ground truth)."""

POTSDAM_FILES = {
    "optical": ("4_Ortho_RGBIR/top_potsdam_{id}_RGBIR.tif",),
    "dsm": ("1_DSM_normalisation/dsm_potsdam_{id0}_normalized_lastools.jpg",),
    "labels": ("5_Labels_for_participants/top_potsdam_{id}_label.tif", "5_Labels_all/top_potsdam_{id}_label.tif"),
    "eval_labels": (
        "5_Labels_for_participants_no_Boundary/top_potsdam_{id}_label_noBoundary.tif",
        "5_Labels_all_noBoundary/top_potsdam_{id}_label_noBoundary.tif",
    ),
}
"""Potsdam's file names as in the archive: the nDSM's tile numbers are zero-padded (``02_10``)."""

MMHUNAN_FILES = {
    "optical": ("images_png/{id}.png",),
    "dsm": ("dsm_pngs/{id}.png",),
    "labels": ("masks_png/{id}.tif",),
}
"""MMHunan's three flat folders."""


def _keyed(table: Mapping[str, tuple[str, ...]], optical: str, dsm: str) -> dict[str, tuple[str, ...]]:
    names = {"optical": optical, "dsm": dsm}
    return {names.get(k, k): v for k, v in table.items()}


class VaihingenLayout(Layout):
    """ISPRS Vaihingen: IRRG ``top`` tiles, float DSM, colour labels (full and eroded).

    Files under ``root``: :data:`VAIHINGEN_FILES` (``top/top_mosaic_09cm_area{id}.tif``,
    ``dsm/dsm_09cm_matching_area{id}.tif``, ``gts_for_participants/...``,
    ``gts_eroded_for_participants/..._noBoundary.tif``); ``files`` replaces any of them.
    """

    info = ISPRS
    label_format: LabelFormat = "colour"

    def __init__(
        self,
        split: SplitSpec | None = None,
        splits: Mapping[str, Sequence[str]] | None = None,
        optical_key: str = "optical",
        dsm_key: str = "dsm",
        files: FilePatterns | None = None,
    ) -> None:
        super().__init__(split, splits)
        self.modalities = (ModalitySpec(optical_key), ModalitySpec(dsm_key, "elevation"))
        self._set_patterns(_keyed(VAIHINGEN_FILES, optical_key, dsm_key), files)

    def base_splits(self, root: Path) -> dict[str, list[str]]:
        return self._protocol(VAIHINGEN_SPLITS)


class PotsdamLayout(Layout):
    """ISPRS Potsdam: RGB or IRRG from the RGBIR tiles, 8-bit nDSM JPEG, colour labels.

    Files under ``root``: :data:`POTSDAM_FILES` (``4_Ortho_RGBIR/top_potsdam_{id}_RGBIR.tif``,
    ``1_DSM_normalisation/dsm_potsdam_{id0}_normalized_lastools.jpg`` with zero-padded numbers,
    labels in ``5_Labels_for_participants`` or ``5_Labels_all`` and their ``noBoundary``
    folders); ``files`` replaces any of them. ``colour_tolerance`` snaps near-palette label
    colours (0 = exact colours only).
    """

    info = ISPRS
    label_format: LabelFormat = "colour"
    BANDS: dict[str, tuple[int, ...]] = {"rgb": (0, 1, 2), "irrg": (3, 0, 1)}

    def __init__(
        self,
        split: SplitSpec | None = None,
        splits: Mapping[str, Sequence[str]] | None = None,
        bands: Literal["rgb", "irrg"] = "rgb",
        optical_key: str = "optical",
        dsm_key: str = "dsm",
        colour_tolerance: int = 0,
        files: FilePatterns | None = None,
    ) -> None:
        super().__init__(split, splits)
        if bands not in self.BANDS:
            raise ValueError(f"PotsdamLayout: bands must be one of {sorted(self.BANDS)}")
        self.modalities = (
            ModalitySpec(optical_key, "image", self.BANDS[bands]),
            ModalitySpec(dsm_key, "elevation", (0,)),
        )
        self.colour_tolerance = int(colour_tolerance)
        self._set_patterns(_keyed(POTSDAM_FILES, optical_key, dsm_key), files)

    def base_splits(self, root: Path) -> dict[str, list[str]]:
        return self._protocol(POTSDAM_SPLITS)


def _split_tile(root: Path, tile_id: str) -> tuple[Path, str]:
    """``"train/0001"`` -> (root/train, "0001"); plain ids stay under root."""
    if "/" in tile_id:
        sub, stem = tile_id.rsplit("/", 1)
        return root / sub, stem
    return root, tile_id


class MMHunanLayout(Layout):
    """MMHunan: 256x256 PNG patches, PNG DSM, index labels (``-1`` = ignore), 7 classes.

    Files: :data:`MMHUNAN_FILES` (``images_png/{id}.png``, ``dsm_pngs/{id}.png``,
    ``masks_png/{id}.tif``). Splits, first that applies: ``splits={...}`` (the config's
    ``data.splits`` or ``data.split_files``); split folders ``root/{split}/images_png`` (ids
    then read ``"{split}/{stem}"``); lists ``root/splits/{split}.txt`` or ``root/{split}.txt``;
    else the flat folders as downloaded, split at random: ``split.train_ratio`` (0.9: the
    paper's 450 / 50) seeded by ``split.ratio_seed``. No eroded labels: scoring uses the masks.
    """

    info = MMHUNAN
    label_format: LabelFormat = "index"

    def __init__(
        self,
        split: SplitSpec | None = None,
        splits: Mapping[str, Sequence[str]] | None = None,
        optical_key: str = "optical",
        dsm_key: str = "dsm",
        files: FilePatterns | None = None,
    ) -> None:
        super().__init__(split, splits)
        self.modalities = (ModalitySpec(optical_key), ModalitySpec(dsm_key, "elevation", (0,)))
        self._set_patterns(_keyed(MMHUNAN_FILES, optical_key, dsm_key), files)

    def flat_ids(self, root: Path) -> list[str]:
        """Ids of every patch in the flat optical folder (empty when there is none)."""
        pattern = self.patterns[self.modalities[0].name][0]
        folder, _, name = pattern.rpartition("/")
        head, _, tail = name.partition("{id}")
        path = Path(root) / folder
        if not path.is_dir():
            return []
        names = (p.name for p in path.iterdir() if p.is_file())
        return sorted(n[len(head) : len(n) - len(tail)] for n in names if n.startswith(head) and n.endswith(tail))

    def split_source(self, root: Path) -> str:
        """Where the splits come from, for the run's log."""
        if self._splits is not None:
            return "the config's split lists"
        try:
            list_splits(Path(root), "images_png", ("train", "val", "test"))
            return f"split folders or lists under {root}"
        except ValueError:
            s = self.split
            return f"seeded ratio {s.train_ratio} (data.train_ratio, seed data.split_seed={s.ratio_seed})"

    def base_splits(self, root: Path) -> dict[str, list[str]]:
        try:
            return list_splits(Path(root), "images_png", ("train", "val", "test"))
        except ValueError:
            ids = self.flat_ids(root)
            if not ids:
                raise
            return ratio_split(ids, self.split.train_ratio, self.split.ratio_seed)


__all__ = [
    "ModalitySpec",
    "TileFiles",
    "SplitSpec",
    "Layout",
    "VaihingenLayout",
    "PotsdamLayout",
    "MMHunanLayout",
    "VAIHINGEN_SPLITS",
    "POTSDAM_SPLITS",
    "VAIHINGEN_FILES",
    "POTSDAM_FILES",
    "MMHUNAN_FILES",
]
