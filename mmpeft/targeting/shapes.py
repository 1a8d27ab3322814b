"""Running a model on shapes only: the dry run's cheap path.

:func:`meta_forward` calls a model with its parameters and buffers swapped for ``meta`` tensors
of the same shapes and dtypes (``torch.func.functional_call``; the model's own tensors are back
afterwards) on ``meta`` inputs: every operation computes its output's shape and nothing else, so
forward hooks see the shapes a real forward would give at a cost of microseconds per operation.

A model whose forward cannot run on meta tensors (it makes a CPU tensor of its own, reads a
value with ``.item()``, indexes with a boolean mask) raises; the caller then runs it for real
(:mod:`mmpeft.targeting.probe` logs why). Attributes a module sets during the meta run that hold
meta tensors (a cache of position tables, say) are put back as they were, so the model is left
exactly as it was found.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

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


def _meta_state(model: nn.Module) -> dict[str, torch.Tensor]:
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {k: torch.empty_like(v, device="meta") for k, v in named}


def meta_forward(
    model: nn.Module, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, between: Callable[[int], None] | None = None
) -> None:
    """Call ``model`` once per shape of ``shapes`` on a meta input of that shape and ``dtype``,
    with its tensors swapped for meta ones (under ``torch.no_grad``); ``between(i)`` runs before
    the i-th call. Whatever the forward raises propagates; the model is left as it was."""
    state = _meta_state(model)
    saved = _attributes(model)
    try:
        with torch.no_grad():
            for i, shape in enumerate(shapes):
                if between is not None:
                    between(i)
                x = torch.empty(shape, dtype=dtype, device="meta")
                torch.func.functional_call(model, state, (x,), tie_weights=True, strict=False)
    finally:
        _restore(saved)
