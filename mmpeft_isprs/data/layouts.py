"""Where a data set's files are and which tiles form each split.

A layout maps ``(root, tile_id)`` to the files of one tile (:class:`TileFiles`) and a split
name (``"train"``, ``"val"``, ``"test"``) to tile ids. It reads no pixels; :class:`TileSet`
does. Layouts for ISPRS Vaihingen and Potsdam, MMHunan, and :class:`GenericLayout` for a
user's own tiles.

Splits: the paper's split by default (``SplitSpec(protocol="paper")``); the official ISPRS
split with ``protocol="official"``. A validation split is carved out of the training tiles
(``val_ids`` or a seeded ``val_fraction``) for model selection; the authors had none and picked
the best epoch on the test set.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np

from .io import IMAGE_SUFFIXES
from .palette import ISPRS, MMHUNAN, DatasetInfo
from .splits import POTSDAM_SPLITS, VAIHINGEN_SPLITS, list_splits

LabelFormat = Literal["colour", "index"]


@dataclass(frozen=True)
class ModalitySpec:
    """One input modality.

    Attributes:
        name: key of the modality in samples (e.g. ``"optical"``, ``"dsm"``).
        kind: ``"image"``: integer values divided by their dtype's maximum (uint8 / 255),
            floats kept; ``"elevation"``: no-data handling and DSM scaling to [0, 1]
            (see :class:`~mmpeft_isprs.data.tiles.DsmNormalisation`).
        bands: channel indices to keep, in order (e.g. ``(3, 0, 1)`` = IRRG from RGBIR);
            ``None`` keeps all.
    """

    name: str
    kind: Literal["image", "elevation"] = "image"
    bands: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("image", "elevation"):
            raise ValueError(f"ModalitySpec {self.name}: kind must be image or elevation")


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
        protocol: ``"paper"`` (the published runs) or ``"official"`` (the ISPRS benchmark).
        val_ids: training tiles held out for validation (ids not in the training split are
            used as extra validation tiles; ids of the test split are an error).
        val_fraction: hold out this fraction of the training tiles instead (at least one),
            chosen with ``val_seed``.
        val_seed: seed of the random hold-out.
    """

    protocol: str = "paper"
    val_ids: tuple[str, ...] = ()
    val_fraction: float = 0.0
    val_seed: int = 0

    def __post_init__(self) -> None:
        if self.val_ids and self.val_fraction:
            raise ValueError("SplitSpec: give val_ids or val_fraction, not both")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"SplitSpec: val_fraction must be in [0, 1), got {self.val_fraction}")
        object.__setattr__(self, "val_ids", tuple(str(i) for i in self.val_ids))


class Layout(ABC):
    """Base class: file patterns and splits of a data set.

    Subclasses set ``info``, ``modalities``, ``label_format`` and implement
    :meth:`tile_files` and :meth:`base_splits`.
    """

    info: DatasetInfo
    modalities: tuple[ModalitySpec, ...]
    label_format: LabelFormat
    colour_tolerance: int = 0

    def __init__(
        self, split: SplitSpec | None = None, splits: Mapping[str, Sequence[str]] | None = None
    ) -> None:
        self.split = split or SplitSpec()
        self._splits = {k: [str(i) for i in v] for k, v in splits.items()} if splits else None

    @property
    def has_eval_labels(self) -> bool:
        """True when the data set ships separate (eroded) labels for scoring."""
        return False

    @abstractmethod
    def tile_files(self, root: Path, tile_id: str) -> TileFiles:
        """Paths of the files of tile ``tile_id`` under ``root`` (they need not exist)."""

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
        test = set(base.get("test", []))
        leak = sorted(set(val) & test)
        if leak:
            raise ValueError(f"validation tiles {leak} are in the test split")
        splits = {**base, "train": [i for i in train if i not in set(val)], "val": val}
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
                f"{type(self).__name__}: unknown protocol {self.split.protocol!r}; "
                f"available: {sorted(table)}"
            )
        return {k: list(v) for k, v in table[self.split.protocol].items()}


class VaihingenLayout(Layout):
    """ISPRS Vaihingen: IRRG ``top`` tiles, float DSM, colour labels (full and eroded).

    Files under ``root``: ``top/top_mosaic_09cm_area{id}.tif``,
    ``dsm/dsm_09cm_matching_area{id}.tif``, ``gts_for_participants/top_mosaic_09cm_area{id}.tif``,
    ``gts_eroded_for_participants/top_mosaic_09cm_area{id}_noBoundary.tif``.
    """

    info = ISPRS
    label_format: LabelFormat = "colour"

    def __init__(
        self,
        split: SplitSpec | None = None,
        splits: Mapping[str, Sequence[str]] | None = None,
        optical_key: str = "optical",
        dsm_key: str = "dsm",
    ) -> None:
        super().__init__(split, splits)
        self.modalities = (ModalitySpec(optical_key), ModalitySpec(dsm_key, "elevation"))

    @property
    def has_eval_labels(self) -> bool:
        return True

    def tile_files(self, root: Path, tile_id: str) -> TileFiles:
        root = Path(root)
        optical, dsm = (m.name for m in self.modalities)
        return TileFiles(
            tile_id=tile_id,
            inputs={
                optical: root / "top" / f"top_mosaic_09cm_area{tile_id}.tif",
                dsm: root / "dsm" / f"dsm_09cm_matching_area{tile_id}.tif",
            },
            labels=root / "gts_for_participants" / f"top_mosaic_09cm_area{tile_id}.tif",
            eval_labels=root / "gts_eroded_for_participants"
            / f"top_mosaic_09cm_area{tile_id}_noBoundary.tif",
        )

    def base_splits(self, root: Path) -> dict[str, list[str]]:
        return self._protocol(VAIHINGEN_SPLITS)


class PotsdamLayout(Layout):
    """ISPRS Potsdam: RGB or IRRG from the RGBIR tiles, 8-bit nDSM JPEG, colour labels.

    Files under ``root``: ``4_Ortho_RGBIR/top_potsdam_{id}_RGBIR.tif``,
    ``1_DSM_normalisation/dsm_potsdam_{id}_normalized_lastools.jpg``,
    ``5_Labels_for_participants/top_potsdam_{id}_label.tif``,
    ``5_Labels_for_participants_no_Boundary/top_potsdam_{id}_label_noBoundary.tif``.
    ``colour_tolerance`` snaps near-palette label colours (0 = exact colours only).
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
    ) -> None:
        super().__init__(split, splits)
        if bands not in self.BANDS:
            raise ValueError(f"PotsdamLayout: bands must be one of {sorted(self.BANDS)}")
        self.modalities = (
            ModalitySpec(optical_key, "image", self.BANDS[bands]),
            ModalitySpec(dsm_key, "elevation", (0,)),
        )
        self.colour_tolerance = int(colour_tolerance)

    @property
    def has_eval_labels(self) -> bool:
        return True

    def tile_files(self, root: Path, tile_id: str) -> TileFiles:
        root = Path(root)
        optical, dsm = (m.name for m in self.modalities)
        return TileFiles(
            tile_id=tile_id,
            inputs={
                optical: root / "4_Ortho_RGBIR" / f"top_potsdam_{tile_id}_RGBIR.tif",
                dsm: root / "1_DSM_normalisation"
                / f"dsm_potsdam_{tile_id}_normalized_lastools.jpg",
            },
            labels=root / "5_Labels_for_participants" / f"top_potsdam_{tile_id}_label.tif",
            eval_labels=root / "5_Labels_for_participants_no_Boundary"
            / f"top_potsdam_{tile_id}_label_noBoundary.tif",
        )

    def base_splits(self, root: Path) -> dict[str, list[str]]:
        return self._protocol(POTSDAM_SPLITS)


def _find(folder: Path, stem: str, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> Path:
    """``folder/stem.<suffix>`` for the first suffix that exists (else the first suffix)."""
    for suffix in suffixes:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return folder / f"{stem}{suffixes[0]}"


def _split_tile(root: Path, tile_id: str) -> tuple[Path, str]:
    """``"train/0001"`` -> (root/train, "0001"); plain ids stay under root."""
    if "/" in tile_id:
        sub, stem = tile_id.rsplit("/", 1)
        return root / sub, stem
    return root, tile_id


class MMHunanLayout(Layout):
    """MMHunan: 256x256 PNG patches, PNG DSM, index labels (``-1`` = ignore), 7 classes.

    Files: ``images_png/{id}.png``, ``dsm_pngs/{id}.png``, ``masks_png/{id}.tif``, either
    directly under ``root`` with id lists ``root/splits/{split}.txt`` (or ``root/{split}.txt``),
    or under split folders ``root/{split}/...`` (ids then read ``"{split}/{stem}"``), or with
    ``splits={...}`` given. No separate eroded labels: scoring uses the same masks.
    """

    info = MMHUNAN
    label_format: LabelFormat = "index"

    def __init__(
        self,
        split: SplitSpec | None = None,
        splits: Mapping[str, Sequence[str]] | None = None,
        optical_key: str = "optical",
        dsm_key: str = "dsm",
    ) -> None:
        super().__init__(split, splits)
        self.modalities = (ModalitySpec(optical_key), ModalitySpec(dsm_key, "elevation", (0,)))

    def tile_files(self, root: Path, tile_id: str) -> TileFiles:
        base, stem = _split_tile(Path(root), tile_id)
        optical, dsm = (m.name for m in self.modalities)
        return TileFiles(
            tile_id=tile_id,
            inputs={
                optical: base / "images_png" / f"{stem}.png",
                dsm: base / "dsm_pngs" / f"{stem}.png",
            },
            labels=base / "masks_png" / f"{stem}.tif",
            eval_labels=None,
        )

    def base_splits(self, root: Path) -> dict[str, list[str]]:
        return list_splits(Path(root), "images_png", ("train", "val", "test"))


@dataclass
class GenericLayout(Layout):
    """Your own tiles: one folder per modality plus a label folder, files sharing a stem.

    ``root/<folder of each modality>/<stem>.<tif|tiff|png|jpg|jpeg>`` and
    ``root/<label_dir>/<stem>.<ext>`` (optionally ``root/<eval_label_dir>/<stem>.<ext>`` with
    eroded labels for scoring). Any number of modalities; labels as class indices
    (``label_format="index"``, values in ``info.ignore_values`` ignored) or colours
    (``"colour"``, ``info.palette``). Splits: ``splits={...}``, or folders
    ``root/<split>/<folder>/...``, or lists ``root/splits/<split>.txt`` / ``root/<split>.txt``.

    Example::

        GenericLayout(
            modalities=(ModalitySpec("optical"), ModalitySpec("dsm", "elevation"),
                        ModalitySpec("sar")),
            info=ISPRS, label_format="colour", label_dir="labels",
        )

    Attributes:
        modalities: the inputs; each is read from the folder ``folders.get(name, name)``.
        info: classes, palette, ignore values.
        label_format: ``"index"`` or ``"colour"``.
        label_dir: folder of the training labels.
        eval_label_dir: folder of eroded labels for scoring (``None``: score on label_dir).
        folders: modality name -> folder name, where they differ.
        colour_tolerance: snap near-palette colours (colour labels only).
    """

    modalities: tuple[ModalitySpec, ...] = (ModalitySpec("optical"), ModalitySpec("dsm", "elevation"))
    info: DatasetInfo = ISPRS
    label_format: LabelFormat = "index"
    label_dir: str = "labels"
    eval_label_dir: str | None = None
    folders: dict[str, str] = field(default_factory=dict)
    colour_tolerance: int = 0
    split: SplitSpec = field(default_factory=SplitSpec)
    splits: dict[str, list[str]] | None = None

    def __post_init__(self) -> None:
        names = [m.name for m in self.modalities]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"GenericLayout: modality names must be distinct and non-empty: {names}")
        if self.label_format not in ("index", "colour"):
            raise ValueError("GenericLayout: label_format must be 'index' or 'colour'")
        Layout.__init__(self, self.split, self.splits)

    @property
    def has_eval_labels(self) -> bool:
        return self.eval_label_dir is not None

    def tile_files(self, root: Path, tile_id: str) -> TileFiles:
        base, stem = _split_tile(Path(root), tile_id)
        inputs = {m.name: _find(base / self.folders.get(m.name, m.name), stem) for m in self.modalities}
        labels = _find(base / self.label_dir, stem)
        evals = _find(base / self.eval_label_dir, stem) if self.eval_label_dir else None
        return TileFiles(tile_id, inputs, labels, evals)

    def base_splits(self, root: Path) -> dict[str, list[str]]:
        first = self.modalities[0].name
        return list_splits(Path(root), self.folders.get(first, first), ("train", "val", "test"))


__all__ = [
    "ModalitySpec", "TileFiles", "SplitSpec", "Layout", "VaihingenLayout", "PotsdamLayout",
    "MMHunanLayout", "GenericLayout", "VAIHINGEN_SPLITS", "POTSDAM_SPLITS",
]
