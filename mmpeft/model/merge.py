"""Merging LoRA updates into weights, and switching adapters off (the wrapped model's methods).

For a LoRA layer with no cross-modal mixing, modality ``m`` computes
``y_m = W x_m + b + s B_m A_m x_m = (W + s B_m A_m) x_m + b``: its update is a weight
``W_m = W + s B_m A_m``. One frozen ``W`` is shared by every modality, so merging keeps one copy
``W_m`` per modality ((M, out, in): M times the layer's weight memory) and never writes ``W``
(unmerging restores it bit for bit). ``merge_and_unload(m)`` writes ``W_m`` into a plain model
for one modality. A mixing rule adds ``sum_k w_mk s B_k A_k x_k``, a function of the *other*
modalities' inputs, and an adapter puts a non-linearity between its projections: neither has a
weight form, and both are named with that reason. A ``lora_bias`` update ``s b_m`` (times DoRA's
``g_m``) merges into one bias per modality (``merged_bias``), and into the bias of the plain
model's module (made if it had none) on unloading.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..errors import MmpeftKeyError, MmpeftStateError
from ..runtime.blocks import runner_of, set_block_features
from ..targeting.inject import ModuleToSave, set_submodule
from ..tuners import MergeError, multimodal_layers

__all__ = ["set_enabled", "merge_layers", "unmerge_layers", "merge_and_unload", "unload", "check_usable"]


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn every multimodal layer and module to save of ``model`` on or off."""
    for module in model.modules():
        if isinstance(module, ModuleToSave):
            module.enable_adapters(enabled)
    for _, layer in multimodal_layers(model):
        layer.enable_adapters(enabled)


def _refusals(model: nn.Module) -> list[str]:
    return [f"{name}: {reason}" for name, layer in multimodal_layers(model) if (reason := layer.cannot_merge())]


def merge_layers(model: nn.Module) -> list[str]:
    """Merge every multimodal layer of ``model`` (all or none: refusals are raised first)."""
    refused = _refusals(model)
    if refused:
        raise MergeError(f"{len(refused)} layer(s) cannot merge: " + "; ".join(refused[:4]))
    names = []
    for name, layer in multimodal_layers(model):
        layer.merge()
        names.append(name)
    return names


def unmerge_layers(model: nn.Module) -> list[str]:
    names = []
    for name, layer in multimodal_layers(model):
        if layer.merged:
            layer.unmerge()
            names.append(name)
    return names


def _check_unloadable(wrapped: Any, modality: str) -> None:
    if modality not in wrapped.modalities:
        raise MmpeftKeyError(f"unknown modality {modality!r}; known: {list(wrapped.modalities)}")
    refused = _refusals(wrapped)
    if refused:
        raise MergeError(f"cannot unload: {len(refused)} layer(s) cannot merge: " + "; ".join(refused[:4]))
    stem = wrapped.stems[modality]
    if any(True for _ in stem.parameters()):
        raise MergeError(
            f"cannot unload modality {modality!r}: its stem ({stem.kind}) is learnable and lies outside the base "
            "model; a plain base model cannot compute it (feed the plain model wrapped.stems[modality](x))"
        )


@torch.no_grad()
def merge_and_unload(wrapped: Any, modality: str, inplace: bool = False) -> nn.Module:
    """The base model of ``wrapped`` (a copy unless ``inplace``) with every LoRA update of
    ``modality`` written into its weights, each module to save replaced by its trained copy and
    block features removed: the base class, no mmpeft module. Its input is the modality's input
    after the stem (the DSM repeated to 3 channels for the default stems)."""
    check_usable(wrapped)
    _check_unloadable(wrapped, modality)
    base = wrapped.base_model if inplace else copy.deepcopy(wrapped.base_model)
    if inplace:
        wrapped.unloaded = f"merge_and_unload({modality!r}, inplace=True)"
    for name, layer in list(multimodal_layers(base)):
        linear = layer.base_layer
        delta = layer.get_delta_weight(modality).to(linear.weight.device)
        delta_bias = layer.get_delta_bias(modality)  # before W is written (DoRA's scale reads it)
        linear.weight.copy_((linear.weight.float() + delta).to(linear.weight.dtype))
        _add_bias(linear, delta_bias)
        set_submodule(base, name, linear)
    _strip(base, trained=True)
    return base


def _add_bias(module: nn.Module, delta: torch.Tensor | None) -> None:
    """Fold a bias update ((out,) float32, ``lora_bias``) into ``module``'s bias (made if it has none)."""
    if delta is None:
        return
    w = module.weight
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros(delta.shape[0], device=w.device, dtype=w.dtype), requires_grad=False)
    module.bias.copy_((module.bias.float() + delta.to(w.device)).to(w.dtype))


def _strip(base: nn.Module, trained: bool) -> None:
    """Put back each module to save's trained copy (``trained``) or original; block features off."""
    for name, module in [(n, m) for n, m in base.named_modules() if isinstance(m, ModuleToSave)]:
        set_submodule(base, name, module.trained_module if trained else module.original_module)
    for module in base.modules():
        if runner_of(module) is not None:
            set_block_features(module, efficient=None, checkpoint=False)


def check_usable(wrapped: Any) -> None:
    """A RuntimeError when ``wrapped``'s base model was unloaded in place (its layers are gone)."""
    how = getattr(wrapped, "unloaded", None)
    if how is not None:
        raise MmpeftStateError(
            f"this wrapper's base model was taken out by {how}: its multimodal layers were replaced, so the "
            "wrapper can no longer run, save, merge or unload (it would compute with what that call left in the "
            "base model, for every modality). Use the model that call returned, or build a fresh wrapper: "
            "wrap_multimodal(new_base, ...) or load_multimodal(new_base, directory)"
        )


def unload(wrapped: Any) -> nn.Module:
    """peft's ``unload()``: the base model with every multimodal layer replaced by its frozen
    ``base_layer``, each module to save by its original and block features removed; nothing is
    merged. In place: the module objects the base model held before wrapping come back, with the
    ``requires_grad`` their parameters had (recorded at wrap time); ``wrapped`` is unusable after."""
    check_usable(wrapped)
    base = wrapped.base_model
    for name, layer in list(multimodal_layers(base)):
        set_submodule(base, name, layer.base_layer)
    _strip(base, trained=False)
    wrapped.unloaded = "unload()"
    flags = getattr(wrapped, "base_requires_grad", {})
    for name, p in base.named_parameters():
        p.requires_grad_(flags.get(name, False))
    return base
