"""Checks that make a wrap that cannot work fail with a named error instead of silently.

- :func:`cast_inputs`: floating inputs are cast to the model's compute dtype; integer, boolean
  or complex inputs are refused (scaling raw ``uint8`` pixels is the caller's decision).
- :func:`checked_call`: during the first forward of a ``MultimodalModel`` (while its
  ``call_check_pending`` is True) every multimodal layer must be called on the stacked batch
  (a leading size that is a multiple of ``M*B``; each layer records it in its declared
  ``call_check`` / ``called`` attributes). A layer its host never calls (e.g. the host reads
  ``.weight`` directly, or runs another module) raises :class:`WrapError` naming it; an
  ``AttributeError`` raised on a multimodal layer (``'MultimodalLoRA' object has no attribute
  'weight'``) is re-raised as :class:`WrapError` naming the layer and the attribute read.
  After a successful check the model's ``call_check_pending`` is cleared (no cost afterwards).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import MmpeftTypeError, MmpeftValueError
from ..tuners import MultimodalLayer
from ..utils import listing

__all__ = ["WrapError", "cast_inputs", "compute_dtype", "input_dtype", "checked_call"]


class WrapError(MmpeftValueError, RuntimeError):
    """A wrapped model that cannot compute what it promises (a bypassed or unused layer)."""


def compute_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the first floating parameter of ``model`` (None when it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def cast_inputs(modalities: Sequence[str], xs: Sequence[torch.Tensor], dtype: torch.dtype | None) -> list[torch.Tensor]:
    """Floating inputs cast to ``dtype`` (unchanged when None); others refused naming the modality."""
    out = []
    for m, x in zip(modalities, xs):
        if not x.is_floating_point():
            raise MmpeftTypeError(
                f"input of modality {m!r} has dtype {x.dtype}; pass floating-point tensors (e.g. "
                f"x.float() / 255 for 8-bit images): the model computes in {dtype or 'floating point'}"
            )
        out.append(x if dtype is None or x.dtype == dtype else x.to(dtype))
    return out


def _layer_of(err: AttributeError, layers: Sequence[tuple[str, MultimodalLayer]]) -> str | None:
    names = {id(m): n for n, m in layers}
    found, tb = None, err.__traceback__
    while tb is not None:  # the innermost multimodal layer on the stack is the one read
        owner = tb.tb_frame.f_locals.get("self")
        if id(owner) in names:
            found = names[id(owner)]
        tb = tb.tb_next
    return found


def checked_call(
    layers: Sequence[tuple[str, MultimodalLayer]], fn: Callable[..., Any], x: torch.Tensor, *args: Any, **kwargs: Any
) -> Any:
    """``fn(x, *args, **kwargs)``, verifying that every layer of ``layers`` ran on the stacked
    batch ``x: (M*B, ...)`` (raises :class:`WrapError` naming those that did not)."""
    for _, layer in layers:
        layer.call_check, layer.called = x.shape[0], False
    try:
        out = fn(x, *args, **kwargs)
    except AttributeError as err:
        name = _layer_of(err, layers)
        if name is None:
            raise
        raise WrapError(
            f"{name} was read as an attribute by its host module instead of being called ({err}); the host "
            "uses the original module's tensors directly, so the multimodal update would be bypassed. "
            "Target another module (`mmpeft-isprs help backbones` lists each family's placement)"
        ) from err
    finally:
        for _, layer in layers:
            layer.call_check = None
    missing = [n for n, layer in layers if not layer.called]
    if missing:
        raise WrapError(
            f"{len(missing)} wrapped module(s) were not called on the stacked batch (leading size a multiple of "
            f"{x.shape[0]}) during the forward: {listing(missing)}. Their host "
            "reads their weights directly or does not use them, so their updates never act. Target modules "
            "that the forward calls (or call model.skip_call_check() if they serve another method)"
        )
    return out


def input_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype a ``MultimodalModel``'s raw inputs are cast to: that of its stems' parameters,
    else its ``compute_dtype``, else that of the frozen model's parameters."""
    stems = getattr(model, "stems", None)
    own = compute_dtype(stems) if isinstance(stems, nn.Module) else None
    if own is not None:
        return own
    dt = getattr(model, "compute_dtype", None)
    base = getattr(model, "base_model", model)
    return dt if isinstance(dt, torch.dtype) else compute_dtype(base)
