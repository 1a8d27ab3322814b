"""Reading and writing raster files: TIFF/GeoTIFF (tifffile), PNG/JPEG (Pillow).

Arrays are returned channel-last: ``(H, W)`` for one band, ``(H, W, C)`` for several, in the
file's dtype. Every failure is a :class:`DataError` naming the file and the problem.

Windowed reads (:func:`read_window`, :class:`TiffWindowReader`) never decode the whole file
when the TIFF is tiled, split into strips, or stored uncompressed in one block (memory-mapped):
only the tiles/strips that intersect the window are read and decoded. This is what lets the
sliding-window evaluation run on GeoTIFFs larger than memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

IMAGE_SUFFIXES: tuple[str, ...] = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
"""File suffixes read as images (TIFF/GeoTIFF, PNG, JPEG)."""

PathLike = str | os.PathLike[str]

TIFF_SUFFIXES = (".tif", ".tiff")

GEO_TAGS: tuple[int, ...] = (33550, 33922, 34264, 34735, 34736, 34737)
"""ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory, GeoDoubleParams,
GeoAsciiParams: the tags that carry a GeoTIFF's georeferencing."""


_PIL_MODES: dict[str, tuple[int, str]] = {
    "L": (1, "uint8"),
    "P": (1, "uint8"),
    "RGB": (3, "uint8"),
    "RGBA": (4, "uint8"),
    "LA": (2, "uint8"),
    "I;16": (1, "uint16"),
    "I": (1, "int32"),
    "F": (1, "float32"),
}


class DataError(ValueError):
    """A data file is missing, unreadable, truncated or inconsistent (message names it)."""


@dataclass(frozen=True)
class RasterInfo:
    """Header of a raster: size, band count and dtype, read without decoding pixels."""

    height: int
    width: int
    channels: int
    dtype: np.dtype


def _is_tiff(path: Path) -> bool:
    return path.suffix.lower() in TIFF_SUFFIXES


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: file not found")


def _open_tiff(path: Path) -> tifffile.TiffFile:
    """Open a TIFF and check that page 0's data lies inside the file (not truncated)."""
    _check_exists(path)
    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:  # tifffile raises several types for corrupt headers
        raise DataError(f"{path}: not a readable TIFF (corrupt or truncated): {exc}") from exc
    try:
        page = tif.pages.first
        size = path.stat().st_size
        ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts) if c]
        if ends and max(ends) > size:
            raise DataError(f"{path}: truncated TIFF: image data needs {max(ends)} bytes, the file has {size}")
    except DataError:
        tif.close()
        raise
    except Exception as exc:
        tif.close()
        raise DataError(f"{path}: not a readable TIFF (corrupt or truncated): {exc}") from exc
    return tif


def _channel_last(arr: np.ndarray, page: Any) -> np.ndarray:
    """tifffile gives (S, H, W) for planar-separate pages; return (H, W, S)."""
    if page.planarconfig == 2 and page.samplesperpixel > 1 and arr.ndim == 3:
        return np.moveaxis(arr, 0, -1)
    return arr


def raster_info(path: PathLike) -> RasterInfo:
    """Size, bands and dtype of an image file, without decoding its pixels."""
    path = Path(path)
    if _is_tiff(path):
        with _open_tiff(path) as tif:
            page = tif.pages.first
            return RasterInfo(
                int(page.imagelength),
                int(page.imagewidth),
                int(page.samplesperpixel),
                np.dtype(page.dtype),
            )
    _check_exists(path)
    try:
        with Image.open(path) as im:
            if im.mode in _PIL_MODES:
                channels, dtype = _PIL_MODES[im.mode]
                return RasterInfo(im.height, im.width, channels, np.dtype(dtype))
            probe = np.asarray(im)  # unusual mode: decode to learn the layout
            channels = probe.shape[2] if probe.ndim == 3 else 1
            return RasterInfo(im.height, im.width, channels, probe.dtype)
    except Exception as exc:
        raise DataError(f"{path}: not a readable image: {exc}") from exc


def read_image(path: PathLike, pil_mode: str | None = None) -> np.ndarray:
    """Read a whole image.

    Args:
        path: ``.tif``/``.tiff`` (tifffile, first page) or ``.png``/``.jpg``/``.jpeg``.
        pil_mode: for Pillow formats, convert to this mode first (e.g. ``"RGB"`` for colour
            labels stored as palette PNGs).

    Returns:
        (H, W) or (H, W, C) array in the file's dtype.

    Raises:
        DataError: missing, truncated, corrupt or unsupported file (named in the message).
    """
    path = Path(path)
    if _is_tiff(path):
        with _open_tiff(path) as tif:
            page = tif.pages.first
            try:
                return _channel_last(page.asarray(), page)
            except Exception as exc:
                raise DataError(f"{path}: cannot decode TIFF data (truncated?): {exc}") from exc
    _check_exists(path)
    try:
        with Image.open(path) as im:
            if pil_mode is not None and im.mode != pil_mode:
                im = im.convert(pil_mode)
            return np.asarray(im).copy()
    except Exception as exc:
        raise DataError(f"{path}: not a readable image (truncated or corrupt?): {exc}") from exc


class TiffWindowReader:
    """Reads rectangular windows of a TIFF's first page, decoding only what is needed.

    Uncompressed single-block pages are memory-mapped; tiled or striped pages are read
    segment by segment (only the tiles/strips that intersect the window). Use as a context
    manager or call :meth:`close`.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self._tif = _open_tiff(self.path)
        page = self._tif.pages.first
        self._page = page
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        self.channels = int(page.samplesperpixel)
        self.dtype = np.dtype(page.dtype)
        self._memmap: np.ndarray | None = None
        if page.is_memmappable and not page.is_tiled:
            self._memmap = _channel_last(tifffile.memmap(self.path, page=0, mode="r"), page)

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the image."""
        return (self.height, self.width)

    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Pixels ``[y0:y0+h, x0:x0+w]`` as (h, w) or (h, w, C), the file's dtype."""
        _check_window(self.path, (self.height, self.width), y0, x0, h, w)
        if self._memmap is not None:
            return np.array(self._memmap[y0 : y0 + h, x0 : x0 + w])
        try:
            return self._read_segments(y0, x0, h, w)
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{self.path}: cannot decode TIFF window (truncated?): {exc}") from exc

    def _segment_grid(self) -> tuple[int, int, int, int]:
        """(segment height, segment width, segments down, segments across) of one plane."""
        page = self._page
        if page.is_tiled:
            th, tw = int(page.tilelength), int(page.tilewidth)
        else:
            th, tw = int(page.rowsperstrip or self.height), self.width
            th = min(th, self.height)
        return th, tw, -(-self.height // th), -(-self.width // tw)

    def _read_segments(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        page, fh = self._page, self._tif.filehandle
        th, tw, ny, nx = self._segment_grid()
        separate = page.planarconfig == 2 and self.channels > 1
        planes = self.channels if separate else 1
        out = np.zeros((h, w, self.channels), dtype=self.dtype)
        decode = page.decode
        for s in range(planes):
            for ty in range(y0 // th, (y0 + h - 1) // th + 1):
                for tx in range(x0 // tw, (x0 + w - 1) // tw + 1):
                    index = (s * ny + ty) * nx + tx
                    count = page.databytecounts[index]
                    if count == 0:
                        continue  # empty segment: zeros
                    fh.seek(page.dataoffsets[index])
                    seg, _, _ = decode(fh.read(count), index, jpegtables=page.jpegtables)
                    seg = seg[0]  # (seg_h, seg_w, contig samples)
                    _paste(out, seg, ty * th, tx * tw, y0, x0, s if separate else None)
        return out[..., 0] if self.channels == 1 else out

    def close(self) -> None:
        """Release the file handle and memory map."""
        self._memmap = None
        self._tif.close()

    def __enter__(self) -> TiffWindowReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _paste(out: np.ndarray, seg: np.ndarray, sy: int, sx: int, y0: int, x0: int, plane: int | None) -> None:
    """Copy the part of a decoded segment at (sy, sx) that falls in the window at (y0, x0)."""
    h, w = out.shape[:2]
    ya, yb = max(sy, y0), min(sy + seg.shape[0], y0 + h)
    xa, xb = max(sx, x0), min(sx + seg.shape[1], x0 + w)
    if ya >= yb or xa >= xb:
        return
    piece = seg[ya - sy : yb - sy, xa - sx : xb - sx]
    if plane is None:
        out[ya - y0 : yb - y0, xa - x0 : xb - x0] = piece
    else:
        out[ya - y0 : yb - y0, xa - x0 : xb - x0, plane] = piece[..., 0]


def _check_window(path: Path, shape: tuple[int, int], y0: int, x0: int, h: int, w: int) -> None:
    if h <= 0 or w <= 0 or y0 < 0 or x0 < 0 or y0 + h > shape[0] or x0 + w > shape[1]:
        raise DataError(
            f"{path}: window (y0={y0}, x0={x0}, h={h}, w={w}) outside the image of size {shape[0]}x{shape[1]}"
        )


def read_window(path: PathLike, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Read pixels ``[y0:y0+h, x0:x0+w]`` of an image.

    TIFFs are read without decoding the whole file when they are tiled, striped or
    memory-mappable (see :class:`TiffWindowReader`; keep one open for many windows).
    Pillow formats are decoded whole and cropped.

    Returns:
        (h, w) or (h, w, C) array in the file's dtype.
    """
    path = Path(path)
    if _is_tiff(path):
        with TiffWindowReader(path) as reader:
            return reader.read(y0, x0, h, w)
    full = read_image(path)
    _check_window(path, full.shape[:2], y0, x0, h, w)
    return np.array(full[y0 : y0 + h, x0 : x0 + w])


def read_geotags(path: PathLike) -> list[tuple[int, int, int, Any]]:
    """Georeferencing tags of a GeoTIFF as tifffile ``extratags`` entries.

    Returns:
        ``[(code, dtype, count, value), ...]`` for the tags of :data:`GEO_TAGS` present in
        page 0 (empty for a TIFF without georeferencing).
    """
    with _open_tiff(Path(path)) as tif:
        tags = tif.pages.first.tags
        found = []
        for code in GEO_TAGS:
            tag = tags.get(code)
            if tag is not None:
                found.append((code, int(tag.dtype), int(tag.count), tag.value))
        return found


def write_tiff(
    path: PathLike,
    array: np.ndarray,
    *,
    georef_from: PathLike | None = None,
    geotags: Sequence[tuple[int, int, int, Any]] | None = None,
    tile: tuple[int, int] | None = None,
    compression: str | None = None,
) -> Path:
    """Write a (Geo)TIFF.

    Args:
        path: output file (parent folders are created).
        array: (H, W) or (H, W, C) array; 3-band uint8 is written as RGB.
        georef_from: copy the georeferencing tags (:data:`GEO_TAGS`) of this GeoTIFF, so the
            output lies on the same grid (the array must have that file's size).
        geotags: explicit tags as returned by :func:`read_geotags` (instead of georef_from).
        tile: write tiled, e.g. ``(256, 256)`` (tile sizes must be multiples of 16).
        compression: e.g. ``"zlib"``; ``None`` writes uncompressed (memory-mappable).

    Returns:
        The written path.
    """
    path = Path(path)
    if georef_from is not None and geotags is not None:
        raise ValueError("write_tiff: give georef_from or geotags, not both")
    if georef_from is not None:
        src = raster_info(georef_from)
        if (src.height, src.width) != tuple(array.shape[:2]):
            raise DataError(
                f"{path}: array size {array.shape[0]}x{array.shape[1]} differs from the "
                f"georeference source {georef_from} ({src.height}x{src.width})"
            )
        geotags = read_geotags(georef_from)
    extratags = [_extratag(*t) for t in geotags or ()]
    path.parent.mkdir(parents=True, exist_ok=True)
    photometric = "rgb" if array.ndim == 3 and array.shape[2] == 3 else "minisblack"
    planar = "contig" if array.ndim == 3 else None
    tifffile.imwrite(
        path,
        array,
        photometric=photometric,
        planarconfig=planar,
        tile=tile,
        compression=compression,
        extratags=extratags,
        metadata=None,
    )
    return path


def _extratag(code: int, dtype: int, count: int, value: Any) -> tuple[Any, ...]:
    if dtype == 2:  # ASCII: let tifffile count the terminating NUL
        return (code, "s", 0, value, True)
    if not isinstance(value, (tuple, list)):
        value = (value,)
    return (code, dtype, len(value), tuple(value), True)


__all__ = [
    "IMAGE_SUFFIXES",
    "DataError",
    "RasterInfo",
    "GEO_TAGS",
    "TiffWindowReader",
    "raster_info",
    "read_image",
    "read_window",
    "read_geotags",
    "write_tiff",
]
