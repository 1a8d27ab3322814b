"""Wrap-time changes to the host model: the rules' layers swapped in, ``modules_to_save`` copies.

:func:`apply_rules` freezes the model and replaces every targeted module by its method's layer
(:data:`mmpeft.tuners.METHODS`); :func:`wrap_modules_to_save` puts a :class:`ModuleToSave` in
place of each module that trains in full. Both change the model in place.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import MultimodalConfig
from ..errors import MmpeftTypeError, MmpeftValueError
from ..tuners import method_of, multimodal_layers
from ..tuners.adapter import AdapterConfig, build_adapter
from ..tuners.options import Targets
from ..utils import listing
from .attention_trace import AttentionTrace
from .coverage import warn_uncovered_attention
from .inputs import infer_in_channels
from .prepare import check_targets_callable
from .probe import ProbeError, ProbeWarning, dry_run, probe_batch_factors, probe_input
from .selection import all_linear, is_all_linear
from .structure import warn_structural
from .targets import match_targets

__all__ = [
    "ModuleToSave",
    "Placement",
    "apply_rules",
    "place_rules",
    "infer_in_channels",
    "rule_owners",
    "set_submodule",
    "wrap_modules_to_save",
]


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
            raise MmpeftTypeError(f"enabled must be a bool, got {enabled!r}")
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


def rule_owners(model: nn.Module, config: MultimodalConfig) -> dict[str, int]:
    """{module name: index of the rule that targets it}; a module claimed twice is an error."""
    owner: dict[str, int] = {}
    for i, rule in enumerate(config.rules):
        if is_all_linear(rule.targets):
            names = all_linear(model, config.modules_to_save)
        else:
            names = match_targets(model, rule.targets, method_of(rule).wraps)
        for n in names:
            if n in owner:
                raise MmpeftValueError(
                    f"module {n} is targeted by rule {owner[n]} and rule {i}; each module takes one rule"
                )
            owner[n] = i
    return owner


@dataclass
class Placement:
    """Where and how a wrap patches a model, decided before any module is replaced: ``rules``
    {module name: its rule, options as applied}, deepest module first; ``factors`` and ``widths``
    from the dry run (empty without it), ``size`` its (H, W)."""

    rules: dict[str, Any]
    factors: dict[str, int | None] = field(default_factory=dict)
    widths: dict[str, int | None] = field(default_factory=dict)
    size: tuple[int, int] | None = None


def place_rules(
    model: nn.Module,
    config: MultimodalConfig,
    *,
    probe: bool = True,
    probe_size: tuple[int, int] | None = None,
    in_channels: int | None = None,
) -> Placement:
    """Every check and placement decision of :func:`apply_rules` (its arguments), with ``model``
    left as it is: ``plan_targets`` shows exactly this."""
    if probe_size is not None and not probe:
        raise MmpeftValueError(
            f"probe_size={probe_size!r} needs probe=True (the size is the dry run's; with probe=False none runs)"
        )
    if any(True for _ in multimodal_layers(model)) or any(isinstance(m, ModuleToSave) for m in model.modules()):
        raise MmpeftValueError(
            "this model is already wrapped by mmpeft; wrap the original model once. For another adapter set on "
            "the same frozen model use wrapped.add_adapter(name, ...) and wrapped.set_adapter(name)"
        )
    owner = rule_owners(model, config)
    if config.preset is not None:
        owner = _without_nested(config, _without_identities(model, owner))
    check_targets_callable(model, list(owner))  # nothing inside an nn.MultiheadAttention
    placement = Placement({})
    trace = AttentionTrace(model) if config.preset is not None else None  # attention left bare is named
    if probe and owner:
        channels = in_channels or _probe_channels(model, config, probe_size)
        placement.size = probe_size or probe_input(model, channels)
        probed = dry_run(model, sorted(owner), channels, placement.size, trace=trace)
        placement.factors = probe_batch_factors(
            model, sorted(owner), channels, placement.size, config.preset is not None, probed
        )
        owner = {n: i for n, i in owner.items() if n in placement.factors}
        placement.widths = {n: r.width for n, r in probed.items()}
    if trace is not None:
        trace.close()
        warn_uncovered_attention(model, owner, trace.found)
    rules = _kv_only(model, config, owner)
    placement.rules = {n: rules[n] for n in sorted(owner, key=lambda s: s.count("."), reverse=True)}
    return placement


def apply_rules(
    model: nn.Module,
    config: MultimodalConfig,
    *,
    probe: bool = True,
    probe_size: tuple[int, int] | None = None,
    in_channels: int | None = None,
) -> list[str]:
    """Freeze ``model`` and swap the targeted modules in place; returns the wrapped names.

    ``probe``: first run the model's forward on shapes only at batch 1 and 2
    (:mod:`mmpeft.targeting.probe`): a targeted module that is never called is an error naming
    it; one whose input does not carry the batch axis is an error naming it, or, when the rules
    come from a preset (the default selection), left out with a warning naming it; each layer gets
    its ``batch_factor`` and an "after" adapter its width from the module's output. Off (False)
    for a model whose forward takes other inputs: the layers then check dim 0 by divisibility
    only. ``probe_size``: the (H, W) of the dry run's input (default: the model's own,
    :func:`mmpeft.targeting.inputs.choose_size`). ``in_channels``: the input channels when the
    caller already read them (default: ``config.in_channels``, else read off the model).
    """
    placement = place_rules(model, config, probe=probe, probe_size=probe_size, in_channels=in_channels)
    # all or nothing: every layer is built (and so checked) around the module as given before the
    # first one is put in place; a refusal leaves the model untouched
    layers = {n: _build_layer(model, rule, n, config, placement.widths.get(n)) for n, rule in placement.rules.items()}
    model.requires_grad_(False)
    # deepest first: a child goes into its parent (the module object a parent's layer holds) while
    # the path to it is still the model's own
    size = placement.size
    for n, layer in layers.items():
        layer.batch_factor = placement.factors.get(n)
        layer.factor_size = tuple(size) if size is not None and n in placement.factors else None
        set_submodule(model, n, layer)
    return sorted(layers)


def _kv_only(model: nn.Module, config: MultimodalConfig, owner: dict[str, int]) -> dict[str, Any]:
    """Each target's rule; a preset's q / v slices of a fused q/k/v projection become the v half where
    the projection holds only keys and values (``out = 2 x in``: GCViT's global-query blocks, whose
    query comes from outside the block), and the whole projection where it is a convolution
    (CoAtNet's 1x1 ``qkv``), each said in a warning naming them."""
    rules: dict[str, Any] = {n: config.rules[i] for n, i in owner.items()}
    if config.preset is None:  # explicit slices are the user's: a misfit is refused by the layer
        return rules
    kv, convs = [], []
    for n, rule in rules.items():
        module = model.get_submodule(n)
        sliced = getattr(rule, "slices", None) and list(rule.split) == ["q", "k", "v"] and "v" in rule.slices
        if sliced and isinstance(module, nn.Conv2d):  # CoAtNet's 1x1 qkv: a Conv2d LoRA takes no slices
            rules[n] = type(rule)(**{**rule.__dict__, "slices": None})
            convs.append(n)
        elif sliced and isinstance(module, nn.Linear) and module.out_features == 2 * module.in_features:
            rules[n] = type(rule)(**{**rule.__dict__, "slices": ["v"], "split": ["k", "v"]})
            kv.append(n)
    if convs:
        warn_structural(
            f"{len(convs)} fused q/k/v projection(s) the preset cuts into q / v slices are convolutions, which a "
            f"Conv2d LoRA takes whole: LoRA on all their outputs (q, k and v): {convs[:4]}"
            f"{' ...' if len(convs) > 4 else ''}. Pass targets= to choose otherwise"
        )
    if kv:
        warn_structural(
            f"{len(kv)} projection(s) the preset cuts into q / v slices hold only keys and values (out = 2 x in; "
            f"the query comes from outside, as GCViT's global query): LoRA on their v half, none on the external "
            f"query: {kv[:4]}{' ...' if len(kv) > 4 else ''}. Pass targets= to choose otherwise"
        )
    return rules


def _without_identities(model: nn.Module, owner: dict[str, int]) -> dict[str, int]:
    """A preset's targets but the ``nn.Identity`` placeholders its names also match (timm MobileViT's
    convolutional blocks have an ``attn = nn.Identity()``): left out with a warning naming them."""
    idle = [n for n in owner if isinstance(model.get_submodule(n), nn.Identity)]
    if idle and len(idle) < len(owner):
        warn_structural(
            f"left out {len(idle)} nn.Identity placeholder(s) the preset's names match, which compute nothing to "
            f"adapt: {listing(idle)}. Pass targets= to choose modules yourself",
            ProbeWarning,
        )
    return {n: i for n, i in owner.items() if n not in idle} if len(idle) < len(owner) else owner


def _without_nested(config: MultimodalConfig, owner: dict[str, int]) -> dict[str, int]:
    """A preset's targets but those inside a module an adapter wraps whole (VOLO's outlook attention
    ``attn`` holds a linear also named ``attn``): left out with a warning naming them."""
    wrapped = [n for n, i in owner.items() if isinstance(config.rules[i], AdapterConfig)]
    inner = [n for n in owner if any(n.startswith(a + ".") for a in wrapped)]
    if inner:
        warn_structural(
            f"left out {len(inner)} module(s) the preset's names match inside a module an adapter already wraps: "
            f"{listing(inner)}. Pass targets= to choose modules yourself",
            ProbeWarning,
        )
    return {n: i for n, i in owner.items() if n not in inner}


def _build_layer(model: nn.Module, rule: Any, name: str, config: MultimodalConfig, width: int | None) -> nn.Module:
    """The rule's layer around ``name``; an "after" adapter as wide as the output the dry run saw."""
    module = model.get_submodule(name)
    if isinstance(rule, AdapterConfig) and rule.placement == "after" and width is not None:
        outs = {m.out_features for m in module.modules() if isinstance(m, nn.Linear)}
        if outs and width not in outs:
            raise MmpeftValueError(
                f"cannot put an 'after' adapter on {name} ({type(module).__name__}): its output's last axis has "
                f"{width} entries, the output width of none of its nn.Linear layers {sorted(outs)}, so its channels "
                "are not on the last axis (a (N, C, H, W) map?); target a module whose output is (..., C)"
            )
        return build_adapter(rule, module, name, config.modalities, width=width)
    return method_of(rule).build(rule, module, name, config.modalities)


def _probe_channels(model: nn.Module, config: MultimodalConfig, size: tuple[int, int] | None) -> int:
    c = config.in_channels if config.in_channels is not None else infer_in_channels(model, size)
    if c is None:
        raise ProbeError(
            f"the wrap-time dry run cannot tell the input channels of {type(model).__name__} (its forward calls "
            "no convolution or linear layer on the input): pass in_channels="
        )
    return c


def check_saved_apart(model: nn.Module, targets: Targets, adapted: list[str]) -> list[str]:
    """The outermost modules ``targets`` (``modules_to_save``) selects; an error naming the first
    that holds, is, or is inside one of the ``adapted`` modules (a module either trains in full or
    carries multimodal layers). Changes nothing."""
    names = match_targets(model, targets)
    names = [n for n in names if not any(n.startswith(o + ".") for o in names)]  # outermost only
    for n in names:
        inside = [a for a in adapted if a == n or a.startswith(n + ".") or n.startswith(a + ".")]
        if inside:
            raise MmpeftValueError(
                f"modules_to_save selects {n}, which holds or is inside the adapted module(s) {inside[:3]}: "
                "a module either trains in full or carries multimodal layers; narrow modules_to_save or targets"
            )
    return names


def wrap_modules_to_save(model: nn.Module, targets: Targets, adapted: list[str]) -> list[str]:
    """Put a :class:`ModuleToSave` in place of every module ``targets`` selects; returns their names.

    A module that holds (or is) a multimodal layer cannot also train in full: error naming it
    (:func:`check_saved_apart`, before any is placed).
    """
    names = check_saved_apart(model, targets, adapted)
    for n in names:
        set_submodule(model, n, ModuleToSave(model.get_submodule(n)))
    return names
