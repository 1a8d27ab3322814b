"""Running a model on shapes only: the dry run's cheap path.

:func:`meta_forward` calls a model with its parameters and buffers swapped for ``meta`` tensors
of the same shapes and dtypes (swapped in each module, a shared tensor once; the model's own
tensors are back afterwards) on ``meta`` inputs: every operation computes its output's shape and nothing else, so
forward hooks see the shapes a real forward would give at a cost of microseconds per operation.

A model whose forward cannot run on meta tensors (it makes a CPU tensor of its own, reads a
value with ``.item()``, indexes with a boolean mask) raises; the caller then runs it for real
(:mod:`mmpeft.targeting.probe` logs why). Attributes a module sets during the meta run that hold
meta tensors (a cache of position tables, say) are put back as they were, so the model is left
exactly as it was found.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["meta_forward"]


def _holds_meta(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.device.type == "meta"
    if isinstance(value, (list, tuple)):
        return any(_holds_meta(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_meta(v) for v in value.values())
    return False


def _attributes(model: nn.Module) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Each module with a shallow copy of its plain attributes (not parameters, buffers, children)."""
    return [(m, dict(vars(m))) for m in model.modules()]


def _restore(saved: list[tuple[nn.Module, dict[str, Any]]]) -> None:
    """Undo attributes that now hold meta tensors (set or replaced during the meta run)."""
    for module, before in saved:
        for key, value in list(vars(module).items()):
            if key.startswith("_") and key in ("_parameters", "_buffers", "_modules"):
                continue
            if before.get(key, None) is not value and _holds_meta(value):
                if key in before:
                    setattr(module, key, before[key])
                else:
                    delattr(module, key)


_Swapped = list[tuple[dict[str, Any], str, torch.Tensor]]


def _swap_meta(model: nn.Module) -> _Swapped:
    """Every parameter and buffer replaced in its module by a meta tensor of its shape and dtype, one
    per tensor (a tensor shared by two modules, as CoaT's crpe, stays shared); returns what to restore."""
    swapped: _Swapped = []
    metas: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for key, t in list(store.items()):
                if t is not None:
                    meta = metas.setdefault(id(t), torch.empty_like(t, device="meta"))
                    swapped.append((store, key, t))
                    store[key] = meta  # type: ignore[assignment]
    return swapped


# functions whose output has their first argument's shape and dtype, whose meta kernels are slow
# Python decompositions (layer_norm alone was a third of a SAM encoder's meta run)
# (element-wise, or along one axis: no shape to check but the axis)
_SAME_SHAPE = {
    F.gelu,
    F.silu,
    F.relu,
    F.softmax,
    F.dropout,
    F.hardswish,
    F.sigmoid,
    F.tanh,
    torch.sigmoid,
    torch.tanh,
    torch.softmax,
    torch.dropout,
    torch.relu,
}
_BINARY = {
    torch.add,
    torch.mul,
    torch.sub,
    torch.Tensor.add,
    torch.Tensor.mul,
    torch.Tensor.sub,
    torch.Tensor.__add__,
    torch.Tensor.__radd__,
    torch.Tensor.__mul__,
    torch.Tensor.__rmul__,
    torch.Tensor.__sub__,
}


def _meta(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "meta"


def _binary(a: Any, b: Any) -> torch.Tensor | None:
    if not all(_meta(t) or (type(t) in (int, float) and not isinstance(t, bool)) for t in (a, b)) or not _meta(a):
        return None
    shape = torch.broadcast_shapes(a.shape, b.shape) if isinstance(b, torch.Tensor) else a.shape
    return torch.empty(shape, dtype=torch.result_type(a, b), device="meta")


def _axis_ok(x: torch.Tensor, args: Any, kwargs: dict[str, Any]) -> bool:
    dim = kwargs.get("dim", args[1] if len(args) > 1 and isinstance(args[1], int) else None)
    return dim is None or (isinstance(dim, int) and -max(x.dim(), 1) <= dim < max(x.dim(), 1))


def _layer_norm_ok(x: torch.Tensor, args: Any, kwargs: dict[str, Any]) -> bool:
    shape = tuple(args[1] if len(args) > 1 else kwargs.get("normalized_shape", ()))
    params = [*args[2:4], kwargs.get("weight"), kwargs.get("bias")]
    fits = len(shape) > 0 and tuple(x.shape[len(x.shape) - len(shape) :]) == shape
    return fits and all(p is None or (_meta(p) and tuple(p.shape) == shape and p.dtype == x.dtype) for p in params)


def _linear_ok(x: torch.Tensor, args: Any, kwargs: dict[str, Any]) -> bool:
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    b = args[2] if len(args) > 2 else kwargs.get("bias")
    if not _meta(w) or w.dim() != 2 or x.dim() < 1 or x.shape[-1] != w.shape[1] or x.dtype != w.dtype:
        return False
    return b is None or (_meta(b) and tuple(b.shape) == (w.shape[0],) and b.dtype == x.dtype)


def _attention_ok(args: Any, kwargs: dict[str, Any]) -> bool:
    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
    if len(args) not in (3, 4) or any(k not in ("attn_mask", "dropout_p", "is_causal", "scale") for k in kwargs):
        return False
    q, k, v = args[:3]
    if not all(map(_meta, (q, k, v))) or not (mask is None or _meta(mask)):
        return False
    same = q.dim() == k.dim() == v.dim() >= 2 and q.shape[:-2] == k.shape[:-2] == v.shape[:-2]
    if not (same and q.shape[-1] == k.shape[-1] and k.shape[-2] == v.shape[-2] and q.dtype == k.dtype == v.dtype):
        return False
    scores = (*q.shape[:-1], k.shape[-2])
    try:
        return mask is None or (
            torch.broadcast_shapes(mask.shape, scores) == scores and mask.dtype in (q.dtype, torch.bool)
        )
    except RuntimeError:
        return False


def _shortcut(func: Any, args: Any, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The output of ``func`` (a new meta tensor of the right shape and dtype), or None: compute it."""
    first = args[0] if args else None
    if not _meta(first) or kwargs.get("inplace", False) or kwargs.get("out") is not None:
        return None
    if func in _SAME_SHAPE and kwargs.get("dtype") is None and _axis_ok(first, args, kwargs):
        return torch.empty_like(first)
    if func in (F.layer_norm, torch.layer_norm) and _layer_norm_ok(first, args, kwargs):
        return torch.empty_like(first)
    if func is F.linear and _linear_ok(first, args, kwargs):
        return first.new_empty((*first.shape[:-1], args[1].shape[0]))
    if func is F.scaled_dot_product_attention and _attention_ok(args, kwargs):
        return first.new_empty((*first.shape[:-1], args[2].shape[-1]))
    if func in _BINARY and len(args) == 2 and "alpha" not in kwargs:
        return _binary(*args)
    return None


class _ShapeOnly(TorchFunctionMode):
    """Common functions on meta inputs answered by their output's shape rule (no decomposition)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = _shortcut(func, args, kwargs)
        return out if out is not None else func(*args, **kwargs)


def meta_forward(
    model: nn.Module,
    shapes: Sequence[tuple[int, ...]],
    dtype: torch.dtype,
    between: Callable[[int], None] | None = None,
    inner: TorchFunctionMode | None = None,
) -> None:
    """Call ``model`` once per shape of ``shapes`` on a meta input of that shape and ``dtype``,
    with its tensors swapped for meta ones (under ``torch.no_grad``); ``between(i)`` runs before
    the i-th call; ``inner``: a mode that sees every call first (an attention trace).
    Whatever the forward raises propagates; the model is left as it was."""
    saved = _attributes(model)
    swapped = _swap_meta(model)
    try:
        with torch.no_grad(), _ShapeOnly(), inner if inner is not None else contextlib.nullcontext():
            for i, shape in enumerate(shapes):
                if between is not None:
                    between(i)
                model(torch.empty(shape, dtype=dtype, device="meta"))
    finally:
        for store, key, t in reversed(swapped):
            store[key] = t
        _restore(saved)
