"""Band meaning per modality, for geospatial foundation models.

A wrapped model runs every modality through the same frozen model, stacked on the batch axis
(``(S*B, C, ...)``): the per-modality stems bring each modality to the model's ``C`` channels. For
a model whose channels *mean* something (Prithvi's six HLS bands, Clay's), a stem that tiles a
2-band SAR input into those six slots feeds VV / VH where the model expects blue, green, red, ...
Two answers, both here:

- :func:`watch_band_meaning` (installed by ``wrap_multimodal``): at the first input of each
  modality whose stem would tile ``c`` bands into the ``C`` named bands of the model, a
  :class:`BandMeaningWarning` names the bands and the fixes: a learnable stem
  (``stems={"sar": ("conv1x1", 2)}``), or :func:`set_modality_arguments` where the model generates
  its embedding per band.
- :func:`set_modality_arguments`: one module of the model (its patch embedding) is called once
  per modality on that modality's own bands, with that modality's arguments: DOFA's
  ``wavelengths`` (its embedding is generated from them, so SAR is embedded as SAR), or another
  module of the model (TerraMind's own per-modality patch embeddings). The rest of the model
  runs on the stacked batch as before. The module's call on the stacked batch still runs (a
  forward hook replaces its output; the embedding is a small part of the cost).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import MmpeftKeyError, MmpeftValueError, MmpeftWarning
from ..targeting.geo import band_names, declared_bands

__all__ = ["BandMeaningWarning", "watch_band_meaning", "set_modality_arguments"]


class BandMeaningWarning(MmpeftWarning):
    """A modality's stem tiles its bands into input slots the model gives another meaning."""


def watch_band_meaning(wrapped: Any) -> RemovableHandle | None:
    """Warn once per modality (:class:`BandMeaningWarning`) whose first input a default stem tiles
    into the bands the model names (TerraTorch's ``model_bands`` / ``bands``, DOFA's ``wavelengths``); the hook removes
    itself once every modality has been seen. None when the model names no bands."""
    names = band_names(wrapped.base_model)  # Prithvi's HLS bands, Clay's; else DOFA's wavelengths (um)
    names = names if names is not None else [str(w) for w in declared_bands(wrapped.base_model) or ()] or None
    if names is None:
        return None
    pending = set(wrapped.modalities)

    def check(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inputs = args[0] if args else None
        given = inputs.items() if isinstance(inputs, Mapping) else zip(wrapped.modalities, inputs or ())
        for m, x in given:
            if m not in pending or not isinstance(x, torch.Tensor) or x.dim() < 2:
                continue
            pending.discard(m)
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
        if not pending:
            handle.remove()

    handle = wrapped.register_forward_pre_hook(check, with_kwargs=True)
    return handle


def _present(wrapped: Any) -> tuple[list[str], int]:
    """(modalities stacked in the running forward, in order; samples per modality), read off the
    state every multimodal layer holds during a forward (:func:`mmpeft.tuners.base.layer_state`)."""
    layer = next((layer for _, layer in wrapped.layers()), None)
    if layer is None or layer.batch_size is None:
        raise MmpeftValueError("set_modality_arguments needs a wrapped model with multimodal layers, run through it")
    if layer.single is not None:
        return [layer.modalities[layer.single]], int(layer.batch_size)
    order = range(len(layer.modalities)) if layer.present is None else layer.present
    return [layer.modalities[i] for i in order], int(layer.batch_size)


def _join(outs: list[Any], batch: int) -> Any:
    """Per-modality outputs -> one: tensors with ``batch`` rows concatenated on dim 0 (modality-major);
    the other elements of a tuple (DOFA's generated weights) as the first modality's."""
    first = outs[0]
    if isinstance(first, torch.Tensor):
        if first.shape[:1] != (batch,):
            return first
        if len({tuple(o.shape[1:]) for o in outs}) > 1:  # refused: no guess at which one the model reads
            raise MmpeftValueError(
                f"set_modality_arguments: the per-modality outputs differ beyond the batch axis "
                f"({[tuple(o.shape) for o in outs]}), so they cannot be stacked back; choose a module whose "
                "outputs have the same shape for every modality"
            )
        return torch.cat(outs, 0)
    if isinstance(first, (tuple, list)):
        return type(first)(_join([o[i] for o in outs], batch) for i in range(len(first)))
    if isinstance(first, dict):  # TerraMind's embeddings return {"x": tokens, "emb": positions, ...}
        return {k: _join([o[k] for o in outs], batch) for k in first}
    return first


def _check_spec(wrapped: Any, module: str, arguments: Mapping[str, Mapping[str, Any]]) -> nn.Module:
    base = wrapped.base_model
    try:
        target = base.get_submodule(module)
    except AttributeError as err:
        raise MmpeftKeyError(f"set_modality_arguments: the model has no module {module!r} ({err})") from None
    params = inspect.signature(target.forward).parameters
    for m, spec in arguments.items():
        if m not in wrapped.modalities:
            raise MmpeftKeyError(f"set_modality_arguments: unknown modality {m!r}; the model's: {wrapped.modalities}")
        if wrapped.stems[m].kind not in ("auto", "repeat", "identity"):
            raise MmpeftValueError(
                f"set_modality_arguments: modality {m!r} has a {wrapped.stems[m].kind!r} stem, which mixes its bands; "
                "its own bands are passed to the module only through an 'auto', 'repeat' or 'identity' stem"
            )
        own = spec.get("module")
        if own is not None:
            base.get_submodule(own)  # AttributeError naming it
        unknown = [k for k in spec if k != "module" and k not in params]
        if unknown:
            raise MmpeftKeyError(
                f"set_modality_arguments: {module} takes no argument(s) {unknown}; it takes {list(params)}"
            )
    return target


def set_modality_arguments(wrapped: Any, module: str, arguments: Mapping[str, Mapping[str, Any]]) -> RemovableHandle:
    """Call ``module`` (a qualified name in the base model: its patch embedding) once per modality,
    on that modality's own bands (the first ``c_m`` channels of its stacked chunk: what an 'auto' /
    'repeat' stem keeps), with that modality's ``arguments[m]`` in place of the model's own, and
    stack the outputs back: ``{"sar": {"wavelengths": torch.tensor([5.405, 5.405])}}`` (DOFA), or
    ``{"sar": {"module": "encoder_embeddings.untok_sen1grd@224"}}`` (the modality's own embedding
    module, TerraMind's). Modalities not named run as before, the arguments unchanged. Checked before
    anything changes; the returned handle's ``remove()`` undoes it (not saved with the adapters)."""
    target = _check_spec(wrapped, module, arguments)
    spec = {m: dict(a) for m, a in arguments.items()}
    busy: list[bool] = []

    def per_modality(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        if busy or not args or not isinstance(args[0], torch.Tensor):
            return out
        names, b = _present(wrapped)
        x, outs = args[0], []
        busy.append(True)
        try:
            for i, m in enumerate(names):
                chunk, own = x[i * b : (i + 1) * b], dict(spec.get(m, {}))
                call = wrapped.base_model.get_submodule(own.pop("module")) if "module" in own else mod
                if m in spec:  # its own bands: the first c_m channels (an 'auto' / 'repeat' stem tiled them)
                    chunk = chunk[:, : wrapped.stems[m].in_channels]
                bound = inspect.signature(mod.forward).bind(chunk, *args[1:], **kwargs)
                bound.arguments.update(own)
                outs.append(call(*bound.args, **bound.kwargs))
        finally:
            busy.clear()
        return _join(outs, b)

    handle = target.register_forward_hook(per_modality, with_kwargs=True)
    wrapped._modality_arguments = {**getattr(wrapped, "_modality_arguments", {}), **spec}
    return handle
