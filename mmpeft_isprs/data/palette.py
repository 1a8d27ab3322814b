"""Class names, colour palettes and label conversion, held as data.

A :class:`DatasetInfo` describes one labelling scheme: its class names, one RGB colour per
class, the classes averaged by mF1/mIoU, and which label values (colours or raw indices) mean
"ignore". Masks everywhere in this package are ``int64`` class indices with
:data:`IGNORE_INDEX` (255) for ignored pixels.

``colour_to_index`` refuses unknown colours instead of mapping them silently to class 0 (which
the authors' code did): the error names the colour, how many pixels carry it, the first pixel
(row, col) and the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

IGNORE_INDEX: int = 255
"""Label value of pixels that count neither in the loss nor in the metrics."""

RGB = tuple[int, int, int]

_UNKNOWN = 254  # internal LUT marker; never a valid class index (at most 254 classes)


@dataclass(frozen=True)
class DatasetInfo:
    """Labelling scheme of a data set.

    Attributes:
        name: short name, e.g. ``"isprs"``.
        class_names: one name per class index ``0..K-1`` (the paper's order).
        palette: one RGB colour per class, used to read colour labels and to draw predictions.
        eval_classes: class indices averaged by mF1 and mIoU (OA always uses every class).
        ignore_colours: colours in colour-label files that mean "ignore" (e.g. black boundaries).
        ignore_values: raw values in index-label files that mean "ignore" (e.g. ``-1``).
        ignore_colour: colour used to draw ignored pixels.
    """

    name: str
    class_names: tuple[str, ...]
    palette: tuple[RGB, ...]
    eval_classes: tuple[int, ...]
    ignore_colours: tuple[RGB, ...] = ()
    ignore_values: tuple[int, ...] = ()
    ignore_colour: RGB = (0, 0, 0)

    def __post_init__(self) -> None:
        k = len(self.class_names)
        if not 0 < k < _UNKNOWN:
            raise ValueError(f"{self.name}: need 1..{_UNKNOWN - 1} classes, got {k}")
        if len(self.palette) != k:
            raise ValueError(f"{self.name}: {k} class names but {len(self.palette)} colours")
        for colour in (*self.palette, *self.ignore_colours, self.ignore_colour):
            if len(colour) != 3 or not all(0 <= int(c) <= 255 for c in colour):
                raise ValueError(f"{self.name}: invalid RGB colour {colour}")
        if len(set(self.palette)) != k:
            raise ValueError(f"{self.name}: palette colours must be distinct")
        clash = set(self.palette) & set(self.ignore_colours)
        if clash:
            raise ValueError(f"{self.name}: colours {sorted(clash)} are both a class and ignored")
        bad = [c for c in self.eval_classes if not 0 <= c < k]
        if bad or not self.eval_classes:
            raise ValueError(f"{self.name}: eval_classes {self.eval_classes} not within 0..{k - 1}")

    @property
    def num_classes(self) -> int:
        """Number of classes K."""
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (lists instead of tuples)."""
        return {
            "name": self.name,
            "class_names": list(self.class_names),
            "palette": [list(c) for c in self.palette],
            "eval_classes": list(self.eval_classes),
            "ignore_colours": [list(c) for c in self.ignore_colours],
            "ignore_values": list(self.ignore_values),
            "ignore_colour": list(self.ignore_colour),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetInfo:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"DatasetInfo: unknown keys {sorted(unknown)}")
        return cls(
            name=str(d["name"]),
            class_names=tuple(d["class_names"]),
            palette=tuple(_rgb(c) for c in d["palette"]),
            eval_classes=tuple(int(c) for c in d["eval_classes"]),
            ignore_colours=tuple(_rgb(c) for c in d.get("ignore_colours", ())),
            ignore_values=tuple(int(v) for v in d.get("ignore_values", ())),
            ignore_colour=_rgb(d.get("ignore_colour", (0, 0, 0))),
        )


def _rgb(c: Any) -> RGB:
    r, g, b = (int(x) for x in c)
    return (r, g, b)


ISPRS = DatasetInfo(
    name="isprs",
    class_names=("impervious surfaces", "building", "low vegetation", "tree", "car", "clutter"),
    palette=((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0)),
    eval_classes=(0, 1, 2, 3, 4),  # clutter is left out of mF1/mIoU (as the paper)
    ignore_colours=((0, 0, 0),),  # boundaries in the eroded ("noBoundary") labels
)
"""ISPRS Vaihingen / Potsdam: 6 classes, black = boundary (ignored), mean over the first 5."""

MMHUNAN = DatasetInfo(
    name="mmhunan",
    class_names=(
        "cropland",
        "forest",
        "grassland",
        "wetland",
        "water",
        "unused land",
        "built-up area",
    ),
    palette=(
        (255, 211, 127),
        (38, 115, 0),
        (163, 255, 115),
        (0, 197, 255),
        (0, 77, 168),
        (178, 178, 178),
        (230, 0, 0),
    ),
    eval_classes=(0, 1, 2, 3, 4, 5, 6),
    ignore_values=(-1,),
)
"""MMHunan: 7 classes stored as index labels, ``-1`` = ignore, all 7 averaged."""


def _keys(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> (...) int32 key ``r << 16 | g << 8 | b``."""
    rgb = rgb.astype(np.int32, copy=False)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


@lru_cache(maxsize=8)
def _lut(info: DatasetInfo, tolerance: int) -> np.ndarray:
    """(2**24,) uint8 table: colour key -> class index, IGNORE_INDEX or _UNKNOWN."""
    lut = np.full(1 << 24, _UNKNOWN, dtype=np.uint8)
    entries = [(c, i) for i, c in enumerate(info.palette)]
    entries += [(c, IGNORE_INDEX) for c in info.ignore_colours]
    if tolerance > 0:
        _fill_tolerance(lut, entries, tolerance)
    for colour, value in entries:  # exact colours always win
        lut[_keys(np.asarray(colour, dtype=np.uint8))] = value
    return lut


def _fill_tolerance(lut: np.ndarray, entries: list[tuple[RGB, int]], tol: int) -> None:
    """Map every colour within ``tol`` (per channel) of a known colour to the nearest one."""
    best = np.full(1 << 24, np.iinfo(np.int32).max, dtype=np.int32)
    offsets = np.arange(-tol, tol + 1)
    for colour, value in entries:
        chans = [np.clip(c + offsets, 0, 255) for c in colour]
        r, g, b = np.meshgrid(*chans, indexing="ij")  # (n, n, n) each
        keys = ((r << 16) | (g << 8) | b).ravel()
        dist = ((r - colour[0]) ** 2 + (g - colour[1]) ** 2 + (b - colour[2]) ** 2).ravel()
        closer = dist < best[keys]
        best[keys[closer]] = dist[closer]
        lut[keys[closer]] = value


def colour_to_index(rgb: np.ndarray, info: DatasetInfo, source: str | None = None, tolerance: int = 0) -> np.ndarray:
    """Convert a colour label image to class indices.

    Args:
        rgb: (H, W, 3) uint8 colour labels.
        info: the labelling scheme (palette and ignore colours).
        source: file name used in error messages.
        tolerance: accept colours within this per-channel distance of a known colour (snapped
            to the nearest); 0 = exact colours only.

    Returns:
        (H, W) int64 class indices, :data:`IGNORE_INDEX` where the colour means "ignore".

    Raises:
        ValueError: a colour is neither a class nor ignored; the message gives the colour, its
            pixel count, the first pixel (row, col) and ``source``.
    """
    if rgb.ndim != 3 or rgb.shape[-1] < 3:
        raise ValueError(f"{source or 'labels'}: colour labels must be (H, W, 3), got {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"{source or 'labels'}: colour labels must be uint8, got {rgb.dtype}")
    keys = _keys(rgb[..., :3])
    out = _lut(info, int(tolerance))[keys]
    unknown = out == _UNKNOWN
    if unknown.any():
        raise ValueError(_unknown_colours_message(keys, unknown, info, source))
    return out.astype(np.int64)


def _unknown_colours_message(keys: np.ndarray, unknown: np.ndarray, info: DatasetInfo, source: str | None) -> str:
    bad_keys, first, counts = np.unique(keys[unknown], return_index=True, return_counts=True)
    flat_pos = np.flatnonzero(unknown)[first]
    order = np.argsort(-counts)[:5]
    parts = []
    for j in order:
        key = int(bad_keys[j])
        colour = (key >> 16, (key >> 8) & 255, key & 255)
        row, col = divmod(int(flat_pos[j]), keys.shape[1])
        parts.append(f"colour {colour}: {int(counts[j])} pixels, first at (row {row}, col {col})")
    more = f" (and {len(bad_keys) - len(order)} more colours)" if len(bad_keys) > len(order) else ""
    return (
        f"{source or 'labels'}: unknown label colour(s) for {info.name}: "
        + "; ".join(parts)
        + more
        + f". Known colours: {list(info.palette)}, ignored: {list(info.ignore_colours)}"
    )


def index_to_colour(mask: np.ndarray, info: DatasetInfo) -> np.ndarray:
    """Draw class indices with the palette.

    Args:
        mask: (H, W) integer class indices; :data:`IGNORE_INDEX` is drawn with
            ``info.ignore_colour``.

    Returns:
        (H, W, 3) uint8 colour image.

    Raises:
        ValueError: a value is neither a class index nor :data:`IGNORE_INDEX`.
    """
    mask = np.asarray(mask)
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: info.num_classes] = np.asarray(info.palette, dtype=np.uint8)
    table[IGNORE_INDEX] = info.ignore_colour
    valid = (mask >= 0) & ((mask < info.num_classes) | (mask == IGNORE_INDEX))
    if not valid.all():
        bad = np.unique(mask[~valid])[:10].tolist()
        raise ValueError(f"index_to_colour: values {bad} are not classes of {info.name}")
    return table[mask.astype(np.intp)]


def normalise_index_labels(labels: np.ndarray, info: DatasetInfo, source: str | None = None) -> np.ndarray:
    """Turn raw index labels into a mask: ``info.ignore_values`` -> :data:`IGNORE_INDEX`.

    Args:
        labels: (H, W) integer labels (a trailing channel axis of size 1 is dropped).

    Returns:
        (H, W) int64 mask with values in ``0..K-1`` or :data:`IGNORE_INDEX`.

    Raises:
        ValueError: a value is neither a class, an ignore value, nor IGNORE_INDEX; the message
            gives the value, its pixel count, the first pixel and ``source``.
    """
    if labels.ndim == 3 and labels.shape[-1] == 1:
        labels = labels[..., 0]
    if labels.ndim != 2:
        raise ValueError(f"{source or 'labels'}: index labels must be (H, W), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{source or 'labels'}: index labels must be integers, got {labels.dtype}")
    out = labels.astype(np.int64)
    ignore = np.isin(out, np.asarray(info.ignore_values + (IGNORE_INDEX,), dtype=np.int64))
    bad = ~ignore & ((out < 0) | (out >= info.num_classes))
    if bad.any():
        values, first, counts = np.unique(out[bad], return_index=True, return_counts=True)
        row, col = divmod(int(np.flatnonzero(bad)[first[0]]), out.shape[1])
        raise ValueError(
            f"{source or 'labels'}: unknown label value {int(values[0])} ({int(counts[0])} "
            f"pixels, first at (row {row}, col {col})); all unknown values: "
            f"{values[:10].tolist()}; {info.name} has classes 0..{info.num_classes - 1} "
            f"and ignore values {list(info.ignore_values)}"
        )
    out[ignore] = IGNORE_INDEX
    return out


__all__ = [
    "IGNORE_INDEX",
    "DatasetInfo",
    "ISPRS",
    "MMHUNAN",
    "colour_to_index",
    "index_to_colour",
    "normalise_index_labels",
]
