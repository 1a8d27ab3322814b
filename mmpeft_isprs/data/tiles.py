"""TileSet: the tiles of one split, validated, loaded (or referenced lazily), read by window.

A sample is a dict: one float32 ``(C, H, W)`` tensor per modality (``"optical"`` uint8/255,
``"dsm"`` scaled to [0, 1], ...), the mask ``(H, W)`` int64 with 255 = ignore under
``label_key`` (default ``"mask"``), and ``"name"`` (the tile id).

Labels: ``labels="full"`` for training (the authors trained on the full labels),
``"eroded"`` for scoring (the "noBoundary" files, black boundaries ignored; layouts without
eroded labels fall back to the full ones), ``"none"`` for unlabelled tiles.

Before anything trains, the set is validated and every problem is reported at once: missing
files (all named), image/DSM/label size mismatches (file and sizes), unknown label colours or
values, NaN/no-data in the DSM (filled with the tile minimum, or an error), truncated TIFFs.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .bands import check_bands, select_bands, to_chw
from .dsm import DsmNormalisation, normalise_dsm, valid_range
from .geo import with_file_nodata
from .io import TIFF_SUFFIXES, DataError, PathLike, TiffWindowReader, raster_info, read_image
from .layouts import Layout, ModalitySpec, TileFiles
from .nodata import band_fills, checks_nodata, fill_bands
from .palette import colour_to_index, normalise_index_labels

LabelKind = Literal["full", "eroded", "none"]


class _ReaderPool:
    """Open window readers of the lazy mode, per process (file handles are not shared).

    TIFFs get a :class:`TiffWindowReader` (only the needed tiles/strips are decoded); other
    formats are decoded whole once and kept while they are among the ``size`` most recent.
    """

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._pid = os.getpid()
        self._open: OrderedDict[Path, TiffWindowReader | np.ndarray] = OrderedDict()

    def read(self, path: Path, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        if self._pid != os.getpid():  # forked into a DataLoader worker: open our own
            self._pid, self._open = os.getpid(), OrderedDict()
        reader = self._open.pop(path, None)
        if reader is None:
            reader = TiffWindowReader(path) if path.suffix.lower() in TIFF_SUFFIXES else read_image(path)
        self._open[path] = reader
        while len(self._open) > self.size:
            old = self._open.popitem(last=False)[1]
            if isinstance(old, TiffWindowReader):
                old.close()
        if isinstance(reader, TiffWindowReader):
            return reader.read(y0, x0, h, w)
        if y0 + h > reader.shape[0] or x0 + w > reader.shape[1]:
            raise DataError(f"{path}: window ({y0}, {x0}, {h}, {w}) outside {reader.shape[:2]}")
        return np.array(reader[y0 : y0 + h, x0 : x0 + w])

    def __getstate__(self) -> dict[str, object]:
        return {"size": self.size}  # readers are reopened after unpickling

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(int(state["size"]))  # type: ignore[misc, arg-type]


@dataclass
class _Tile:
    files: TileFiles
    label_path: Path | None
    shape: tuple[int, int]
    dsm_range: dict[str, tuple[float, float]]
    arrays: dict[str, np.ndarray] | None = None  # cache: inputs (H, W[, C]) + mask (H, W) uint8
    fills: dict[str, np.ndarray | None] = field(default_factory=dict)  # image modalities: (C,) per-band fill values


class TileSet:
    """Tiles of one split of a data set.

    Args:
        layout: file patterns, splits, classes (e.g. ``VaihingenLayout()``).
        root: data folder.
        split: split name (``"train"``, ``"val"``, ``"test"``) or an explicit list of tile ids.
        labels: ``"full"``, ``"eroded"`` or ``"none"`` (see module doc).
        dsm: scaling of elevation modalities, one rule or one per modality name.
        cache: keep decoded tiles in memory (inputs in their file dtype, DSM scaled float32,
            mask uint8). ``False`` reads windows from the files on demand (for tiles larger than
            memory; efficient for tiled or uncompressed TIFFs).
        validate: decode every label and DSM up front and report all problems; with
            ``False`` only missing files and sizes are checked.
        label_key: key of the mask in samples.

    Raises:
        DataError: listing every problem found.
    """

    def __init__(
        self,
        layout: Layout,
        root: PathLike,
        split: str | Sequence[str] = "train",
        *,
        labels: LabelKind = "full",
        dsm: DsmNormalisation | Mapping[str, DsmNormalisation] | None = None,
        cache: bool = True,
        validate: bool = True,
        label_key: str = "mask",
    ) -> None:
        if labels not in ("full", "eroded", "none"):
            raise ValueError(f"TileSet: labels must be full, eroded or none, got {labels!r}")
        self.layout, self.root, self.labels, self.label_key = layout, Path(root), labels, label_key
        self.cache = cache
        self._readers = _ReaderPool(size=2 * (len(layout.modalities) + 1))
        ids = layout.split_ids(split, self.root) if isinstance(split, str) else [str(s) for s in split]
        if not ids:
            raise ValueError(f"TileSet: split {split!r} of {self.root} has no tiles")
        self.ids = ids
        self._dsm = dsm
        self.modalities: tuple[ModalitySpec, ...] = tuple(layout.modalities)
        files = [layout.tile_files(self.root, i) for i in ids]
        self._check_missing(files)
        self._tiles = self._inspect(files, validate)

    # ----------------------------------------------------------------- construction
    def _label_path(self, f: TileFiles) -> Path | None:
        if self.labels == "none":
            return None
        if self.labels == "eroded" and f.eval_labels is not None:
            return f.eval_labels
        return f.labels

    def _check_missing(self, files: list[TileFiles]) -> None:
        missing = missing_files(self.layout, files, self.labels)
        if missing:
            raise DataError(f"{len(missing)} missing file(s) under {self.root}:\n  " + "\n  ".join(missing))

    def dsm_rule(self, modality: str, path: Path | None = None) -> DsmNormalisation:
        """The scaling rule of an elevation modality (with ``path``'s declared no-data value
        when the rule sets none)."""
        rule = self._dsm.get(modality, DsmNormalisation()) if isinstance(self._dsm, Mapping) else self._dsm
        return with_file_nodata(rule or DsmNormalisation(), path) if path is not None else rule or DsmNormalisation()

    def _inspect(self, files: list[TileFiles], validate: bool) -> list[_Tile]:
        tiles, problems = [], []
        for f in files:
            try:
                tiles.append(self._inspect_tile(f, validate))
            except DataError as exc:
                problems.append(str(exc))
        if problems:
            raise DataError(f"{len(problems)} problem(s) in {self.root}:\n  " + "\n  ".join(problems))
        return tiles

    def _inspect_tile(self, f: TileFiles, validate: bool) -> _Tile:
        label = self._label_path(f)
        paths = [*f.inputs.values(), *([label] if label else [])]
        sizes = {p: raster_info(p) for p in paths}
        dims = {(s.height, s.width) for s in sizes.values()}
        if len(dims) > 1:
            listing = ", ".join(f"{p} {s.height}x{s.width}" for p, s in sizes.items())
            raise DataError(f"tile {f.tile_id}: sizes differ: {listing}")
        for m in self.modalities:
            check_bands(m, f.inputs[m.name], sizes[f.inputs[m.name]].channels)
        tile = _Tile(f, label, dims.pop(), {})
        if self.cache or validate:
            arrays = self._decode_tile(tile)
            tile.arrays = arrays if self.cache else None
        else:
            for m in self.modalities:
                path = f.inputs[m.name]
                if m.kind == "elevation":
                    raw = select_bands(m, read_image(path))
                    rule = self.dsm_rule(m.name, path)
                    tile.dsm_range[m.name] = valid_range(raw, rule, str(path), f.tile_id)
                elif checks_nodata(m, sizes[path].dtype):
                    tile.fills[m.name] = band_fills(select_bands(m, read_image(path)), m, path, f.tile_id)
        return tile

    def _decode_tile(self, tile: _Tile) -> dict[str, np.ndarray]:
        """Decode a whole tile (checks labels and DSM no-data); fills ``tile.dsm_range``."""
        out: dict[str, np.ndarray] = {}
        files: dict[Path, np.ndarray] = {}  # each file read once (modalities may share one: Potsdam's nir)
        for m in self.modalities:
            path = tile.files.inputs[m.name]
            if path not in files:
                files[path] = read_image(path)
            raw = select_bands(m, files[path])
            if m.kind == "elevation":
                rule = self.dsm_rule(m.name, path)
                tile.dsm_range[m.name] = valid_range(raw, rule, str(path), tile.files.tile_id)
                raw = normalise_dsm(raw, rule, tile.dsm_range[m.name])
            else:  # NaN / inf / no-data of an image modality: counted per band, filled or refused
                tile.fills[m.name] = band_fills(raw, m, path, tile.files.tile_id)
                raw = fill_bands(raw, m, path, tile.fills[m.name])
            out[m.name] = raw
        if tile.label_path is not None:
            out[self.label_key] = self._labels(read_image(tile.label_path), tile.label_path)
        return out

    def _labels(self, raw: np.ndarray, path: Path) -> np.ndarray:
        """Raw label pixels -> (H, W) uint8 mask (255 = ignore)."""
        info = self.layout.info
        if self.layout.label_format == "colour":
            if raw.ndim != 3 or raw.shape[-1] < 3:
                raise DataError(f"{path}: colour labels must have 3 bands, got shape {raw.shape}")
            try:
                mask = colour_to_index(raw[..., :3], info, str(path), self.layout.colour_tolerance)
            except ValueError as exc:
                raise DataError(str(exc)) from None
        else:
            try:
                mask = normalise_index_labels(raw, info, str(path))
            except ValueError as exc:
                raise DataError(str(exc)) from None
        return mask.astype(np.uint8)

    # ----------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self._tiles)

    @property
    def num_classes(self) -> int:
        """Number of classes of the layout."""
        return self.layout.info.num_classes

    @property
    def modality_names(self) -> tuple[str, ...]:
        """Names of the input modalities, in layout order."""
        return tuple(m.name for m in self.modalities)

    def shape(self, index: int) -> tuple[int, int]:
        """(H, W) of tile ``index``."""
        return self._tiles[index].shape

    def files(self, index: int) -> TileFiles:
        """Files of tile ``index`` (e.g. the optical GeoTIFF to copy georeferencing from)."""
        return self._tiles[index].files

    def read_window(self, index: int, y0: int, x0: int, h: int, w: int) -> dict[str, object]:
        """Window ``[y0:y0+h, x0:x0+w]`` of tile ``index``.

        Returns:
            ``{modality: (C, h, w) float32, label_key: (h, w) int64 (if labelled), "name": id}``.
        """
        tile = self._tiles[index]
        H, W = tile.shape
        if h <= 0 or w <= 0 or y0 < 0 or x0 < 0 or y0 + h > H or x0 + w > W:
            raise ValueError(f"tile {tile.files.tile_id}: window ({y0}, {x0}, {h}, {w}) outside {H}x{W}")
        arrays = tile.arrays if tile.arrays is not None else self._read_lazy(tile, y0, x0, h, w)
        if tile.arrays is not None:
            arrays = {k: v[y0 : y0 + h, x0 : x0 + w] for k, v in arrays.items()}
        return self._to_sample(arrays, tile.files.tile_id)

    def load(self, index: int) -> dict[str, object]:
        """Whole tile ``index`` as a sample (see :meth:`read_window`)."""
        H, W = self.shape(index)
        return self.read_window(index, 0, 0, H, W)

    def _read_lazy(self, tile: _Tile, y0: int, x0: int, h: int, w: int) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        files: dict[Path, np.ndarray] = {}  # each file's window read once
        for m in self.modalities:
            path = tile.files.inputs[m.name]
            if path not in files:
                files[path] = self._readers.read(path, y0, x0, h, w)
            raw = select_bands(m, files[path])
            if m.kind == "elevation":
                raw = normalise_dsm(raw, self.dsm_rule(m.name, path), tile.dsm_range[m.name])
            else:
                raw = fill_bands(raw, m, path, tile.fills.get(m.name))
            out[m.name] = raw
        if tile.label_path is not None:
            raw_labels = self._readers.read(tile.label_path, y0, x0, h, w)
            out[self.label_key] = self._labels(raw_labels, tile.label_path)
        return out

    def _to_sample(self, arrays: Mapping[str, np.ndarray], name: str) -> dict[str, object]:
        sample: dict[str, object] = {}
        for m in self.modalities:
            sample[m.name] = to_chw(arrays[m.name], m)
        if self.label_key in arrays:
            sample[self.label_key] = torch.from_numpy(arrays[self.label_key].astype(np.int64))
        sample["name"] = name
        return sample

    def window_reader(self, index: int) -> TileWindowReader:
        """A reader of tile ``index``'s inputs for ``sliding_window_predict``."""
        return TileWindowReader(self, index)


def missing_files(layout: Layout, files: Sequence[TileFiles], labels: LabelKind = "full") -> list[str]:
    """Every missing input or label file of ``files``, each with its tile, what it is and its
    folder; a label file with alternatives (the participants' folder, else the complete ground
    truth) names the other folders looked in."""
    out = []
    for f in files:
        eroded = labels == "eroded" and f.eval_labels is not None
        label = None if labels == "none" else (f.eval_labels if eroded else f.labels)
        role = "eval_labels" if eroded else "labels"
        paths = [(p, f"modality {m}") for m, p in f.inputs.items()] + ([(label, role)] if label is not None else [])
        for path, what in paths:
            if path.is_file():
                continue
            others = sorted({str(Path(p).parent) for p in layout.patterns.get(role, ())[1:]}) if what == role else []
            also = f"; also looked in {', '.join(others)}" if others else ""
            out.append(f"{path} (tile {f.tile_id}, {what}, folder {path.parent}{also})")
    return out


class TileWindowReader:
    """Windows of one tile's inputs, for memory-bounded sliding-window inference.

    ``size`` is (H, W); ``read(y0, x0, h, w)`` returns ``{modality: (C, h, w) float32}``.
    """

    def __init__(self, tileset: TileSet, index: int) -> None:
        self.tileset, self.index = tileset, index
        self.size: tuple[int, int] = tileset.shape(index)

    def read(self, y0: int, x0: int, h: int, w: int) -> dict[str, torch.Tensor]:
        sample = self.tileset.read_window(self.index, y0, x0, h, w)
        return {k: sample[k] for k in self.tileset.modality_names}  # type: ignore[misc]


__all__ = ["TileSet", "TileWindowReader", "LabelKind", "missing_files"]
