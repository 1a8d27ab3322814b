"""The ``data`` section: where the tiles are and how they are split and scaled."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "DataConfig",
    "SyntheticConfig",
    "GenericConfig",
    "ModalityConfig",
    "DATASETS",
    "BUILTIN_ROLES",
    "provided_modalities",
    "new_roles",
]

DATASETS = ("vaihingen", "potsdam", "mmhunan", "generic", "synthetic")
BUILTIN_ROLES = ("optical", "dsm", "labels", "eval_labels")
"""The file roles of the Vaihingen, Potsdam and MMHunan layouts (``data.files`` may add others)."""


@dataclass
class SyntheticConfig:
    """The synthetic Vaihingen-layout data set (``data.dataset: synthetic``), generated if missing.

    Attributes:
        num_tiles: tiles to generate, 3..19 (19 = 12 train, 3 val, 4 test, the paper's ids).
        tile_size: side of each tile in pixels.
        seed: scene seed.
    """

    num_tiles: int = 19
    tile_size: int = 512
    seed: int = 0


@dataclass
class GenericConfig:
    """Your own tiles (``data.dataset: generic``): one folder per modality plus labels.

    Attributes:
        modalities: modality name -> ``"image"`` (scaled by dtype max) or ``"elevation"``
            (DSM scaling); read from ``root/<name>/<stem>.<ext>`` unless ``folders`` says otherwise.
        folders: modality name -> folder name, where they differ.
        label_dir: folder of the labels.
        eval_label_dir: folder of eroded labels used for scoring (null: ``label_dir``).
        label_format: ``"index"`` (class indices) or ``"colour"`` (palette colours).
        classes: ``"isprs"`` (6 classes) or ``"mmhunan"`` (7 classes): names, palette, means.
    """

    modalities: dict[str, str] = field(default_factory=lambda: {"optical": "image", "dsm": "elevation"})
    folders: dict[str, str] = field(default_factory=dict)
    label_dir: str = "labels"
    eval_label_dir: str | None = None
    label_format: Literal["index", "colour"] = "index"
    classes: Literal["isprs", "mmhunan"] = "isprs"


@dataclass
class ModalityConfig:
    """One input modality read from the data set (``data.modalities.<name>``).

    Attributes:
        source: where its pixels come from: a file role of the layout (``optical`` or ``dsm``
            for Vaihingen, Potsdam and MMHunan, or a role added with ``data.files``); for
            ``generic``, a folder under the root. Null: the modality's own name.
        bands: band indices of the source file to keep, in order (e.g. ``[3]``: Potsdam's
            near-infrared band of the RGBIR tiles); null keeps the source's default bands.
        kind: ``image`` (integers divided by their dtype's maximum) or ``elevation`` (DSM scaling
            of the ``data.dsm_*`` keys); null: ``elevation`` for a ``dsm`` source, else ``image``.
        mean, std: per-band normalisation after that scaling, ``(x - mean) / std``, one number
            per kept band (null: none, as the paper).
        nodata: an image modality's no-data value (NaN and infinite values of float rasters always
            count as missing; null: the value the GeoTIFF declares, if any). Elevation: ``data.dsm_nodata``.
        fill: what an image modality's missing pixels become, counted per band when the tile is read:
            ``min`` (each band's tile minimum, with a warning naming the file and the band; null means
            this), ``zero``, or ``raise`` (an error naming them). Elevation: ``data.dsm_fill``.
    """

    source: str | None = None
    bands: list[int] | None = None
    kind: Literal["image", "elevation"] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    nodata: float | None = None
    fill: Literal["min", "zero", "raise"] | None = None

    def __post_init__(self) -> None:
        if self.bands is not None and (not self.bands or min(self.bands) < 0):
            raise ValueError(f"bands must be a non-empty list of band indices >= 0, got {self.bands}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give mean and std together (one number per band each)")
        if self.mean is not None and self.std is not None:
            if len(self.mean) != len(self.std):
                raise ValueError(f"mean has {len(self.mean)} numbers, std {len(self.std)}: one per band each")
            if self.bands is not None and len(self.mean) != len(self.bands):
                raise ValueError(
                    f"mean and std have {len(self.mean)} numbers for {len(self.bands)} band(s) {self.bands}"
                )
            if min(self.std) <= 0:
                raise ValueError(f"std must be > 0, got {self.std}")


@dataclass
class DataConfig:
    """Where the tiles are and how they are split and scaled (the crop side is ``model.img_size``).

    Attributes:
        dataset: ``vaihingen``, ``potsdam``, ``mmhunan``, ``generic`` or ``synthetic``.
        root: data folder (layouts in docs/isprs.md).
        split: Vaihingen / Potsdam preset: ``"authors"`` (the published runs' tiles; ``"paper"``
            is its older name) or ``"official"`` (the ISPRS benchmark: Vaihingen 16 / 17,
            Potsdam 24 / 14 tiles).
        splits: explicit tile ids per split (``{train: [...], test: [...]}``); replaces the
            preset, split folders and lists.
        split_files: id list files per split (one id a line; relative to ``root``), e.g.
            ``{train: splits/train.txt, test: splits/test.txt}``.
        train_ratio: flat folders with no lists (MMHunan as downloaded): this fraction of the
            tiles trains, the rest tests (0.9 = the paper's 450 / 50); recorded in the run.
        split_seed: seed of the ``train_ratio`` draw.
        files: file name patterns by role (``optical``, ``dsm``, ``labels``, ``eval_labels``)
            where your copy's names differ from the archive's, e.g.
            ``{dsm: "ndsm/dsm_potsdam_{id0}_normalized_lastools.jpg"}``; ``{id}`` is the tile
            id, ``{id0}`` the id zero-padded (``02_10``); a list gives alternatives. A new role
            adds a raster of its own beside the archive (``{sar: "sar/sar_area{id}.tif"}``), read
            as the modality of its name unless a ``data.modalities`` entry takes it as its source. A new role
            adds a raster of its own beside the archive (``{sar: "sar/sar_area{id}.tif"}``), read
            as the modality of its name unless a ``data.modalities`` entry takes it as its source.
        val_ids: tiles used for model selection (taken out of training; test tiles are an error).
        val_fraction: instead of ``val_ids``, hold out this fraction of the training tiles.
        val_seed: seed of the ``val_fraction`` draw.
        dsm_scaling: ``"tile"`` (per-tile min-max to [0, 1], the paper), ``"global"``
            (fixed ``dsm_min``/``dsm_max``) or ``"none"``.
        dsm_min, dsm_max: bounds for ``dsm_scaling: global``.
        dsm_nodata: DSM value meaning "no data" (NaN is always no data).
        dsm_fill: ``"min"`` (fill no-data with the tile minimum) or ``"raise"``.
        potsdam_bands: ``"rgb"`` (the paper) or ``"irrg"`` from Potsdam's RGBIR tiles.
        tile_weights: ``"uniform"`` (every tile equally likely, the authors) or ``"area"``.
        cache: keep decoded tiles in memory (false: read windows from disk).
        modalities: modalities beyond (or refining) the data set's ``optical`` and ``dsm``, by
            name (:class:`ModalityConfig`): e.g. ``{nir: {source: optical, bands: [3]}}`` reads
            Potsdam's near-infrared band from the RGBIR tiles as a modality of its own; ``model.modalities``
            picks among them.
        synthetic: options of the synthetic data set.
        generic: options of the generic layout.
    """

    dataset: Literal["vaihingen", "potsdam", "mmhunan", "generic", "synthetic"] = "vaihingen"
    root: str = "data/vaihingen"
    split: Literal["authors", "official", "paper"] = "authors"
    splits: dict[str, list[str]] = field(default_factory=dict)
    split_files: dict[str, str] = field(default_factory=dict)
    train_ratio: float = 0.9
    split_seed: int = 0
    files: dict[str, str | list[str]] = field(default_factory=dict)
    val_ids: list[str] = field(default_factory=list)
    val_fraction: float = 0.0
    val_seed: int = 0
    dsm_scaling: Literal["tile", "global", "none"] = "tile"
    dsm_min: float | None = None
    dsm_max: float | None = None
    dsm_nodata: float | None = None
    dsm_fill: Literal["min", "raise"] = "min"
    potsdam_bands: Literal["rgb", "irrg"] = "rgb"
    tile_weights: Literal["uniform", "area"] = "uniform"
    cache: bool = True
    modalities: dict[str, ModalityConfig] = field(default_factory=dict)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    generic: GenericConfig = field(default_factory=GenericConfig)


def new_roles(data: DataConfig) -> list[str]:
    """The roles of ``data.files`` the data set does not have: rasters of their own beside it."""
    known = set(BUILTIN_ROLES)
    if data.dataset == "generic":
        known |= set(data.generic.modalities) | set(data.generic.folders.values())
    return [r for r in data.files if r not in known]


def provided_modalities(data: DataConfig) -> list[str]:
    """The modality names ``data`` provides: the data set's own (``optical`` and ``dsm``, or
    ``data.generic.modalities``), the entries of ``data.modalities``, then each new role of
    ``data.files`` that no entry reads, in that order."""
    base = list(data.generic.modalities) if data.dataset == "generic" else ["optical", "dsm"]
    names = base + [m for m in data.modalities if m not in base]
    sourced = {e.source or n for n, e in data.modalities.items()}
    return names + [r for r in new_roles(data) if r not in names and r not in sourced]
