"""Dataclass configs of the multimodal methods, validated on construction, JSON round-trip."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from .fusion import FUSION_RULES
from .layers.adapter import ACTIVATIONS
from .verify import check_modalities

__all__ = ["LoRAConfig", "AdapterConfig", "StemConfig", "MultimodalConfig", "RuleConfig"]

Targets = Union[str, list[str]]


def _check_targets(targets: Targets) -> Targets:
    if isinstance(targets, str):
        return targets
    targets = list(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"targets must be a regex string or a non-empty list of module names, got {targets!r}")
    return targets


def _check_fusion(fusion: str, lambda_init: float) -> None:
    if fusion not in FUSION_RULES:
        raise ValueError(f"unknown fusion rule {fusion!r}; known: {sorted(FUSION_RULES)}")
    if not isinstance(lambda_init, (int, float)):
        raise ValueError(f"lambda_init must be a number, got {lambda_init!r}")


@dataclass
class LoRAConfig:
    """Multimodal LoRA on the ``nn.Linear`` modules selected by ``targets``.

    Attributes:
        targets: peft semantics: a list of names matches modules whose qualified name equals or
            ends with ``.<name>``; a single string is a regex that must match the whole name.
        rank: LoRA rank r.
        alpha: scaling numerator (scaling = alpha / rank); None means alpha = rank (scaling 1).
        dropout: dropout on the LoRA input.
        slices: tune only these parts of a fused output (e.g. ["q", "v"] of a fused qkv).
        split: names of the equal parts the output is divided into when ``slices`` is set.
        fusion: cross-modal fusion rule ("scalar", "none", "matrix").
        lambda_init: initial value of the fusion parameters (0.5 in the paper).
    """

    targets: Targets
    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    slices: list[str] | None = None
    split: list[str] = field(default_factory=lambda: ["q", "k", "v"])
    fusion: str = "scalar"
    lambda_init: float = 0.5
    kind: Literal["lora"] = "lora"

    def __post_init__(self) -> None:
        self.targets = _check_targets(self.targets)
        if self.rank <= 0:
            raise ValueError(f"rank must be positive, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self.split = list(self.split)
        if self.slices is not None:
            self.slices = list(self.slices)
            unknown = [s for s in self.slices if s not in self.split]
            if unknown or not self.slices:
                raise ValueError(f"slices {self.slices} must be a non-empty subset of split {self.split}")
        _check_fusion(self.fusion, self.lambda_init)

    @property
    def scaling(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank


@dataclass
class AdapterConfig:
    """Multimodal bottleneck adapters beside or after the modules selected by ``targets``.

    Attributes:
        targets: as in :class:`LoRAConfig`.
        placement: "beside" (parallel to the module, on its input) or "after" (on its output,
            with its own skip).
        ratio: bottleneck width as a fraction of the adapter's input channels (0.25 in MFNet).
        activation: "gelu" (the authors' code), "relu" (the paper's text) or "silu".
        bias: biases on both projections.
        dropout: dropout after the activation.
        scale: factor on the adapter output.
        init: "zeros" (up projection zero-initialised: identity at init) or "default"
            (PyTorch default init, as the authors' code).
        fusion, lambda_init: as in :class:`LoRAConfig`.
    """

    targets: Targets
    placement: Literal["beside", "after"] = "beside"
    ratio: float = 0.25
    activation: str = "gelu"
    bias: bool = True
    dropout: float = 0.0
    scale: float = 1.0
    init: Literal["zeros", "default"] = "zeros"
    fusion: str = "scalar"
    lambda_init: float = 0.5
    kind: Literal["adapter"] = "adapter"

    def __post_init__(self) -> None:
        self.targets = _check_targets(self.targets)
        if self.placement not in ("beside", "after"):
            raise ValueError(f"placement must be 'beside' or 'after', got {self.placement!r}")
        if not 0.0 < self.ratio <= 16.0:
            raise ValueError(f"ratio must be in (0, 16], got {self.ratio}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; known: {sorted(ACTIVATIONS)}")
        if self.init not in ("zeros", "default"):
            raise ValueError(f"init must be 'zeros' or 'default', got {self.init!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        _check_fusion(self.fusion, self.lambda_init)


RuleConfig = Union[LoRAConfig, AdapterConfig]
STEM_KINDS = ("auto", "identity", "repeat", "conv1x1")


@dataclass
class StemConfig:
    """How one modality's channels are brought to the backbone's input channels.

    Attributes:
        kind: "auto" (identity if the channels match, else repeat), "identity", "repeat"
            (the paper: 1-channel DSM repeated to 3) or "conv1x1" (a learnable 1x1 convolution).
        in_channels: the modality's channel count (required for "conv1x1").
    """

    kind: str = "auto"
    in_channels: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in STEM_KINDS:
            raise ValueError(f"unknown stem kind {self.kind!r}; known: {STEM_KINDS}")
        if self.kind == "conv1x1" and (self.in_channels is None or self.in_channels <= 0):
            raise ValueError("a 'conv1x1' stem needs the modality's in_channels")


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
    """

    modalities: list[str]
    rules: list[RuleConfig]
    stems: dict[str, StemConfig] = field(default_factory=dict)
    in_channels: int | None = None
    preset: str | None = None

    def __post_init__(self) -> None:
        self.modalities = check_modalities(self.modalities)  # distinct identifiers; a str is refused
        self.stems = {k: (v if isinstance(v, StemConfig) else StemConfig(**v)) for k, v in self.stems.items()}
        unknown = sorted(set(self.stems) - set(self.modalities))
        if unknown:
            raise ValueError(f"stems given for unknown modalities {unknown}; modalities are {self.modalities}")

    def stem(self, modality: str) -> StemConfig:
        return self.stems.get(modality, StemConfig())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MultimodalConfig":
        d = dict(d)
        rules: list[RuleConfig] = []
        for r in d.pop("rules"):
            r = dict(r)
            kind = r.get("kind")
            if kind == "lora":
                rules.append(LoRAConfig(**r))
            elif kind == "adapter":
                rules.append(AdapterConfig(**r))
            else:
                raise ValueError(f"unknown rule kind {kind!r} in config (expected 'lora' or 'adapter')")
        stems = {k: StemConfig(**v) for k, v in d.pop("stems", {}).items()}
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise ValueError(f"unknown keys in multimodal config: {extra}")
        return cls(rules=rules, stems=stems, **d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "MultimodalConfig":
        return cls.from_dict(json.loads(text))
