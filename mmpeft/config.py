"""The wrapped model's config: modalities, the methods' rules, stems, what else is saved
(validated on construction, JSON round-trip). Each method's own options are its rule config
(:mod:`mmpeft.tuners`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import MmpeftTypeError, MmpeftValueError
from .tuners import AdapterConfig, LoRAConfig, get_method
from .tuners.options import Targets, check_targets
from .utils import check_int, check_modalities, resolve_dtype

__all__ = ["LoRAConfig", "AdapterConfig", "StemConfig", "MultimodalConfig", "RuleConfig", "Targets", "parse_stem"]

RuleConfig = LoRAConfig | AdapterConfig
STEM_KINDS = ("auto", "identity", "repeat", "conv1x1", "adapt")
_COUNTED = ("conv1x1", "adapt")  # stems whose channel count is declared at wrap time


@dataclass
class StemConfig:
    """How one modality's channels are brought to the backbone's input channels.

    Attributes:
        kind: "auto" (identity if the channels match, else repeat), "identity", "repeat"
            (the paper: 1-channel DSM repeated to 3), "conv1x1" (a learnable 1x1 convolution) or
            "adapt" (N bands through the frozen RGB patch embedding adapted as timm adapts
            ``in_chans``: ``timm.models.adapt_input_conv``; fixed, nothing trains).
        in_channels: the modality's channel count: declared (required for "conv1x1" and "adapt"), or None
            until the modality's first input, which records it here (so it is saved with the
            config); every later input of the modality must have this many channels.
    """

    kind: str = "auto"
    in_channels: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in STEM_KINDS:
            raise MmpeftValueError(f"unknown stem kind {self.kind!r}; known: {STEM_KINDS}")
        if self.in_channels is not None:
            check_int("a stem's in_channels", self.in_channels)
        elif self.kind in _COUNTED:
            raise MmpeftValueError(f"the {self.kind!r} stem needs the modality's in_channels, e.g. ({self.kind!r}, 12)")


_STEM_FORMS = (
    "'repeat', ('repeat', channels), ('conv1x1', channels), ('adapt', channels), "
    "{'kind': ..., 'in_channels': ...} or StemConfig"
)


def parse_stem(value: Any, modality: str | None = None) -> StemConfig:
    """A :class:`StemConfig` from the short forms ``wrap_multimodal(stems=...)`` takes: a kind
    (``"repeat"``), ``(kind,)``, ``(kind, in_channels)``, a mapping of its fields, or a StemConfig.
    Errors name the modality and the forms."""
    where = f"stem of modality {modality!r}" if modality is not None else "stem"
    try:
        if isinstance(value, StemConfig):
            return value
        if isinstance(value, str):
            return StemConfig(kind=value)
        if isinstance(value, (tuple, list)) and 1 <= len(value) <= 2:
            if value[0] in _COUNTED and len(value) == 1:
                raise MmpeftValueError(f"{tuple(value)!r} lacks the channel count: write ({value[0]!r}, channels)")
            return StemConfig(*value)
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"kind", "in_channels"})
            if unknown:
                raise MmpeftValueError(f"unknown stem fields {unknown}; a stem has 'kind' and 'in_channels'")
            return StemConfig(**value)
    except (TypeError, ValueError) as exc:
        raise (MmpeftTypeError if isinstance(exc, TypeError) else MmpeftValueError)(f"{where}: {exc}") from exc
    raise MmpeftTypeError(f"{where}: cannot read a stem from {value!r}; use {_STEM_FORMS}")


@dataclass
class MultimodalConfig:
    """Everything ``wrap_multimodal`` needs to rebuild a wrapped model (JSON round-trip).

    Attributes:
        modalities: modality names, in stacked order.
        rules: LoRA / adapter rules applied in order (a module may be targeted by one rule only);
            no rule gives a frozen multimodal model (the "no fine-tuning" baseline).
        stems: per-modality input stems (missing modalities get "auto").
        in_channels: channels the base model expects (None: inferred from its first conv).
        preset: name of the preset the rules came from (informational).
        modules_to_save: modules of the base model that train in full and are saved with the
            adapters (peft's ``modules_to_save``): a list of names (suffix match) or a regex.
        base_dtype: the dtype the frozen weights are kept in ("bfloat16", ...; None: as built).
    """

    modalities: list[str]
    rules: list[RuleConfig]
    stems: dict[str, StemConfig] = field(default_factory=dict)
    in_channels: int | None = None
    preset: str | None = None
    modules_to_save: Targets | None = None
    base_dtype: str | None = None

    def __post_init__(self) -> None:
        self.modalities = check_modalities(self.modalities)  # distinct identifiers; a str is refused
        self.stems = {k: parse_stem(v, k) for k, v in self.stems.items()}
        unknown = sorted(set(self.stems) - set(self.modalities))
        if unknown:
            raise MmpeftValueError(f"stems given for unknown modalities {unknown}; modalities are {self.modalities}")
        for rule in self.rules:
            get_method(getattr(rule, "kind", None))  # a rule of a registered method
        if self.modules_to_save is not None:
            self.modules_to_save = check_targets(self.modules_to_save)
        if self.base_dtype is not None:
            resolve_dtype(self.base_dtype)  # a known name

    def stem(self, modality: str) -> StemConfig:
        """The modality's stem config, stored (a channel count recorded at first use is saved)."""
        return self.stems.setdefault(modality, StemConfig())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MultimodalConfig:
        d = dict(d)
        rules: list[RuleConfig] = []
        for r in d.pop("rules"):
            r = dict(r)
            method = get_method(r.get("kind"))
            unknown = sorted(set(r) - {"targets", "kind", *method.options()})
            if unknown:
                raise MmpeftValueError(f"unknown options {unknown} in a {method.name!r} rule of the config")
            rules.append(method.config(**r))
        stems = {k: parse_stem(v, k) for k, v in d.pop("stems", {}).items()}
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise MmpeftValueError(f"unknown keys in multimodal config: {extra}")
        return cls(rules=rules, stems=stems, **d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> MultimodalConfig:
        return cls.from_dict(json.loads(text))
