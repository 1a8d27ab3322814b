"""Modules whose input comes by keyword or whose output is a tuple (helpers of the adapters).

Hugging Face and torchvision attention modules return ``(output, weights, ...)`` and some hosts
call them with keywords only (``self.self_attn(hidden_states=...)``). An adapter placed after
such a module adapts the first element and passes the rest through unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from ..errors import MmpeftTypeError

__all__ = ["first_output", "with_first", "cat_rests", "take_input", "chunk_args", "only_x"]


def take_input(module: nn.Module, x: Any, kwargs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The module's main input: ``x`` when given positionally, else the keyword of the first
    parameter of ``module.forward`` (popped from ``kwargs``)."""
    if x is not None:
        return x, kwargs
    params = list(inspect.signature(module.forward).parameters)
    if not params or params[0] not in kwargs:
        raise MmpeftTypeError(
            f"{type(module).__name__} was called without its input (expected {params[:1]} or a positional)"
        )
    kwargs = dict(kwargs)
    return kwargs.pop(params[0]), kwargs


def first_output(y: Any) -> tuple[torch.Tensor, tuple[Any, ...] | None]:
    """(y, None) for a tensor; (y[0], y[1:]) for a tuple or list output."""
    if isinstance(y, (tuple, list)):
        return y[0], tuple(y[1:])
    return y, None


def with_first(first: torch.Tensor, rest: tuple[Any, ...] | None) -> Any:
    """Inverse of :func:`first_output`: ``first`` or ``(first, *rest)``."""
    return first if rest is None else (first, *rest)


def cat_rests(rests: Sequence[tuple[Any, ...] | None]) -> tuple[Any, ...] | None:
    """The per-modality extra outputs of a loop, joined: tensors concatenated on dim 0 (the
    stacked batch), anything else (None, flags) taken from the first modality."""
    if rests[0] is None:
        return None
    return tuple(torch.cat(list(items), 0) if isinstance(items[0], torch.Tensor) else items[0] for items in zip(*rests))


def only_x(x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """True when no argument but ``x`` itself holds a tensor (nested in tuples, lists, dicts too).

    Only then can loop execution call a module once per modality: a further tensor may be per
    sample (GCViT's global query, ``(M*B, ...)`` beside windows ``(M*B*nW, ...)``) or shared (a
    rotary table of N tokens, where N may equal M*B), and which one cannot be told from its shape.
    """
    leaves = pytree.tree_leaves((args, kwargs))
    return all(a is x or not isinstance(a, torch.Tensor) for a in leaves)


def chunk_args(
    x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any], m: int
) -> list[tuple[torch.Tensor, tuple[Any, ...], dict[str, Any]]]:
    """Per-modality ``(x_m, args_m, kwargs_m)`` for loop execution: ``x`` split into M chunks,
    and so is every further argument that *is* ``x`` (torchvision calls its attention as
    ``attn(x, x, x)``); all other arguments (flags, sizes) go to every modality unchanged. Call
    it only where :func:`only_x` holds: another tensor could be per sample or shared."""
    xs = x.chunk(m, 0)
    return [
        (xs[i], tuple(xs[i] if a is x else a for a in args), {k: xs[i] if v is x else v for k, v in kwargs.items()})
        for i in range(m)
    ]
