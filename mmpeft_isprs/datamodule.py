"""The data module: datasets, sampler and loaders of an experiment, built from its config.

The torchgeo split: :mod:`mmpeft_isprs.data` turns files into samples and knows nothing of
configs; this module reads the ``data`` (and ``train``/``eval``) sections and builds what a run
needs: the tile sets of each split (validated before anything trains), the random-crop training
set, and one loader per epoch that yields this rank's share of every global batch.

Training items are a pure function of ``(seed, epoch, index)``, so any rank, worker or resumed
run gets the same crop for the same index, and skipping consumed batches on resume is exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from .config import ConfigError, DataConfig, ExperimentConfig
from .config.checks import stem_error
from .config.data import new_roles
from .data import (
    ISPRS,
    MMHUNAN,
    DataError,
    DsmNormalisation,
    GenericLayout,
    JointFlipRotate,
    Layout,
    MMHunanLayout,
    ModalitySpec,
    PotsdamLayout,
    RandomCropDataset,
    SplitSpec,
    TileSet,
    VaihingenLayout,
    generate_synthetic_vaihingen,
    raster_info,
    synthetic_layout,
)
from .data.splits import read_id_list
from .data.tiles import missing_files
from .distributed import DistInfo, barrier
from .threads import worker_init

__all__ = [
    "ISPRSDataModule",
    "EpochBatchSampler",
    "dsm_rule",
    "prepare_data_root",
    "make_layout",
    "open_layout",
    "split_ids",
    "make_tileset",
    "modality_specs",
]


# --------------------------------------------------------------------------- from the data section
def dsm_rule(data: DataConfig | None) -> DsmNormalisation:
    """The DSM scaling of ``data`` (per tile min-max, the default, when ``data`` is None)."""
    if data is None:
        return DsmNormalisation()
    return DsmNormalisation(data.dsm_scaling, data.dsm_min, data.dsm_max, data.dsm_nodata, data.dsm_fill)


def prepare_data_root(data: DataConfig, info: DistInfo | None = None) -> None:
    """Generate the synthetic data set if it is missing (rank 0; the others wait)."""
    if data.dataset != "synthetic":
        return
    if info is None or info.is_main:
        s = data.synthetic
        generate_synthetic_vaihingen(data.root, num_tiles=s.num_tiles, tile_size=s.tile_size, seed=s.seed)
    barrier()


def _config_splits(data: DataConfig) -> dict[str, list[str]] | None:
    """Explicit split lists of the config (``data.splits``, ``data.split_files``), or None."""
    if data.splits and data.split_files:
        raise ConfigError("data.splits: give splits or split_files, not both")
    if data.split_files:
        root = Path(data.root)
        try:
            return {k: read_id_list(root / v) for k, v in data.split_files.items()}
        except FileNotFoundError as exc:
            raise ConfigError(f"data.split_files: {exc}") from None
    return {k: [str(i) for i in v] for k, v in data.splits.items()} or None


def _modality_specs(layout: Layout, data: DataConfig) -> tuple[ModalitySpec, ...]:
    """The layout's modalities refined and extended by ``data.modalities`` (sources, bands, kinds, statistics)."""
    base = {m.name: m for m in layout.modalities}
    roles = sorted(k for k in layout.patterns if k not in ("labels", "eval_labels"))
    out = dict(base)
    for name, e in data.modalities.items():
        src = e.source or name
        if data.dataset != "generic" and src not in roles:
            raise ConfigError(
                f"data.modalities.{name}.source: {data.dataset} has no file role {src!r} (roles: {roles}); "
                f"name one (e.g. source: optical) or add its file pattern with data.files.{src}"
            )
        parent = base.get(src)
        kind = e.kind or (parent.kind if parent else ("elevation" if src == "dsm" else "image"))
        bands = tuple(e.bands) if e.bands is not None else (parent.bands if parent else None)
        if kind == "elevation" and bands is not None and len(bands) != 1:
            raise ConfigError(f"data.modalities.{name}.bands: an elevation modality keeps one band, got {list(bands)}")
        stats = (tuple(e.mean), tuple(e.std)) if e.mean is not None and e.std is not None else (None, None)
        source = parent.source if parent is not None and src == name else src
        out[name] = ModalitySpec(name, kind, bands, None if source == name else source, *stats, e.nodata, e.fill)  # type: ignore[arg-type]
    sourced = {m.role for m in out.values()}
    for role in new_roles(data):  # a raster of its own (data.files.<role>) that no entry reads: its own modality
        if role not in out and role not in sourced:
            out[role] = ModalitySpec(role)
    return tuple(out.values())


def make_layout(data: DataConfig) -> Layout:
    """The file layout and splits of ``data`` (validation hold-out included), with the
    modalities of ``data.modalities``."""
    layout = _base_layout(data)
    if data.modalities or data.files:
        layout.modalities = _modality_specs(layout, data)
    return layout


def modality_specs(data: DataConfig) -> dict[str, ModalitySpec]:
    """Each modality ``data`` provides, as read (sources, bands, kinds, statistics), without
    opening the data folder (the synthetic set's modalities are Vaihingen's)."""
    dataset = "vaihingen" if data.dataset == "synthetic" else data.dataset
    data = dataclasses.replace(data, dataset=dataset, split_files={}, splits={})
    return {m.name: m for m in make_layout(data).modalities}


def _base_layout(data: DataConfig) -> Layout:
    split = SplitSpec(
        data.split, tuple(data.val_ids), data.val_fraction, data.val_seed, data.train_ratio, data.split_seed
    )
    splits, files = _config_splits(data), dict(data.files) or None
    try:
        if data.dataset == "vaihingen":
            return VaihingenLayout(split=split, splits=splits, files=files)
        if data.dataset == "potsdam":
            return PotsdamLayout(split=split, splits=splits, bands=data.potsdam_bands, files=files)
        if data.dataset == "mmhunan":
            return MMHunanLayout(split=split, splits=splits, files=files)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if data.dataset == "synthetic":
        return synthetic_layout(data.root, split=split, files=files)
    g = data.generic
    return GenericLayout(
        modalities=tuple(ModalitySpec(n, k) for n, k in g.modalities.items()),  # type: ignore[arg-type]
        info=MMHUNAN if g.classes == "mmhunan" else ISPRS,
        label_format=g.label_format,
        label_dir=g.label_dir,
        eval_label_dir=g.eval_label_dir,
        folders=dict(g.folders),
        split=split,
        splits=splits,
        files=files,
    )


def open_layout(data: DataConfig) -> Layout:
    """:func:`make_layout` of an existing ``data.root``; every problem a :class:`ConfigError`."""
    root = Path(data.root)
    if not root.is_dir():
        raise ConfigError(
            f"data.root: folder {root} not found (dataset {data.dataset}); `mmpeft-isprs help isprs layouts` shows the "
            "expected layout; or set data.root=/path/to/data"
        )
    try:
        return make_layout(data)
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"data ({data.dataset} in {root}): {exc}") from exc


def split_ids(data: DataConfig, split: str, layout: Layout | None = None) -> list[str]:
    """Tile ids of ``split`` ([] for an empty validation split); ``layout``: the one
    :func:`make_layout` built (built here when None)."""
    try:
        return (layout or make_layout(data)).split_ids(split, data.root)
    except ConfigError:
        raise
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"data ({data.dataset} in {data.root}): {exc}") from None


def make_tileset(data: DataConfig, split: str, labels: str = "full", layout: Layout | None = None) -> TileSet:
    """The validated tiles of ``split`` (raises DataError listing every problem found);
    ``layout``: the one :func:`open_layout` built (built here when None)."""
    layout = layout or open_layout(data)
    root = Path(data.root)
    try:
        return TileSet(layout, root, split, labels=labels, dsm=dsm_rule(data), cache=data.cache)  # type: ignore[arg-type]
    except (DataError, ConfigError):
        raise
    except (ValueError, FileNotFoundError) as exc:  # unknown split, empty split, val tiles in the test set
        raise ConfigError(f"data ({data.dataset} in {root}): {exc}") from exc


def check_file_stems(cfg: ExperimentConfig, tiles: TileSet) -> None:
    """The stem of each modality of the model that keeps every band of its files, against the band
    count of its first tile's file (the config could not know it): a ConfigError naming ``model.stems``."""
    for m in tiles.modalities:
        if m.name not in cfg.model.modalities or m.bands is not None or m.kind != "image":
            continue
        path = tiles.files(0).inputs[m.name]
        error = stem_error(cfg.model, m.name, raster_info(path).channels, f"all bands of {path}")
        if error is not None:
            raise ConfigError(error)


# --------------------------------------------------------------------------- sampler
class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches ``start..batches-1`` of one epoch; this rank's share of each global batch.

    Global batch ``b`` holds dataset items ``b*B .. b*B+B-1`` (B = global batch size); rank
    ``r`` of ``W`` takes the contiguous slice ``r*B/W .. (r+1)*B/W - 1``. Indices are
    ``(epoch, item)`` pairs, so workers need no ``set_epoch``. Skipping consumed batches on
    resume is exact because items depend only on (seed, epoch, index).
    """

    def __init__(self, epoch: int, start: int, batches: int, batch_size: int, rank: int = 0, world: int = 1) -> None:
        if batch_size % world:
            raise ConfigError(f"train.batch_size {batch_size} must be divisible by the number of processes ({world})")
        self.epoch, self.start, self.batches = epoch, start, batches
        self.global_bs, self.per_rank, self.rank = batch_size, batch_size // world, rank

    def __len__(self) -> int:
        return self.batches - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b in range(self.start, self.batches):
            first = b * self.global_bs + self.rank * self.per_rank
            yield [(self.epoch, first + j) for j in range(self.per_rank)]


# --------------------------------------------------------------------------- the data module
class ISPRSDataModule:
    """The tiles and loaders of one experiment on this process.

    :meth:`setup` validates and opens the training tiles and the validation tiles (None when
    the config holds out none), then builds the random-crop training set; :meth:`train_loader`
    gives the rest of one epoch; :meth:`tiles` opens any split for evaluation.
    """

    def __init__(self, cfg: ExperimentConfig, info: DistInfo | None = None, log: Callable[[str], None] = print) -> None:
        self.cfg, self.info, self.log = cfg, info or DistInfo(), log
        self.train_tiles: TileSet | None = None
        self.val_tiles: TileSet | None = None
        self.train_dataset: RandomCropDataset | None = None
        self._layout: Layout | None = None

    @property
    def layout(self) -> Layout:
        """The file layout and splits of the data section, built once (the synthetic set is
        generated first if missing); every split and tile set of this module uses it."""
        if self._layout is None:
            prepare_data_root(self.cfg.data, self.info)
            self._layout = open_layout(self.cfg.data)
        return self._layout

    def setup(self) -> None:
        """Open the training and validation tiles and build the training set (raises before training)."""
        d, t, layout = self.cfg.data, self.cfg.train, self.layout
        self.train_tiles = make_tileset(d, "train", labels="full", layout=layout)
        check_file_stems(self.cfg, self.train_tiles)
        has_val = bool(split_ids(d, "val", layout))
        self.val_tiles = make_tileset(d, "val", labels=self.cfg.eval.labels, layout=layout) if has_val else None
        if isinstance(layout, MMHunanLayout) and self.info.is_main:
            counts = ", ".join(f"{len(split_ids(d, s, layout))} {s}" for s in ("train", "val", "test"))
            self.log(f"data: {d.dataset} split from {layout.split_source(Path(d.root))}: {counts} tiles")
        if self.info.is_main:
            self._check_official_test(layout)
        if self.val_tiles is None and self.info.is_main:
            self.log("note: no validation split (data.val_ids / data.val_fraction); best.safetensors = last epoch")
        self.train_dataset = RandomCropDataset(
            self.train_tiles,
            crop_size=self.cfg.crop_size,
            samples_per_epoch=t.batches_per_epoch * t.batch_size,
            seed=t.seed,
            transforms=JointFlipRotate(hflip=t.flips, vflip=t.flips, rot90=t.rotations),
            tile_weights=d.tile_weights,
        )

    def _check_official_test(self, layout: Layout) -> None:
        """With ``data.split=official``, say at the start when test tiles lack files (evaluation
        would fail only after training), naming the complete ground-truth folders they need."""
        d = self.cfg.data
        if d.split != "official" or d.dataset not in ("vaihingen", "potsdam") or d.splits or d.split_files:
            return
        ids = split_ids(d, "test", layout)
        files = [layout.tile_files(Path(d.root), i) for i in ids]
        lacking = [f.tile_id for f in files if missing_files(layout, [f], self.cfg.eval.labels)]  # type: ignore[arg-type]
        if not lacking:
            return
        complete = sorted(
            {str(Path(p).parent) for role in ("labels", "eval_labels") for p in layout.patterns.get(role, ())[1:]}
        )
        entries = missing_files(layout, [files[ids.index(t)] for t in lacking], self.cfg.eval.labels)  # type: ignore[arg-type]
        images = [e for e in entries if ", modality " in e]  # an image or DSM, not a label file
        labels = [e for e in entries if ", modality " not in e]
        what = [
            f"{len(images)} image file(s) (first: {images[0]}): every tile's images are in the archives' image folders"
        ] * bool(images)
        what += [
            f"{len(labels)} label file(s) (first: {labels[0]}): the official test tiles' labels come in the complete "
            f"ground truth ({', '.join(complete)})"
        ] * bool(labels)
        self.log(
            f"warning: data.split=official: {len(lacking)} of the {len(ids)} official test tiles lack files under {d.root} "
            f"(tiles {' '.join(lacking[:8])}{' ...' if len(lacking) > 8 else ''}); evaluation needs them: missing "
            + "; ".join(what)
            + " (`mmpeft-isprs help isprs layouts`)"
        )

    def tiles(self, split: str, labels: str = "full") -> TileSet:
        """The labelled tiles of ``split`` (the synthetic set is generated first if missing)."""
        return make_tileset(self.cfg.data, split, labels=labels, layout=self.layout)

    def train_loader(self, epoch: int, start: int = 0) -> DataLoader:
        """Batches ``start..`` of ``epoch`` (this rank's share), after :meth:`setup`."""
        if self.train_dataset is None:
            raise RuntimeError("ISPRSDataModule.train_loader: call setup() first")
        t, info = self.cfg.train, self.info
        sampler = EpochBatchSampler(epoch, start, t.batches_per_epoch, t.batch_size, info.rank, info.world_size)
        return DataLoader(
            self.train_dataset,
            batch_sampler=sampler,
            num_workers=t.num_workers,
            pin_memory=info.device.type == "cuda",
            worker_init_fn=worker_init,  # workers: 1 thread each
            generator=torch.Generator().manual_seed(t.seed),  # workers' seeds never draw from the global RNG
        )
