"""File name patterns of a layout, and tile ids compared without zero padding.

A pattern is a path relative to the data root with ``{id}`` (the tile id as the split writes
it, e.g. ``2_10``) and ``{id0}`` (every number of the id zero-padded to two digits, ``02_10``,
as Potsdam's nDSM file names have it). A role (a modality, ``labels``, ``eval_labels``) may have
several patterns: the first one whose file exists wins (e.g. the participants' label folder or
the complete ground truth). When no pattern names an existing file, the folder is searched for
a file matching the pattern with the tile id written with or without zero padding, so
``dsm_potsdam_02_10_...`` and ``dsm_potsdam_2_10_...`` both belong to tile ``2_10``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["tile_key", "pad_id", "fill_pattern", "resolve_file", "as_patterns", "tile_key_of_name", "merge_patterns"]

_ID = re.compile(r"^\d+(?:_\d+)*$")
_NUMBERS = r"(\d+(?:_\d+)*)"


def tile_key(tile_id: str) -> str:
    """A tile id without zero padding: ``"02_10"`` -> ``"2_10"``, ``"05"`` -> ``"5"``; others unchanged."""
    tile_id = str(tile_id)
    if not _ID.match(tile_id):
        return tile_id
    return "_".join(str(int(n)) for n in tile_id.split("_"))


def pad_id(tile_id: str, width: int = 2) -> str:
    """Every number of a numeric tile id zero-padded: ``"2_10"`` -> ``"02_10"``."""
    tile_id = str(tile_id)
    if not _ID.match(tile_id):
        return tile_id
    return "_".join(n.zfill(width) for n in tile_id.split("_"))


def tile_key_of_name(stem: str) -> str:
    """The tile id in a file name, unpadded: the last number group (``area05`` -> ``5``,
    ``dsm_potsdam_02_10_normalized_lastools`` -> ``2_10``)."""
    groups = re.findall(r"\d+(?:_\d+)*", stem)
    return tile_key(groups[-1]) if groups else stem


def fill_pattern(pattern: str, tile_id: str) -> str:
    """The pattern with ``{id}`` and ``{id0}`` replaced."""
    return pattern.replace("{id0}", pad_id(tile_id)).replace("{id}", str(tile_id))


def as_patterns(value: str | Sequence[str]) -> tuple[str, ...]:
    """One pattern or several, as a tuple (each must contain ``{id}`` or ``{id0}``)."""
    patterns = (value,) if isinstance(value, str) else tuple(value)
    bad = [p for p in patterns if "{id}" not in p and "{id0}" not in p]
    if not patterns or bad:
        raise ValueError(f"file pattern(s) {bad or list(patterns)} must contain {{id}} or {{id0}}")
    return patterns


def _regex(name_pattern: str) -> re.Pattern[str]:
    parts = re.split(r"\{id0?\}", name_pattern)
    return re.compile("^" + _NUMBERS.join(re.escape(p) for p in parts) + "$")


def _search(folder: Path, name_pattern: str, tile_id: str) -> Path | None:
    """The file of ``folder`` whose name matches the pattern with the id padded or not."""
    if not folder.is_dir():
        return None
    rx, key = _regex(name_pattern), tile_key(tile_id)
    for path in sorted(folder.iterdir()):
        m = rx.match(path.name)
        if m and all(tile_key(g) == key for g in m.groups()) and path.is_file():
            return path
    return None


def resolve_file(root: Path, patterns: Sequence[str], tile_id: str) -> Path:
    """The file of ``tile_id`` for a role: the first pattern that exists, else the first
    file found with the id zero-padded or not, else the first pattern's path (missing)."""
    for pattern in patterns:
        candidate = root / fill_pattern(pattern, tile_id)
        if candidate.is_file():
            return candidate
    if _ID.match(str(tile_id)):
        for pattern in patterns:
            folder, _, name = pattern.rpartition("/")
            found = _search(root / fill_pattern(folder, tile_id), name, tile_id)
            if found is not None:
                return found
    return root / fill_pattern(patterns[0], tile_id)


_ROLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def merge_patterns(
    defaults: Mapping[str, tuple[str, ...]], overrides: Mapping[str, str | Sequence[str]] | None
) -> dict[str, tuple[str, ...]]:
    """The default patterns of a layout with the user's ones (``data.files``) in their place; a
    role the layout lacks is added (a raster of its own beside the archive, e.g. ``sar``)."""
    out = dict(defaults)
    for role, value in (overrides or {}).items():
        if not _ROLE.match(str(role)):
            raise ValueError(f"data.files.{role}: a role is a name of letters, digits and _ (e.g. sar, ms)")
        try:
            out[role] = as_patterns(value)
        except ValueError as exc:
            raise ValueError(f"data.files.{role}: {exc}") from None
    return out
