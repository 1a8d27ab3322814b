"""peft's config objects as mmpeft's options: ``wrap_multimodal(model, modalities, peft.LoraConfig(...))``
and ``add_adapter(name, peft.LoraConfig(...))`` build the layers the same options spelt the mmpeft
way build (docs/peft.md, "peft's config objects").

Every field of peft's ``LoraConfig`` is honoured or refused naming it: the fields with an mmpeft
counterpart are translated (:data:`TRANSLATED`); peft's metadata (its version, the base model's
name) is read and left; every other field must hold peft's default, which is what mmpeft does
(``bias="none"``, ``fan_in_fan_out=False``, no LoftQ, ...); another value is a
:class:`~mmpeft.errors.MmpeftValueError` naming the field and why. A LoRA config means peft's LoRA
per modality: fusion ``"none"`` unless ``fusion=`` is given beside it (mixing is mmpeft's own
option). peft is not imported here: a config is recognised by its class's package.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..errors import MmpeftTypeError, MmpeftValueError

__all__ = ["TRANSLATED", "MMPEFT_ONLY", "is_peft_config", "from_peft_config", "peft_arguments", "PeftOptions"]

#: peft ``LoraConfig`` field -> the ``wrap_multimodal`` option it becomes
TRANSLATED = {
    "r": "rank",
    "lora_alpha": "alpha",
    "target_modules": "targets",
    "exclude_modules": "exclude",
    "lora_dropout": "dropout",
    "use_rslora": "use_rslora",
    "init_lora_weights": "init_lora_weights",
    "lora_bias": "lora_bias",
    "use_dora": "use_dora",
    "modules_to_save": "modules_to_save",
    "layers_to_transform": "layers",
    "layers_pattern": "layers_pattern",
    "rank_pattern": "rank_pattern",
    "alpha_pattern": "alpha_pattern",
}
#: read and left: what peft records about itself and the base model
_METADATA = ("peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode")
#: options that only mmpeft has, given beside a peft config
MMPEFT_ONLY = ("fusion", "lambda_init", "slices", "split", "stems", "in_channels")
#: why a field other than peft's default is refused (docs/peft.md, "LoRA options, peft vs mmpeft")
_WHY = {
    "bias": "the frozen layer's bias is shared by every modality and stays frozen; a trained bias per "
    "modality is lora_bias=True, a bias that trains in full goes in modules_to_save",
    "fan_in_fan_out": "it is for GPT-2's Conv1D (weight stored (in, out)); mmpeft wraps nn.Linear / nn.Conv2d",
    "task_type": "peft's task types pick a language-model wrapper class; for a trained head use modules_to_save=[...]",
    "layer_replication": "it duplicates blocks of the host model (changes the frozen model)",
    "trainable_token_indices": "token embeddings of language models have no ViT counterpart",
    "init_lora_weights": "init_lora_weights=False (no identity at init) is not offered; True, 'gaussian', 'pissa' "
    "and 'olora' are",
}


def is_peft_config(obj: Any) -> bool:
    """True for a peft config object (``peft.LoraConfig`` and peft's other ``PeftConfig`` classes)."""
    return type(obj).__module__.split(".")[0] == "peft" and hasattr(obj, "peft_type")


@dataclasses.dataclass
class PeftOptions:
    """What a peft config becomes: ``wrap_multimodal``'s ``method``, ``targets`` and options, and
    whether the set's tensors are frozen (peft's ``inference_mode=True``)."""

    method: str
    targets: Any
    options: dict[str, Any]
    inference_mode: bool


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _refuse(name: str, value: Any, default: Any) -> MmpeftValueError:
    why = _WHY.get(name, "mmpeft has no counterpart (docs/peft.md lists every LoraConfig field)")
    return MmpeftValueError(
        f"LoraConfig.{name}={value!r} is not supported: {why}. Leave it at peft's default ({default!r})"
    )


def _translate(name: str, value: Any) -> Any:
    """The mmpeft value of a translated field (None: not given)."""
    if name == "init_lora_weights":
        if value is True:
            return "kaiming"
        if value is False:
            raise _refuse(name, value, True)
        return value  # "gaussian", "pissa", "olora"; others are refused by LoRAConfig naming the field
    if name in ("target_modules", "exclude_modules", "modules_to_save") and isinstance(value, set | frozenset):
        return sorted(value)  # peft keeps names in a set
    if name in ("rank_pattern", "alpha_pattern"):
        return dict(value) or None  # peft's default {} is "no pattern"
    return value


def from_peft_config(config: Any, given: Mapping[str, Any]) -> PeftOptions:
    """The ``wrap_multimodal`` arguments of peft config ``config``; ``given``: the other options
    passed beside it (only :data:`MMPEFT_ONLY` ones; a field of the config given again is an error).
    Refuses, naming the field, every field it cannot honour; nothing is built or changed first."""
    peft_type = str(getattr(getattr(config, "peft_type", None), "value", getattr(config, "peft_type", None)))
    if peft_type != "LORA" or not dataclasses.is_dataclass(config):
        raise MmpeftTypeError(
            f"{type(config).__name__} (peft_type {peft_type!r}) is not supported: mmpeft takes peft's LoraConfig "
            "(its LoRA and the variants DoRA, rsLoRA, PiSSA / OLoRA, lora_bias)"
        )
    twice = sorted(k for k in given if k not in MMPEFT_ONLY)
    if twice:
        inverse = {v: k for k, v in TRANSLATED.items()}
        named = [f"{k} (LoraConfig.{inverse[k]})" if k in inverse else k for k in twice]
        raise MmpeftValueError(
            f"options {named} given beside a peft config: set them in the LoraConfig; beside it only mmpeft's "
            f"own options are taken: {list(MMPEFT_ONLY)}"
        )
    options: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        name, value = field.name, getattr(config, field.name)
        if name in TRANSLATED:
            converted = _translate(name, value)
            if converted is not None:
                options[TRANSLATED[name]] = converted
        elif name == "task_type" and value is not None:
            raise _refuse(name, value, None)
        elif name not in _METADATA and value != _default(field):
            raise _refuse(name, value, _default(field))
    targets = options.pop("targets", None)
    if targets is None:
        raise MmpeftValueError(
            "LoraConfig.target_modules=None: peft infers it only for language models it knows; name the modules "
            "(e.g. target_modules=['qkv', 'proj'] or 'all-linear'; mmpeft.plan_targets shows what a wrap selects)"
        )
    options = {"fusion": "none", **options, **given}  # peft's LoRA per modality unless fusion= says otherwise
    return PeftOptions("lora", targets, options, bool(getattr(config, "inference_mode", False)))


def peft_arguments(
    method: Any, preset: Any, targets: Any, config: Any, options: dict[str, Any]
) -> tuple[Any, Any, dict[str, Any], bool]:
    """``(method, targets, options, inference_mode)`` of a wrap or ``add_adapter`` call: unchanged
    (and False) without a peft config; translated when ``method`` (or ``peft_config=`` in
    ``options``) is one, which then decides where LoRA goes (``preset`` / ``targets`` / ``config``
    beside it are errors)."""
    if method is None and "peft_config" in options:
        method = options.pop("peft_config")
    if not is_peft_config(method):
        return method, targets, options, False
    clash = [n for n, v in (("preset", preset), ("targets", targets), ("config", config)) if v is not None]
    if clash:
        raise MmpeftValueError(
            f"{clash} given beside a peft config: its target_modules (and selection fields) say where LoRA goes"
        )
    p = from_peft_config(method, options)
    return p.method, p.targets, p.options, p.inference_mode
