"""Checks that make a wrap that cannot work fail with a named error instead of silently.

- :func:`check_modalities`: modality names are a sequence of distinct, non-empty identifiers
  (a plain string such as ``"optical"`` is refused rather than read as seven modalities).
- :func:`cast_inputs`: floating inputs are cast to the model's compute dtype; integer, boolean
  or complex inputs are refused (scaling raw ``uint8`` pixels is the caller's decision).
- :func:`install_call_check` / :func:`checked_call`: during the first forward of a
  ``MultimodalModel`` every multimodal layer must be called on the stacked batch (a leading
  size that is a multiple of ``M*B``). A layer its host never calls (e.g. the host reads
  ``.weight`` directly, or runs another module) raises :class:`WrapError` naming it; an
  ``AttributeError`` raised on a multimodal layer (``'MultimodalLoRA' object has no attribute
  'weight'``) is re-raised as :class:`WrapError` naming the layer and the attribute read.
  After a successful check the hooks are removed (no cost afterwards).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = ["WrapError", "check_modalities", "cast_inputs", "compute_dtype", "input_dtype", "install_call_check", "checked_call", "skip_call_check"]

_STATE = "_mmpeft_call_check"
_CALLED = "_mmpeft_called"
_STACKED = "_mmpeft_stacked"


class WrapError(RuntimeError):
    """A wrapped model that cannot compute what it promises (a bypassed or unused layer)."""


def check_modalities(modalities: Any) -> list[str]:
    """``modalities`` as a list of names; ValueError/TypeError unless it is a sequence (not a
    string) of distinct, non-empty identifier strings."""
    if isinstance(modalities, (str, bytes)):
        raise TypeError(
            f"modalities must be a sequence of names, got the string {modalities!r}; "
            f"write ({modalities!r},) for a single modality"
        )
    if isinstance(modalities, (set, frozenset, Mapping)) or not isinstance(modalities, Iterable):
        raise TypeError(f"modalities must be an ordered sequence of names (list or tuple), got {type(modalities).__name__}")
    names = list(modalities)
    if not names:
        raise ValueError("at least one modality is required")
    bad = [m for m in names if not isinstance(m, str) or not m.isidentifier()]
    if bad:
        raise ValueError(f"modality names must be non-empty identifier strings (no dots or spaces), got {bad}")
    if len(set(names)) != len(names):
        raise ValueError(f"modality names must be distinct, got {names}")
    return names


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
            raise TypeError(
                f"input of modality {m!r} has dtype {x.dtype}; pass floating-point tensors (e.g. "
                f"x.float() / 255 for 8-bit images): the model computes in {dtype or 'floating point'}"
            )
        out.append(x if dtype is None or x.dtype == dtype else x.to(dtype))
    return out


def _mark_called(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Forward pre-hook of the check: note a call whose input leads with a multiple of M*B."""
    x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
    stacked = module.__dict__.get(_STACKED, 0)
    if isinstance(x, torch.Tensor) and x.dim() > 0 and stacked and x.shape[0] % stacked == 0:
        module.__dict__[_CALLED] = True


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from .layers import MultimodalLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, MultimodalLayer)]


def install_call_check(model: nn.Module, layers: Sequence[tuple[str, nn.Module]] | None = None) -> None:
    """Arm the first-forward check of ``model`` (a ``MultimodalModel``) over its multimodal layers.

    The state lives on the modules themselves (a flag and a hook per layer), so copies of the
    model (``copy.deepcopy``) carry their own check.
    """
    for _, layer in layers if layers is not None else _layers(model):
        layer.register_forward_pre_hook(_mark_called, with_kwargs=True)
    model.__dict__[_STATE] = True


def skip_call_check(model: nn.Module) -> None:
    """Disarm the check (e.g. a wrapped module is only used by another method than forward)."""
    model.__dict__.pop(_STATE, None)
    for _, layer in _layers(model):
        for key in [k for k, h in layer._forward_pre_hooks.items() if h is _mark_called]:
            del layer._forward_pre_hooks[key]
            layer._forward_pre_hooks_with_kwargs.pop(key, None)
        layer.__dict__.pop(_CALLED, None)
        layer.__dict__.pop(_STACKED, None)


def _layer_of(err: AttributeError, model: nn.Module) -> str | None:
    names = {id(m): n for n, m in _layers(model)}
    found, tb = None, err.__traceback__
    while tb is not None:  # the innermost multimodal layer on the stack is the one read
        owner = tb.tb_frame.f_locals.get("self")
        if id(owner) in names:
            found = names[id(owner)]
        tb = tb.tb_next
    return found


def _run_by_mmpeft(model: nn.Module) -> set[str]:
    """Layers whose function mmpeft's own block runners compute without calling them: the
    "after" adapter of a block in efficient attention applies ``adapt_output`` itself."""
    from .attention import efficient_attention_blocks

    return {f"{name}.attn" for name in efficient_attention_blocks(model)}


def checked_call(model: nn.Module, fn: Callable[..., Any], x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """``fn(x, *args, **kwargs)``; during the first call of ``model`` also verify that every
    multimodal layer ran on the stacked batch ``x: (M*B, ...)``."""
    if not model.__dict__.get(_STATE) or torch.compiler.is_compiling():
        return fn(x, *args, **kwargs)
    layers = _layers(model)
    for _, layer in layers:
        layer.__dict__[_STACKED], layer.__dict__[_CALLED] = x.shape[0], False
    try:
        out = fn(x, *args, **kwargs)
    except AttributeError as err:
        name = _layer_of(err, model)
        if name is None:
            raise
        raise WrapError(
            f"{name} was read as an attribute by its host module instead of being called ({err}); the host "
            "uses the original module's tensors directly, so the multimodal update would be bypassed. "
            "Target another module (`mmpeft-isprs help backbones` lists each family's placement)"
        ) from err
    exempt = _run_by_mmpeft(model)
    missing = [n for n, layer in layers if not layer.__dict__.get(_CALLED) and n not in exempt]
    if missing:
        raise WrapError(
            f"{len(missing)} wrapped module(s) were not called on the stacked batch (leading size a multiple of "
            f"{x.shape[0]}) during the forward: {missing[:8]}{' ...' if len(missing) > 8 else ''}. Their host "
            "reads their weights directly or does not use them, so their updates never act. Target modules "
            "that the forward calls (or mmpeft.verify.skip_call_check(model) if they serve another method)"
        )
    skip_call_check(model)
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
