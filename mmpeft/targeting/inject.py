"""Wrap-time changes to the host model: the rules' layers swapped in, ``modules_to_save`` copies.

:func:`apply_rules` freezes the model and replaces every targeted module by its method's layer
(:data:`mmpeft.tuners.METHODS`); :func:`wrap_modules_to_save` puts a :class:`ModuleToSave` in
place of each module that trains in full. Both change the model in place.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..config import MultimodalConfig
from .prepare import check_targets_callable
from .probe import ProbeError, probe_batch_factors, probe_input
from .selection import all_linear, is_all_linear
from .targets import match_targets
from ..tuners import method_of, multimodal_layers
from ..tuners.options import Targets

__all__ = ["ModuleToSave", "apply_rules", "infer_in_channels", "set_submodule", "wrap_modules_to_save"]


class ModuleToSave(nn.Module):
    """A module of the host that trains in full (peft's ``modules_to_save``), e.g. a new head.

    ``original_module`` keeps the frozen original (used while adapters are disabled);
    ``trained_module`` is a trainable copy, saved with the adapters and restored on load.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original.requires_grad_(False)
        self.trained_module = copy.deepcopy(original).requires_grad_(True)
        self.adapters_enabled = True

    def enable_adapters(self, enabled: bool) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {enabled!r}")
        self.adapters_enabled = enabled

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.adapters_enabled:
            return self.original_module(*args, **kwargs)
        dtype = _input_dtype(args, kwargs)
        own = {k: t for k, t in self.trained_module.state_dict(keep_vars=True).items()}
        if dtype is None or all(not t.is_floating_point() or t.dtype == dtype for t in own.values()):
            return self.trained_module(*args, **kwargs)
        # float32 masters under a low-precision frozen base: computed in the input's dtype, the
        # gradients flowing back through the cast to the float32 tensors
        cast = {k: t.to(dtype) if t.is_floating_point() else t for k, t in own.items()}
        return torch.func.functional_call(self.trained_module, cast, args, kwargs)


def _input_dtype(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.dtype | None:
    """The dtype of the first floating tensor argument (None when there is none)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.dtype
    return None


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule ``name`` of ``model`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _owners(model: nn.Module, config: MultimodalConfig) -> dict[str, int]:
    """{module name: index of the rule that targets it}; a module claimed twice is an error."""
    owner: dict[str, int] = {}
    for i, rule in enumerate(config.rules):
        if is_all_linear(rule.targets):
            names = all_linear(model, config.modules_to_save)
        else:
            names = match_targets(model, rule.targets, method_of(rule).wraps)
        for n in names:
            if n in owner:
                raise ValueError(f"module {n} is targeted by rule {owner[n]} and rule {i}; each module takes one rule")
            owner[n] = i
    return owner


def apply_rules(
    model: nn.Module, config: MultimodalConfig, *, probe: bool = True, probe_size: tuple[int, int] | None = None
) -> list[str]:
    """Freeze ``model`` and swap the targeted modules in place; returns the wrapped names.

    ``probe``: first run the model's forward on a small input at batch 1 and 2
    (:mod:`mmpeft.targeting.probe`): a targeted module that is never called, or whose input does not carry
    the batch axis, is an error naming it; each layer gets its ``batch_factor``. Off (False) for a
    model whose forward takes other inputs: the layers then check dim 0 by divisibility only.
    ``probe_size``: the (H, W) of the dry run's input (default: :func:`mmpeft.targeting.probe.probe_input`).
    """
    if any(True for _ in multimodal_layers(model)) or any(isinstance(m, ModuleToSave) for m in model.modules()):
        raise ValueError(
            "this model is already wrapped by mmpeft; wrap the original model once. For another adapter set on "
            "the same frozen model use wrapped.add_adapter(name, ...) and wrapped.set_adapter(name)"
        )
    owner = _owners(model, config)
    check_targets_callable(model, list(owner))  # nothing inside an nn.MultiheadAttention
    factors: dict[str, int | None] = {}
    size: tuple[int, int] | None = None
    if probe and owner:
        size = probe_size or probe_input(model)
        factors = probe_batch_factors(model, sorted(owner), _probe_channels(model, config), size)
    model.requires_grad_(False)
    # deepest first, so a parent wrapper receives its already patched children
    for n in sorted(owner, key=lambda s: s.count("."), reverse=True):
        rule = config.rules[owner[n]]
        layer = method_of(rule).build(rule, model.get_submodule(n), n, config.modalities)
        layer.batch_factor = factors.get(n)
        layer.factor_size = tuple(size) if size is not None and n in factors else None
        set_submodule(model, n, layer)
    return sorted(owner)


def _probe_channels(model: nn.Module, config: MultimodalConfig) -> int:
    c = config.in_channels if config.in_channels is not None else infer_in_channels(model)
    if c is None:
        raise ProbeError(
            f"the wrap-time dry run cannot tell the input channels of {type(model).__name__} (no convolution): "
            "pass in_channels="
        )
    return c


def wrap_modules_to_save(model: nn.Module, targets: Targets, adapted: list[str]) -> list[str]:
    """Put a :class:`ModuleToSave` in place of every module ``targets`` selects; returns their names.

    A module that holds (or is) a multimodal layer cannot also train in full: error naming it.
    """
    names = match_targets(model, targets)
    names = [n for n in names if not any(n.startswith(o + ".") for o in names)]  # outermost only
    for n in names:
        inside = [a for a in adapted if a == n or a.startswith(n + ".") or n.startswith(a + ".")]
        if inside:
            raise ValueError(
                f"modules_to_save selects {n}, which holds or is inside the adapted module(s) {inside[:3]}: "
                "a module either trains in full or carries multimodal layers; narrow modules_to_save or targets"
            )
        set_submodule(model, n, ModuleToSave(model.get_submodule(n)))
    return names


def infer_in_channels(model: nn.Module) -> int | None:
    """The input channels of the model's patch embedding (its first convolution), or None."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and ("patch_embed" in name or name.endswith("proj")):
            return module.in_channels
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None
