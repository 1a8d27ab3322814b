"""Per-modality forward arguments: one module of a wrapped model's base model called once per modality.

:func:`set_modality_arguments`: the module (a patch embedding) is called once per modality, on that
modality's own bands, with that modality's arguments (DOFA's ``wavelengths``) or through another
module of the model (TerraMind's own per-modality embeddings, :mod:`mmpeft.model.geo_embeddings`).
The rest of the model runs on the stacked batch as before. The module's call on the stacked batch
still runs (a forward hook replaces its output; the embedding is a small part of the cost). The
hook is an object holding the wrapped model, so ``copy.deepcopy`` gives the copy a hook of its own.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import MmpeftKeyError, MmpeftValueError

__all__ = ["set_modality_arguments", "per_modality_modules"]


def _present(wrapped: Any) -> tuple[list[str], int] | None:
    """(modalities stacked in the running forward, in order; samples per modality), read off the
    state every multimodal layer holds during a forward (:func:`mmpeft.tuners.base.layer_state`);
    None outside a forward of ``wrapped`` (its base model called alone, or unloaded)."""
    if getattr(wrapped, "unloaded", None) is not None:
        return None
    layer = next((layer for _, layer in wrapped.layers()), None)
    if layer is None:
        raise MmpeftValueError("set_modality_arguments needs a wrapped model with multimodal layers")
    if layer.batch_size is None:
        return None
    if layer.single is not None:
        return [layer.modalities[layer.single]], int(layer.batch_size)
    order = range(len(layer.modalities)) if layer.present is None else layer.present
    return [layer.modalities[i] for i in order], int(layer.batch_size)


def _join(outs: list[Any], batch: int, chunks: list[torch.Tensor], stacked: Any) -> Any:
    """Per-modality outputs -> one: tensors with ``batch`` rows concatenated on dim 0 (modality-major);
    an element that is the call's input passed through (TerraMind's ``"tensor"``) as the stacked
    call's (``stacked``); the other elements of a tuple (DOFA's generated weights) as the first modality's."""
    first = outs[0]
    if isinstance(first, torch.Tensor):
        if all(o is c for o, c in zip(outs, chunks)):  # the input given back: the stacked input
            return stacked
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
        return type(first)(_join([o[i] for o in outs], batch, chunks, stacked[i]) for i in range(len(first)))
    if isinstance(first, dict):  # TerraMind's embeddings return {"tensor": input, "x": tokens, "emb": positions}
        return {k: _join([o[k] for o in outs], batch, chunks, stacked[k]) for k in first}
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
    module, TerraMind's: :func:`mmpeft.set_modality_embeddings` names them for you). Modalities not
    named run as before, the arguments unchanged. Only inside a forward of ``wrapped``: the base
    model called alone runs as its own. Checked before anything changes; the returned handle's
    ``remove()`` undoes it (not saved with the adapters; ``copy.deepcopy`` copies it with the model)."""
    target = _check_spec(wrapped, module, arguments)
    spec = {m: dict(a) for m, a in arguments.items()}
    handle = target.register_forward_hook(_PerModality(wrapped, spec), with_kwargs=True)
    wrapped._modality_arguments = {**getattr(wrapped, "_modality_arguments", {}), **spec}
    return handle


class _PerModality:
    """The forward hook of :func:`set_modality_arguments`: an object, not a closure, so that
    ``copy.deepcopy`` and pickling give a copy of the wrapped model a hook reading the copy (its
    layers' state, its modules, its own copy of the arguments), never the original."""

    def __init__(self, wrapped: Any, spec: dict[str, dict[str, Any]]) -> None:
        self.wrapped, self.spec, self.busy = wrapped, spec, False

    def __call__(self, mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        present = None if self.busy or not args or not isinstance(args[0], torch.Tensor) else _present(self.wrapped)
        if present is None:
            return out
        (names, b), x, outs, chunks = present, args[0], [], []
        self.busy = True
        try:
            for i, m in enumerate(names):
                chunk, own = x[i * b : (i + 1) * b], dict(self.spec.get(m, {}))
                call = self.wrapped.base_model.get_submodule(own.pop("module")) if "module" in own else mod
                if m in self.spec:  # its own bands: the first c_m channels (an 'auto' / 'repeat' stem tiled them)
                    chunk = chunk[:, : self.wrapped.stems[m].in_channels]
                _check_channels(m, call, chunk)
                bound = inspect.signature(mod.forward).bind(chunk, *args[1:], **kwargs)
                bound.arguments.update(own)
                chunks.append(chunk)
                outs.append(call(*bound.args, **bound.kwargs))
        finally:
            self.busy = False
        return _join(outs, b, chunks, out)


def _check_channels(modality: str, module: nn.Module, chunk: torch.Tensor) -> None:
    """A module declaring its input channels (TerraMind's ``num_channels``) given another count: refused."""
    expected = getattr(module, "num_channels", None)
    if isinstance(expected, int) and chunk.dim() > 1 and chunk.shape[1] != expected:
        raise MmpeftValueError(
            f"modality {modality!r} has {chunk.shape[1]} band(s), but the embedding it is routed through "
            f"({type(module).__name__}) takes {expected}: give the modality its {expected} bands, or route it "
            "through the embedding built for its bands"
        )


def per_modality_modules(wrapped: Any) -> list[str]:
    """The modules of ``wrapped.base_model`` that :func:`set_modality_arguments` (or TerraMind's
    routing) calls once per modality: they act only inside a forward of ``wrapped``."""
    return [
        n
        for n, m in wrapped.base_model.named_modules()
        if any(isinstance(h, _PerModality) for h in m._forward_hooks.values())
    ]
