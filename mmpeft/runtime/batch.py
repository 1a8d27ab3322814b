"""The modality axis: gather the given modalities, check their sizes, split outputs back.

A :class:`~mmpeft.MultimodalModel` stacks its inputs modality-major on the batch axis,
``(S*B, ...)`` for the S modalities given, and splits every tensor of the output back into S parts.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import MmpeftKeyError, MmpeftTypeError, MmpeftValueError

__all__ = ["Inputs", "gather", "check_dims", "check_sizes", "split_output", "module_call", "inputs_by_keyword"]

#: ``{modality: (B, c_m, ...)}`` or a sequence in the model's modality order (None: missing).
Inputs = Mapping[str, torch.Tensor] | Sequence[torch.Tensor]


def gather(modalities: Sequence[str], inputs: Inputs) -> tuple[list[str], list[torch.Tensor]]:
    """The present modalities (model order) and their tensors; absent ones are left out of a dict
    or passed as None in a sequence. At least one must be present; each must be a tensor."""
    if isinstance(inputs, torch.Tensor):
        raise MmpeftTypeError(
            f"pass one tensor per modality {tuple(modalities)} (a dict or a sequence), not a single tensor"
        )
    if isinstance(inputs, Mapping):
        unknown = [k for k in inputs if k not in modalities]
        if unknown:
            raise MmpeftKeyError(f"unknown modalities {unknown}; this model was built for {list(modalities)}")
        pairs = [(m, inputs[m]) for m in modalities if inputs.get(m) is not None]
    else:
        xs = list(inputs)
        if len(xs) != len(modalities):
            raise MmpeftValueError(
                f"expected {len(modalities)} inputs {list(modalities)} (None for a missing one), got {len(xs)}"
            )
        pairs = [(m, x) for m, x in zip(modalities, xs) if x is not None]
    if not pairs:
        raise MmpeftValueError(f"no modality given; pass at least one of {list(modalities)}")
    for m, x in pairs:
        if not isinstance(x, torch.Tensor):
            raise MmpeftTypeError(f"input of modality {m!r} is a {type(x).__name__}, not a tensor")
    return [m for m, _ in pairs], [x for _, x in pairs]


def _shapes(names: Sequence[str], xs: Sequence[torch.Tensor]) -> str:
    return ", ".join(f"{k}={tuple(v.shape)}" for k, v in zip(names, xs))


def check_dims(names: Sequence[str], xs: Sequence[torch.Tensor]) -> None:
    """Every input needs (batch, channels, spatial...): 3 dimensions at least, and all modalities
    the same number. ValueError naming the modality and its shape (a single sample, one axis
    fewer than the others, is told to add the batch axis)."""
    flat = [m for m, x in zip(names, xs) if x.dim() < 3]
    if flat:
        raise MmpeftValueError(
            f"the inputs of {flat} lack axes ({_shapes(names, xs)}): each modality's input needs "
            "(batch, channels, spatial...), e.g. (B, C, H, W) for an image model"
        )
    most = max(x.dim() for x in xs)
    fewer = [m for m, x in zip(names, xs) if x.dim() < most]
    if fewer:
        single = [m for m, x in zip(names, xs) if x.dim() == most - 1]
        hint = f"; {single} look like single samples: add the batch axis (x[None] or x.unsqueeze(0))" if single else ""
        raise MmpeftValueError(
            f"all modalities need the same number of dimensions, {fewer} have fewer: {_shapes(names, xs)}{hint}"
        )


def check_sizes(names: Sequence[str], xs: Sequence[torch.Tensor]) -> None:
    """All modalities need the same number of dimensions (3 at least), batch and spatial sizes."""
    check_dims(names, xs)
    ref_m, ref = names[0], xs[0]
    for m, x in zip(names, xs):
        if x.shape[0] != ref.shape[0] or x.shape[2:] != ref.shape[2:]:
            hint = "; single samples (channels, H, W)? add the batch axis: x[None]" if x.dim() == 3 else ""
            raise MmpeftValueError(
                f"all modalities need the same batch and spatial sizes: {_shapes(names, xs)} ({m!r} differs from "
                f"{ref_m!r}){hint}"
            )


def _same_mapping(like: Mapping[str, Any], fields: dict[str, Any]) -> Any:
    """``fields`` as a mapping of ``like``'s type (a ModelOutput keeps its class and attributes)."""
    if type(like) is dict:
        return fields
    try:
        return type(like)(**fields)
    except TypeError:
        return fields


def _split_field(key: Any, value: Any, names: Sequence[str]) -> list[Any]:
    try:
        return split_output(value, names, False)  # type: ignore[no-any-return]
    except MmpeftTypeError as err:
        raise MmpeftTypeError(f"output field {key!r}: {err}") from None
    except MmpeftValueError as err:  # a scalar or a field without the batch axis (an auxiliary loss)
        raise MmpeftValueError(f"output field {key!r}: {err}") from None


def split_output(out: Any, names: Sequence[str], as_dict: bool = True) -> Any:
    """Split every tensor of ``out`` (dim 0 = S*B) into one part per modality of ``names``:
    ``{modality: part}`` (``as_dict``) or a list; tuples, lists and mappings are split inside
    (a mapping keeps its type: a Hugging Face ``BaseModelOutputWithPooling`` per modality)."""
    m = len(names)
    if isinstance(out, torch.Tensor):
        if out.dim() == 0 or out.shape[0] % m != 0:
            raise MmpeftValueError(f"cannot split an output of shape {tuple(out.shape)} into {m} modalities")
        parts = out.chunk(m, 0)
        return dict(zip(names, parts)) if as_dict else list(parts)
    if out is None or isinstance(out, (bool, int, float, str)):  # no batch axis (a field such as MaskFormer
        return dict.fromkeys(names, out) if as_dict else [out] * m  # Swin's spatial sizes): the same for each
    if isinstance(out, Mapping):  # a dict, or a Hugging Face ModelOutput (rebuilt as its own type)
        per = {k: _split_field(k, v, names) for k, v in out.items()}
        res = [_same_mapping(out, {k: v[i] for k, v in per.items()}) for i in range(m)]
        return dict(zip(names, res)) if as_dict else res
    if isinstance(out, (list, tuple)):
        per_t = [split_output(v, names, False) for v in out]
        res_t = [type(out)(v[i] for v in per_t) for i in range(m)]
        return dict(zip(names, res_t)) if as_dict else res_t
    raise MmpeftTypeError(
        f"cannot split an output of type {type(out).__name__} into one part per modality (tensors, tuples, lists, "
        "mappings and plain values are handled); return tensors from the model's forward, or call "
        "wrapped.base_model on the stacked batch yourself"
    )


def module_call(module: nn.Module, forward: Any) -> Any:
    """``module.forward``'s signature, called through ``module(...)`` so that the forward hooks on
    ``module`` run (on the stacked batch), as they would without the wrap."""
    call = functools.wraps(forward)(lambda *a, **k: module(*a, **k))
    return call


def inputs_by_keyword(fn: Any, kwargs: dict[str, Any]) -> tuple[Any, Inputs]:
    """(a function taking the stacked input first, the per-modality inputs) when they come as
    ``fn``'s first parameter by keyword (popped from ``kwargs``)."""
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD]
    name = params[0].name if params else None
    if name is None or kwargs.get(name) is None:
        raise MmpeftTypeError(
            f"no input given: pass the modalities' inputs by position or as {name or 'the first argument'}="
            "{modality: tensor}"
        )
    inputs = kwargs.pop(name)
    return (lambda x, *a, **k: fn(*a, **{name: x}, **k)), inputs
