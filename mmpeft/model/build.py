"""One build path: wrap arguments parsed once (:class:`WrapOptions`), then a :class:`MultimodalConfig`.

``wrap_multimodal``, ``build_config``, ``plan_targets`` and ``MultimodalModel.add_adapter`` take
the same arguments: ``modalities``, ``method``, ``preset``, ``targets``, ``config``, ``base_dtype``
and ``**options``. :meth:`WrapOptions.from_kwargs` parses them once, at the entrance and before
the model is read: the options split into the method's (``rank``, ``placement``, ...), the
model's (:class:`ModelOptions`: ``stems``, ``in_channels``, ``modules_to_save``) and the
selection (:class:`~mmpeft.targeting.selection.Selection`), each checked. :meth:`WrapOptions.resolve`
then reads the model (its family, its modules) and returns the config: the rules of the preset or
of ``targets``, overridden by the method's options and restricted by the selection. A converter
(peft's ``LoraConfig``) produces a :class:`WrapOptions` through :meth:`WrapOptions.from_kwargs`.

Below the model class: :mod:`mmpeft.model.adapter_sets` and :mod:`mmpeft.model.wrap` import it.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import MultimodalConfig, RuleConfig, StemConfig, parse_stem
from ..errors import MmpeftTypeError, MmpeftValueError
from ..targeting.peft_config import peft_arguments
from ..targeting.prepare import prepare_backbone
from ..targeting.selection import PATTERN_FIELDS, SELECTION_OPTIONS, Selection, is_all_linear, resolve_rules
from ..targeting.targets import detect_family, preset_rules
from ..tuners import METHODS, Method, get_method, method_of
from ..tuners.options import Targets
from ..utils import check_modalities, dtype_name, resolve_dtype
from .saving import check_not_peft

__all__ = [
    "DEFAULT_ADAPTER",
    "DEFAULT_MODALITIES",
    "MODEL_OPTIONS",
    "ModelOptions",
    "WrapOptions",
    "check_set_name",
    "planned",
]

DEFAULT_ADAPTER = "default"  # peft's name of the first set
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")  # a folder name of its own (saved per set)


def check_set_name(name: object) -> str:
    """An adapter set's name: a folder name of its own (the set is saved in ``dir/<name>``), not
    ``"__base__"`` (peft's name for "adapters off" in ``adapter_names=``). Checked at the entrance
    of every call that names a set, before anything is built."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise MmpeftValueError(f"adapter_name must be a folder name (letters, digits, '_', '-', '.'), got {name!r}")
    if name == "__base__":
        raise MmpeftValueError(
            "adapter_name '__base__' is peft's name for 'adapters off' in adapter_names=; pick another"
        )
    return name


#: the modalities of a wrap given neither ``modalities`` nor ``config=``
DEFAULT_MODALITIES = ("optical", "dsm")
#: options of the wrapped model, whatever the method
MODEL_OPTIONS = ("stems", "in_channels", "modules_to_save")
_SHARED = ("in_channels", "modules_to_save", "base_dtype")  # the model's, shared by every adapter set
_FIXED = ("placement", "slices", "split")  # what a preset fixes: where adapters go, which outputs LoRA updates


@dataclass(frozen=True)
class ModelOptions:
    """The wrapped model's options (any method); None / empty: not given.

    Attributes:
        stems: ``{modality: StemConfig}`` from ``stems=`` (its short forms parsed).
        in_channels: the channels the base model expects (None: read off its first layer).
        modules_to_save: modules that train in full and are saved with the adapters.
    """

    stems: dict[str, StemConfig] = field(default_factory=dict)
    in_channels: int | None = None
    modules_to_save: Targets | None = None

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> ModelOptions:
        """The model's options among ``options`` (other keys ignored), the stems' short forms read."""
        stems = options.get("stems") or {}
        if not isinstance(stems, Mapping):
            raise MmpeftTypeError(f"stems must be a {{modality: stem}} dict, got {stems!r}")
        parsed = {k: parse_stem(v, k) for k, v in stems.items()}
        return cls(parsed, options.get("in_channels"), options.get("modules_to_save"))


@dataclass(frozen=True)
class WrapOptions:
    """The arguments of a wrap, parsed (see the module docstring); built by :meth:`from_kwargs`.

    Attributes:
        modalities: modality names, in stacked order.
        method, preset, targets: as ``wrap_multimodal`` takes them (checked: a known method, not
            both ``preset`` and ``targets``).
        config: a complete config (then every other field is left at its default).
        base_dtype: the frozen weights' dtype, by name (``"bfloat16"``; None: as built).
        method_options: the method's options (its config's fields), checked against the rules'
            methods by :meth:`resolve`.
        model: the wrapped model's options.
        selection: the selection options (``exclude``, ``layers``, patterns).
        adapter_name: the set's name (the ``adapter_name=`` option, peft's; checked).
        inference_mode: a peft ``LoraConfig(inference_mode=True)`` was given: the set's tensors frozen.

    A peft ``LoraConfig`` as ``method`` (or ``peft_config=``) is translated here, for every entry
    point alike (:func:`mmpeft.targeting.peft_config.peft_arguments`).
    """

    modalities: tuple[str, ...]
    method: str | None = None
    preset: str | None = None
    targets: Targets | None = None
    config: MultimodalConfig | None = None
    base_dtype: str | None = None
    method_options: Mapping[str, Any] = field(default_factory=dict)
    model: ModelOptions = field(default_factory=ModelOptions)
    selection: Selection = field(default_factory=Selection)
    adapter_name: str = DEFAULT_ADAPTER
    inference_mode: bool = False

    @classmethod
    def from_kwargs(
        cls,
        modalities: Sequence[str] | None = None,
        method: str | None = None,
        *,
        preset: str | None = None,
        targets: Targets | None = None,
        config: MultimodalConfig | None = None,
        base_dtype: torch.dtype | str | None = None,
        **options: Any,
    ) -> WrapOptions:
        """Parse ``wrap_multimodal``'s arguments; an error names the argument at fault. ``modalities``
        None: ``config.modalities`` with ``config=`` (other modalities beside it are an error), else
        :data:`DEFAULT_MODALITIES`."""
        name = check_set_name(options.pop("adapter_name", DEFAULT_ADAPTER))  # peft's name of the set
        method, targets, options, frozen = peft_arguments(method, preset, targets, config, options)  # a LoraConfig
        if config is not None:
            if options or targets is not None or preset is not None or method is not None or base_dtype is not None:
                raise MmpeftValueError("pass either config= or method/options/targets/preset/base_dtype, not both")
            if modalities is not None and check_modalities(modalities) != list(config.modalities):
                raise MmpeftValueError(
                    f"modalities={list(modalities)} but config.modalities={list(config.modalities)}: the config "
                    "decides them; leave modalities out (or build a config for these modalities)"
                )
            return cls(tuple(config.modalities), config=config, adapter_name=name, inference_mode=frozen)
        names = tuple(check_modalities(DEFAULT_MODALITIES if modalities is None else modalities))
        if method is not None:
            get_method(method)
        if targets is not None and preset is not None:
            raise MmpeftValueError("pass either preset= or targets=, not both")
        rest = {k: v for k, v in options.items() if k not in (*MODEL_OPTIONS, *SELECTION_OPTIONS)}
        return cls(
            names,
            method,
            preset,
            targets,
            base_dtype=dtype_name(resolve_dtype(base_dtype)),
            method_options=rest,
            model=ModelOptions.parse(options),
            selection=Selection.parse(options),
            adapter_name=name,
            inference_mode=frozen,
        )

    @classmethod
    def for_set(
        cls,
        model_config: MultimodalConfig,
        method: str | None = None,
        *,
        preset: str | None = None,
        targets: Targets | None = None,
        config: MultimodalConfig | None = None,
        **options: Any,
    ) -> WrapOptions:
        """``add_adapter``'s arguments for a model wrapped with ``model_config``: ``in_channels``,
        ``modules_to_save`` and ``base_dtype`` are the model's (another value is an error), the
        stems default to the model's. A peft ``LoraConfig`` is translated first (its fields compared so)."""
        method, targets, options, frozen = peft_arguments(method, preset, targets, config, options)
        if options.get("base_dtype") is not None:  # torch.float32 / "fp32" / "float32": one dtype, by name
            options["base_dtype"] = dtype_name(resolve_dtype(options["base_dtype"]))
        for key in _SHARED:
            if key in options and options[key] != getattr(model_config, key):
                raise MmpeftValueError(
                    f"{key}={options[key]!r}: {key} is the model's ({getattr(model_config, key)!r}), shared by every "
                    "adapter set; add_adapter cannot change it (wrap a fresh base model for another)"
                )
            options.pop(key, None)
        if config is not None:
            parsed = cls.from_kwargs(method=method, preset=preset, targets=targets, config=config, **options)
            mine = {"modalities": list(model_config.modalities), **{k: getattr(model_config, k) for k in _SHARED}}
            theirs = {"modalities": list(config.modalities), **{k: getattr(config, k) for k in _SHARED}}
            if theirs != mine:
                raise MmpeftValueError(f"config= must share the model's {mine} (every set's); it has {theirs}")
            return dataclasses.replace(parsed, inference_mode=frozen)
        stems = {m: dataclasses.replace(model_config.stem(m)) for m in model_config.modalities}
        shared = {k: getattr(model_config, k) for k in _SHARED}
        given = options.get("stems") or {}
        options["stems"] = {**stems, **given} if isinstance(given, Mapping) else given  # else refused by parse
        parsed = cls.from_kwargs(model_config.modalities, method, preset=preset, targets=targets, **shared, **options)
        return dataclasses.replace(parsed, inference_mode=frozen)

    def resolve(self, model: nn.Module, in_place: bool = False) -> MultimodalConfig:
        """The config of a wrap of ``model`` (:attr:`config` when given). ``in_place``: ``model`` may
        be prepared (:func:`planned`) in place to resolve the selection, else a copy is."""
        check_not_peft(model)
        if self.config is not None:
            return self.config
        rules, preset = self._rules(model)
        rules = _checked_rules(self, rules, preset)
        sel = self.selection
        if sel.given() or any(is_all_linear(r.targets) for r in rules):
            rules = resolve_rules(planned(model, in_place), rules, sel, self.model.modules_to_save)
        return MultimodalConfig(
            modalities=list(self.modalities),
            rules=rules,
            stems=dict(self.model.stems),
            in_channels=self.model.in_channels,
            preset=preset,
            modules_to_save=self.model.modules_to_save,
            base_dtype=self.base_dtype,
        )

    def _rules(self, model: nn.Module) -> tuple[list[RuleConfig], str | None]:
        """The rules before the options: one rule on ``targets``, or the preset's for the model's family."""
        if self.targets is not None:
            return [get_method(self.method or "lora").config(targets=self.targets)], None
        preset = self.preset or get_method(self.method or "lora").preset
        rules = preset_rules(preset, detect_family(model))
        kinds = sorted({method_of(r).name for r in rules})
        if self.method is not None and kinds and kinds != [self.method]:
            raise MmpeftValueError(
                f"preset {preset!r} builds {'/'.join(kinds)} rules but method={self.method!r}; pass the preset of "
                f"that method (default {get_method(self.method).preset!r}) or leave method unset"
            )
        return rules, preset


def _checked_rules(opts: WrapOptions, rules: list[RuleConfig], preset: str | None) -> list[RuleConfig]:
    """``rules`` with the method's options applied, every option checked to take effect."""
    options, sel = opts.method_options, opts.selection
    if rules:
        methods = sorted({method_of(r).name: method_of(r) for r in rules}.values(), key=lambda m: m.name)
    else:
        methods = [get_method(opts.method or "lora")]
        if options or sel.given():
            given = sorted(options) + sel.given()
            raise MmpeftTypeError(f"preset {preset!r} adapts no module, so the options {given} would change nothing")
    _check_options(options, methods)
    _check_patterns(sel, methods)
    rules = [_override(r, options, explicit=opts.targets is not None) for r in rules]
    if options.get("fusion") not in (None, "none") and rules and all(r.fusion == "none" for r in rules):
        raise MmpeftValueError(
            f"fusion={options['fusion']!r}: preset {preset!r} mixes no modalities (every rule has fusion='none'), "
            "so fusion would change nothing; drop it, choose a preset that mixes ('mmlora') or pass targets="
        )
    if options.get("lambda_init") is not None and rules and all(r.fusion == "none" for r in rules):
        raise MmpeftValueError(
            f"lambda_init={options['lambda_init']!r}: every rule of this wrap has fusion='none' (no fusion "
            "parameters), so lambda_init would change nothing; drop it or choose a preset that mixes ('mmlora')"
        )
    return rules


def _check_options(options: Mapping[str, Any], methods: list[Method]) -> None:
    """Every option must be taken by each method of the rules it would change."""
    for key in options:
        takers = [m.name for m in METHODS.values() if key in m.options()]
        missing = [m.name for m in methods if key not in m.options()]
        if not takers:
            known = sorted({o for m in methods for o in m.options()} | set(MODEL_OPTIONS) | set(SELECTION_OPTIONS))
            raise MmpeftTypeError(f"unknown option {key!r}; the options of {[m.name for m in methods]} are {known}")
        if missing:
            raise MmpeftTypeError(
                f"option {key!r} belongs to method {'/'.join(takers)}, not to {'/'.join(missing)}: it would be "
                f"ignored. The options of {missing[0]!r} are {get_method(missing[0]).options()}"
            )


def _check_patterns(sel: Selection, methods: list[Method]) -> None:
    """``rank_pattern`` / ``alpha_pattern`` only for methods with that field (LoRA)."""
    for option, f in PATTERN_FIELDS.items():
        lacking = [m.name for m in methods if getattr(sel, option) and f not in m.options()]
        if lacking:
            takers = [m.name for m in METHODS.values() if f in m.options()]
            raise MmpeftTypeError(
                f"option {option!r} sets the {f!r} of {'/'.join(takers)} rules; method {lacking[0]!r} has no {f!r}"
            )


def _override(rule: RuleConfig, options: Mapping[str, Any], explicit: bool) -> RuleConfig:
    """``rule`` with the options given (None: not given); a preset's rule keeps what it fixes."""
    updates = {k: v for k, v in options.items() if v is not None}
    if not explicit:  # presets fix where adapters go and which outputs LoRA updates
        fixed = [k for k in _FIXED if k in updates and updates[k] != getattr(rule, k, None)]
        if fixed:
            raise MmpeftValueError(
                f"the preset fixes {fixed} (a rule on {rule.targets!r} has "
                + ", ".join(f"{k}={getattr(rule, k, None)!r}" for k in fixed)
                + "); pass targets= to choose them yourself"
            )
        updates = {k: v for k, v in updates.items() if k not in _FIXED}
        # the fusion option sets the rule of the mixing parts; "none" disables all mixing
        if rule.fusion == "none" and updates.get("fusion") not in (None, "none"):
            updates.pop("fusion")
        if updates.get("fusion", rule.fusion) == "none":  # lambda_init sets the mixing parts' rules
            updates.pop("lambda_init", None)
    return type(rule)(**{**rule.__dict__, **updates})


def planned(model: nn.Module, in_place: bool) -> nn.Module:
    """``model`` as it will be wrapped (:func:`mmpeft.targeting.prepare.prepare_backbone` changes the
    names of an ``nn.MultiheadAttention``'s projections): prepared in place, or a prepared copy."""
    if not any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        return model
    view = model if in_place else copy.deepcopy(model)
    prepare_backbone(view)
    return view
