"""``wrap_multimodal`` / ``load_multimodal``: patch a ViT for N modalities with shared frozen weights."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ..config import MultimodalConfig, RuleConfig, parse_stem
from ..errors import MmpeftTypeError, MmpeftValueError
from ..targeting.inject import _owners
from ..targeting.prepare import prepare_backbone
from ..targeting.selection import (
    PATTERN_FIELDS,
    SELECTION_OPTIONS,
    Selection,
    is_all_linear,
    resolve_rules,
)
from ..targeting.targets import detect_family, preset_rules
from ..tuners import METHODS, Method, get_method, method_of
from ..tuners.options import Targets
from ..utils import dtype_name, resolve_dtype
from .multimodal import MultimodalModel
from .saving import check_not_peft

__all__ = ["wrap_multimodal", "build_config", "plan_targets", "PlannedTarget", "load_multimodal", "save_multimodal"]

_MODEL_OPTIONS = ("stems", "in_channels", "modules_to_save")  # options of the wrapped model, any method


def _preset_method(preset: str, rules: list[RuleConfig], method: str | None) -> None:
    kinds = sorted({method_of(r).name for r in rules})
    if method is not None and kinds and kinds != [method]:
        raise MmpeftValueError(
            f"preset {preset!r} builds {'/'.join(kinds)} rules but method={method!r}; pass the preset of that "
            f"method (default {get_method(method).preset!r}) or leave method unset"
        )


def _check_options(options: Mapping[str, Any], methods: list[Method]) -> None:
    """Every option must be taken by each method of the rules it would change."""
    for key in options:
        takers = [m.name for m in METHODS.values() if key in m.options()]
        missing = [m.name for m in methods if key not in m.options()]
        if not takers:
            known = sorted({o for m in methods for o in m.options()} | set(_MODEL_OPTIONS) | set(SELECTION_OPTIONS))
            raise MmpeftTypeError(f"unknown option {key!r}; the options of {[m.name for m in methods]} are {known}")
        if missing:
            raise MmpeftTypeError(
                f"option {key!r} belongs to method {'/'.join(takers)}, not to {'/'.join(missing)}: it would be "
                f"ignored. The options of {missing[0]!r} are {get_method(missing[0]).options()}"
            )


def _override(rule: RuleConfig, options: Mapping[str, Any], explicit: bool) -> RuleConfig:
    updates = {k: v for k, v in options.items() if v is not None}
    if not explicit:  # presets fix where adapters go and which outputs LoRA updates
        fixed = [k for k in ("placement", "slices", "split") if k in updates and updates[k] != getattr(rule, k, None)]
        if fixed:
            raise MmpeftValueError(
                f"the preset fixes {fixed} (a rule on {rule.targets!r} has "
                + ", ".join(f"{k}={getattr(rule, k, None)!r}" for k in fixed)
                + "); pass targets= to choose them yourself"
            )
        updates = {k: v for k, v in updates.items() if k not in ("placement", "slices", "split")}
        # the fusion option sets the rule of the mixing parts; "none" disables all mixing
        if rule.fusion == "none" and updates.get("fusion") not in (None, "none"):
            updates.pop("fusion")
        if updates.get("fusion", rule.fusion) == "none":  # lambda_init sets the mixing parts' rules
            updates.pop("lambda_init", None)
    return type(rule)(**{**rule.__dict__, **updates})


def _check_lambda(rules: list[RuleConfig], options: Mapping[str, Any]) -> None:
    """``lambda_init`` with a preset none of whose rules mix would change nothing: an error."""
    if options.get("lambda_init") is not None and rules and all(r.fusion == "none" for r in rules):
        raise MmpeftValueError(
            f"lambda_init={options['lambda_init']!r}: every rule of this wrap has fusion='none' (no fusion "
            "parameters), so lambda_init would change nothing; drop it or choose a preset that mixes ('mmlora')"
        )


def _lora_only(sel: Selection, methods: list[Method]) -> None:
    for option, f in PATTERN_FIELDS.items():
        lacking = [m.name for m in methods if getattr(sel, option) and f not in m.options()]
        if lacking:
            takers = [m.name for m in METHODS.values() if f in m.options()]
            raise MmpeftTypeError(
                f"option {option!r} sets the {f!r} of {'/'.join(takers)} rules; method {lacking[0]!r} has no {f!r}"
            )


def _planned(model: nn.Module, in_place: bool) -> nn.Module:
    """``model`` as it will be wrapped (:func:`mmpeft.targeting.prepare.prepare_backbone` changes the
    names of an ``nn.MultiheadAttention``'s projections): prepared in place, or a prepared copy."""
    if not any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        return model
    view = model if in_place else copy.deepcopy(model)
    prepare_backbone(view)
    return view


def _rules(
    model: nn.Module, method: str | None, preset: str | None, targets: Targets | None
) -> tuple[list[RuleConfig], str | None]:
    if method is not None:
        get_method(method)
    if targets is not None:
        if preset is not None:
            raise MmpeftValueError("pass either preset= or targets=, not both")
        return [get_method(method or "lora").config(targets=targets)], None
    preset = preset or get_method(method or "lora").preset
    rules = preset_rules(preset, detect_family(model))
    _preset_method(preset, rules, method)
    return rules, preset


def _build(
    model: nn.Module,
    modalities: Sequence[str],
    method: str | None,
    preset: str | None,
    targets: Targets | None,
    base_dtype: torch.dtype | str | None,
    options: dict[str, Any],
    in_place: bool,
) -> MultimodalConfig:
    model_opts = {k: options.pop(k) for k in _MODEL_OPTIONS if k in options}
    sel = Selection.pop(options)
    rules, preset = _rules(model, method, preset, targets)
    methods = (
        [get_method(method)]
        if method is not None and not rules
        else sorted({method_of(r).name: method_of(r) for r in rules}.values(), key=lambda m: m.name)
    )
    if not rules and (options or sel.given()):
        given = sorted(options) + sel.given()
        raise MmpeftTypeError(f"preset {preset!r} adapts no module, so the options {given} would change nothing")
    _check_options(options, methods or [get_method("lora")])
    _lora_only(sel, methods or [get_method("lora")])
    rules = [_override(r, options, explicit=targets is not None) for r in rules]
    _check_lambda(rules, options)
    if sel.given() or any(is_all_linear(r.targets) for r in rules):
        rules = resolve_rules(_planned(model, in_place), rules, sel, model_opts.get("modules_to_save"))
    stems = {k: parse_stem(v, k) for k, v in (model_opts.get("stems") or {}).items()}
    return MultimodalConfig(
        list(modalities),
        rules,
        stems,
        model_opts.get("in_channels"),
        preset,
        model_opts.get("modules_to_save"),
        dtype_name(resolve_dtype(base_dtype)),
    )


def build_config(
    model: nn.Module,
    modalities: Sequence[str] = ("optical", "dsm"),
    method: str | None = None,
    *,
    preset: str | None = None,
    targets: Targets | None = None,
    base_dtype: torch.dtype | str | None = None,
    **options: Any,
) -> MultimodalConfig:
    """The :class:`MultimodalConfig` ``wrap_multimodal`` would use (see its arguments); ``model``
    is not changed. With ``"all-linear"`` or a selection option the rules name their modules."""
    return _build(model, modalities, method, preset, targets, base_dtype, dict(options), in_place=False)


def _config_of(
    model: nn.Module,
    modalities: Sequence[str],
    method: str | None,
    preset: str | None,
    targets: Targets | None,
    config: MultimodalConfig | None,
    base_dtype: torch.dtype | str | None,
    options: dict[str, Any],
) -> MultimodalConfig:
    """``config`` as given, else built from the other arguments (the model may be prepared in place)."""
    check_not_peft(model)
    if config is None:
        return _build(model, modalities, method, preset, targets, base_dtype, dict(options), in_place=True)
    if options or targets is not None or preset is not None or method is not None or base_dtype is not None:
        raise MmpeftValueError("pass either config= or method/options/targets/preset/base_dtype, not both")
    return config


class PlannedTarget(NamedTuple):
    """One module a wrap would patch: its name, the method and the rule's options."""

    name: str
    method: str
    options: dict[str, Any]


def plan_targets(
    model: nn.Module,
    modalities: Sequence[str] = ("optical", "dsm"),
    method: str | None = None,
    *,
    config: MultimodalConfig | None = None,
    preset: str | None = None,
    targets: Targets | None = None,
    base_dtype: torch.dtype | str | None = None,
    **options: Any,
) -> list[PlannedTarget]:
    """The modules ``wrap_multimodal`` called with the same arguments would patch, in the model's
    order, without changing ``model`` (a dry run): ``[(name, method, {option: value})]``."""
    view = _planned(model, in_place=False)
    config = _config_of(view, modalities, method, preset, targets, config, base_dtype, options)
    owner = _owners(view, config)
    rules = config.rules
    return [
        PlannedTarget(
            n, rules[owner[n]].kind, {k: v for k, v in rules[owner[n]].__dict__.items() if k not in ("targets", "kind")}
        )
        for n, _ in view.named_modules()
        if n in owner
    ]


def wrap_multimodal(
    model: nn.Module,
    modalities: Sequence[str] = ("optical", "dsm"),
    method: str | None = None,
    *,
    preset: str | None = None,
    targets: Targets | None = None,
    config: MultimodalConfig | None = None,
    efficient_attention: bool | str = True,
    base_dtype: torch.dtype | str | None = None,
    probe: bool | tuple[int, int] = True,
    autocast_adapter_dtype: bool = True,
    **options: Any,
) -> MultimodalModel:
    """Freeze ``model`` and patch it for ``modalities`` with multimodal LoRA or adapters.

    Args:
        model: any ViT (segment-anything ``ImageEncoderViT``, timm ViTs, or your own).
        modalities: modality names, in the order they are stacked on the batch axis.
        method: a registered method, ``"lora"`` (default) or ``"adapter"``. Without ``targets``
            the method's paper placement is used (preset "mmlora" / "mmadapter"), detected from
            the model; with ``preset`` the method is the preset's (a different one is an error).
        preset: one of :data:`mmpeft.targeting.targets.PRESETS` ("mmlora", "mmadapter", "lora", "adapter",
            "mmadapter_authors", ...).
        targets: modules to patch instead of a preset: a list of names (suffix match), a regex, or
            ``"all-linear"`` (peft's shorthand: every ``nn.Linear`` but the output head, see
            :func:`mmpeft.targeting.selection.all_linear`).
        config: a complete :class:`MultimodalConfig` (overrides everything else).
        efficient_attention: run SAM-style blocks (segment-anything, timm's SAM) without work on
            window padding and with fused attention (:mod:`mmpeft.runtime.attention`; same outputs).
            ``True`` chooses the attention calls per device at run time (``"auto"``); ``"real"``
            or ``"all"`` force one (see :func:`mmpeft.runtime.attention.enable_efficient_attention`).
        probe: first run the model on a small random input at batch 1 and 2 (:mod:`mmpeft.targeting.probe`):
            a targeted module never called, or whose input does not carry the batch axis (a
            position table), is an error naming it. ``(H, W)``: the dry run's input size (default:
            read off the model, else 224); ``False`` for a model whose forward takes no image batch.
        base_dtype: keep the frozen weights in this dtype (``torch.bfloat16`` or ``"bf16"``; inputs
            cast to it, trainable tensors float32 masters; recorded in the config); a base in bf16 /
            fp16 or ``.to(dtype)`` alike (:mod:`mmpeft.model.precision`).
        autocast_adapter_dtype: trainable tensors float32 on a bf16 / fp16 base (peft's); False: the base's dtype.
        **options: the method's options, i.e. its config's fields (:class:`LoRAConfig`: ``rank``,
            ``alpha``, ``dropout``, ``slices``, ``split``, and peft's variants ``use_rslora``,
            ``init_lora_weights``, ``lora_bias``, ``use_dora`` (docs/peft.md); on ``nn.Linear``
            and ``nn.Conv2d`` modules; :class:`AdapterConfig`: ``placement``,
            ``ratio``, ``activation``, ``bias``, ``dropout``, ``scale``, ``init``; both:
            ``fusion``, ``lambda_init``); an option the method does not take is an error naming
            it. For the model: ``stems`` ({modality: "repeat" | ("conv1x1", c) | StemConfig}),
            ``in_channels`` (inferred from the first conv by default) and ``modules_to_save``
            (modules that train in full and are saved with the adapters: names or a regex).
            Selection, as peft (narrowing a preset too; see :mod:`mmpeft.targeting.selection`, and
            :func:`plan_targets` for a dry run): ``exclude`` (names or a regex), ``layers`` (block
            indices), ``layers_pattern`` (block list names, default "blocks", "layers", "layer")
            and, for LoRA, ``rank_pattern`` / ``alpha_pattern`` ({key: value}, a key matching the
            end of a module name). An option that would change nothing is an error naming it.

    Returns:
        A :class:`MultimodalModel`; call it with ``{modality: tensor}`` or a sequence.
    """
    config = _config_of(model, modalities, method, preset, targets, config, base_dtype, options)
    return MultimodalModel.from_config(model, config, efficient_attention, probe, autocast_adapter_dtype)


MultimodalModel.build_set_config = staticmethod(_config_of)  # add_adapter's options (adapter_sets)


def load_multimodal(
    base_model: nn.Module,
    directory: str | os.PathLike,
    *,
    is_trainable: bool = False,
    strict: bool = True,
    **options: Any,
) -> MultimodalModel:
    """:meth:`MultimodalModel.from_pretrained`: for inference (eval mode, frozen) unless
    ``is_trainable``; ``options``: its ``efficient_attention``, ``probe``, ``autocast_adapter_dtype``."""
    return MultimodalModel.from_pretrained(base_model, directory, is_trainable=is_trainable, strict=strict, **options)


def save_multimodal(wrapped: MultimodalModel, directory: str | os.PathLike) -> None:
    """:meth:`MultimodalModel.save_pretrained`."""
    wrapped.save_pretrained(directory)
