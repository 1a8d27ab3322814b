"""Checks across the ``data`` and ``model`` sections made when the config is read, before anything
is built: file patterns of new roles (``data.files``) and stems against the bands they receive."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from ..model import MFNetConfig
from .data import BUILTIN_ROLES, DataConfig, new_roles, provided_modalities
from .schema import ConfigError

__all__ = ["check_files", "check_fills", "check_stems", "kept_bands", "stem_error"]

ENCODER_CHANNELS = 3
"""The band count every MFNet encoder's patch embedding takes (RGB), TerraTorch's aside: theirs are
the bands the model is built for, known once it is built (the wrap checks the stems then)."""


def check_files(d: DataConfig, m: MFNetConfig) -> None:
    """Each ``data.files`` pattern holds ``{id}``; each new role is read by a modality of the model
    (its own, or a ``data.modalities`` entry's source): a role nothing reads is a typo, named."""
    for role, value in d.files.items():
        patterns = [value] if isinstance(value, str) else list(value)
        if not patterns or not all(isinstance(p, str) and ("{id}" in p or "{id0}" in p) for p in patterns):
            raise ConfigError(
                f"data.files.{role}: file pattern(s) {patterns} must contain {{id}} (the tile id) or {{id0}} "
                "(its numbers zero-padded), e.g. sar/sar_area{id}.tif"
            )
    sourced = {e.source or name for name, e in d.modalities.items()}
    for role in new_roles(d):
        if role in sourced or role in m.modalities:
            continue
        known = [*BUILTIN_ROLES, *provided_modalities(d)]
        close = difflib.get_close_matches(role, [k for k in known if k != role], n=1, cutoff=0.5)
        raise ConfigError(
            f"data.files.{role}: no modality reads the role {role!r} (model.modalities: {list(m.modalities)}): add "
            f"{role} to model.modalities (a modality of its own) or read it with data.modalities.<name>.source={role}"
            + (f"; did you mean {close[0]}?" if close else "")
        )


def check_fills(d: DataConfig) -> None:
    """``nodata`` / ``fill`` of ``data.modalities`` are an image modality's: an elevation modality
    follows ``data.dsm_nodata`` / ``data.dsm_fill`` (set there, not silently ignored here)."""
    for name, e in d.modalities.items():
        bands, why = kept_bands(d, name)
        elevation = bands == 1 and why.startswith("an elevation")
        for key, value, dsm_key in (("fill", e.fill, "dsm_fill"), ("nodata", e.nodata, "dsm_nodata")):
            if elevation and value is not None:
                raise ConfigError(
                    f"data.modalities.{name}.{key}: {name} is an elevation modality, whose missing pixels follow "
                    f"data.{dsm_key} (every elevation modality); set that instead"
                )


def kept_bands(d: DataConfig, name: str) -> tuple[int | None, str]:
    """The band count modality ``name`` keeps when the config says it (None: known only from its
    files), and what says so."""
    entry = d.modalities.get(name)
    if entry is not None and entry.bands is not None:
        return len(entry.bands), f"data.modalities.{name}.bands"
    source = (entry.source if entry is not None else None) or name
    kind = entry.kind if entry is not None else None
    if d.dataset == "generic":
        kind = kind or d.generic.modalities.get(source)
    elif kind is None and source == "dsm":
        kind = "elevation"
    if kind == "elevation":
        return 1, "an elevation modality keeps one band"
    if d.dataset == "potsdam" and source == "optical":
        return 3, f"data.potsdam_bands={d.potsdam_bands}"
    return None, ""


def _stem(value: Any) -> tuple[str, Any]:
    """(kind, declared bands) of a ``model.stems`` entry in any of its forms."""
    if isinstance(value, str):
        return value, None
    if isinstance(value, Mapping):
        return str(value.get("kind", "auto")), value.get("in_channels")
    if isinstance(value, (list, tuple)) and value:
        return str(value[0]), value[1] if len(value) > 1 else None
    return "auto", None


def _stem_problem(kind: str, declared: Any, bands: int) -> str | None:
    """Why a stem cannot take ``bands`` bands (None: it can)."""
    c = ENCODER_CHANNELS
    if kind in ("conv1x1", "adapt"):
        return None if declared == bands else f"the stem [{kind}, {declared}] declares {declared} band(s)"
    if kind == "identity":
        return None if bands == c else f"an 'identity' stem passes {c} bands only"
    if kind == "repeat":
        return None if c % bands == 0 else f"a 'repeat' stem repeats a band count dividing {c} (1 or 3)"
    if bands == c or c % bands == 0:
        return None
    return f"no stem fits: the encoder takes {c} bands and the default stem repeats 1 or {c}"


def stem_error(m: MFNetConfig, name: str, bands: int, where: str) -> str | None:
    """Why the stem of modality ``name`` cannot take ``bands`` bands (``where`` says what fixes the
    count), naming ``model.stems`` and the stems that fit; None when it can."""
    kind, declared = _stem(m.stems.get(name, "auto"))
    if m.backbone_kind.kind == "geo":  # a TerraTorch encoder's channels are its bands (6 HLS for Prithvi)
        return None
    problem = _stem_problem(kind, declared, bands)
    if problem is None:
        return None
    return (
        f"model.stems.{name}: {problem}; modality {name!r} keeps {bands} band(s) ({where}): set "
        f"model.stems.{name}=[adapt, {bands}] (the frozen RGB patch embedding adapted to {bands} bands, as timm "
        f"adapts in_chans; nothing trains) or model.stems.{name}=[conv1x1, {bands}] (a learnable 1x1 convolution)"
    )


def check_stems(d: DataConfig, m: MFNetConfig) -> None:
    """Every modality of the model whose band count the config fixes has a stem that takes it;
    the error names ``model.stems``, the bands and the ``adapt`` / ``conv1x1`` stems that fit."""
    for name in m.modalities:
        bands, where = kept_bands(d, name)
        error = stem_error(m, name, bands, where) if bands is not None else None  # None: known from the files
        if error is not None:
            raise ConfigError(error)
