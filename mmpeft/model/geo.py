"""Band meaning per modality, for geospatial foundation models.

A wrapped model runs every modality through the same frozen model, stacked on the batch axis
(``(S*B, C, ...)``): the per-modality stems bring each modality to the model's ``C`` channels. For
a model whose channels *mean* something (Prithvi's six HLS bands, Clay's), a stem that tiles a
2-band SAR input into those six slots feeds VV / VH where the model expects blue, green, red, ...
The answers:

- :func:`watch_band_meaning` (installed by ``wrap_multimodal`` and ``load_multimodal``): a model
  with one patch embedding per modality (TerraMind) gets each modality routed through its own
  (:mod:`mmpeft.model.geo_embeddings`, :func:`~mmpeft.model.geo_embeddings.set_modality_embeddings`;
  a modality without one is refused at its forward, never tiled). For another model, at the first
  input of each modality whose stem would tile ``c`` bands into the ``C`` named bands of the model,
  a :class:`BandMeaningWarning` names the bands and the fixes: a learnable stem
  (``stems={"sar": ("conv1x1", 2)}``), or :func:`set_modality_arguments` where the model generates
  its embedding per band.
- :func:`set_modality_arguments` (:mod:`mmpeft.model.geo_arguments`): one module of the model (its
  patch embedding) is called once per modality on that modality's own bands, with that modality's
  arguments: DOFA's ``wavelengths`` (its embedding is generated from them, so SAR is embedded as
  SAR), or another module of the model. The rest of the model runs on the stacked batch as before.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import MmpeftWarning
from ..targeting.geo import band_names, declared_bands
from .geo_arguments import set_modality_arguments
from .geo_embeddings import route_by_name

__all__ = ["BandMeaningWarning", "watch_band_meaning", "set_modality_arguments"]


class BandMeaningWarning(MmpeftWarning):
    """A modality's stem tiles its bands into input slots the model gives another meaning."""


def watch_band_meaning(wrapped: Any) -> RemovableHandle | None:
    """Installed by ``wrap_multimodal`` and ``load_multimodal``. A model with one patch embedding per
    modality (TerraMind): each modality routed through its own (:func:`mmpeft.model.geo_embeddings.route_by_name`).
    Else warn once per modality (:class:`BandMeaningWarning`) whose first input a default stem tiles
    into the bands the model names (TerraTorch's ``model_bands`` / ``bands``, DOFA's ``wavelengths``); the hook removes
    itself once every modality has been seen. None when the model names no bands."""
    if route_by_name(wrapped):
        return None
    names = band_names(wrapped.base_model)  # Prithvi's HLS bands, Clay's; else DOFA's wavelengths (um)
    names = names if names is not None else [str(w) for w in declared_bands(wrapped.base_model) or ()] or None
    if names is None:
        return None
    watch = _BandWatch(wrapped, names)
    watch.handle = wrapped.register_forward_pre_hook(watch, with_kwargs=True)
    return watch.handle


class _BandWatch:
    """The hook of :func:`watch_band_meaning`: an object, not a closure, so that ``copy.deepcopy`` and
    pickling give a copy of the wrapped model a hook reading the copy (its own stems and arguments)."""

    def __init__(self, wrapped: Any, names: list[str]) -> None:
        self.wrapped, self.names, self.pending = wrapped, names, set(wrapped.modalities)
        self.handle: RemovableHandle | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        wrapped, names, inputs = self.wrapped, self.names, args[0] if args else None
        given = inputs.items() if isinstance(inputs, Mapping) else zip(wrapped.modalities, inputs or ())
        for m, x in given:
            if m not in self.pending or not isinstance(x, torch.Tensor) or x.dim() < 2:
                continue
            self.pending.discard(m)
            stem, c = wrapped.stems[m], int(x.shape[1])
            if (
                stem.kind in ("auto", "repeat")
                and c != len(names)
                and m not in getattr(wrapped, "_modality_arguments", {})
            ):
                warnings.warn(
                    f"modality {m!r} has {c} band(s); its {stem.kind!r} stem tiles them into the model's "
                    f"{len(names)} input slots, which it was built for as {names}: the model reads them as those "
                    f"bands. Give the modality a learnable stem (stems={{{m!r}: ('conv1x1', {c})}}) or, for a model "
                    "that embeds each band from its wavelength (DOFA), its own wavelengths with "
                    "mmpeft.set_modality_arguments",
                    BandMeaningWarning,
                    stacklevel=4,
                )
        if not self.pending and self.handle is not None:
            self.handle.remove()
