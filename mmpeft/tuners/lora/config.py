"""The LoRA method's options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...errors import MmpeftTypeError, MmpeftValueError
from ...utils import check_int, check_number
from ..options import Targets, check_fusion, check_targets
from .variants import check_init, lora_scaling

__all__ = ["LoRAConfig"]


@dataclass
class LoRAConfig:
    """Multimodal LoRA on the ``nn.Linear`` (and ``nn.Conv2d``: with ``use_rslora`` / ``use_dora`` only
    among the variants) modules selected by ``targets``.

    Attributes:
        targets: peft semantics: a list of names matches modules whose qualified name equals or
            ends with ``.<name>``; a single string is a regex that must match the whole name.
        rank: LoRA rank r (a positive int).
        alpha: scaling numerator, a positive finite number (scaling = alpha / rank, or
            alpha / sqrt(rank) with ``use_rslora``); None means scaling 1 (peft's default is
            ``lora_alpha=8``: scaling 8 / r).
        dropout: dropout on the LoRA input, in [0, 1).
        slices: tune only these parts of a fused output (e.g. ["q", "v"] of a fused qkv); only on
            a fused projection (output = len(split) x input channels, or a module named qkv).
        split: names of the equal parts the output is divided into when ``slices`` is set (another
            value without ``slices`` is an error: it would change nothing).
        fusion: cross-modal fusion rule ("scalar", "none", "matrix" or a registered one).
        lambda_init: initial value of the fusion parameters (0.5 in the paper); any finite real
            (another value than 0.5 with ``fusion="none"``, which has none, is an error).
        use_rslora: rank-stabilised LoRA, scaling = alpha / sqrt(rank) (peft's ``use_rslora``);
            needs an explicit ``alpha``.
        init_lora_weights: "kaiming" (peft's True), "gaussian", "pissa" or "olora" (peft's names).
            PiSSA / OLoRA keep the frozen weight untouched and subtract their initial pair from
            every modality's update (docs/peft.md), so the update starts at 0 under every fusion rule.
        lora_bias: a trainable bias on each modality's B (peft's ``lora_bias``), mixed with the
            update; merged into one bias per modality.
        use_dora: DoRA, a trainable magnitude per modality and output row (peft's ``use_dora``);
            only with a fusion rule that does not mix (``fusion="none"``).
    """

    targets: Targets
    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    slices: list[str] | None = None
    split: list[str] = field(default_factory=lambda: ["q", "k", "v"])
    fusion: str = "scalar"
    lambda_init: float = 0.5
    use_rslora: bool = False
    init_lora_weights: str = "kaiming"
    lora_bias: bool = False
    use_dora: bool = False
    kind: Literal["lora"] = "lora"

    def __post_init__(self) -> None:
        self.targets = check_targets(self.targets)
        check_int("rank", self.rank)
        if self.alpha is not None:
            self.alpha = check_number("alpha", self.alpha, positive=True)
        self.dropout = check_number("dropout", self.dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise MmpeftValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self.split = list(self.split)
        if len(self.split) < 2 or len(set(self.split)) != len(self.split):
            raise MmpeftValueError(f"split must name two or more distinct parts, got {self.split}")
        if self.slices is None and self.split != ["q", "k", "v"]:
            raise MmpeftValueError(
                f"split={self.split} without slices would change nothing: split names the parts of a fused output "
                "that slices= tunes; pass slices=[...] (a subset of split) or drop split"
            )
        if self.slices is not None:
            self.slices = list(self.slices)
            unknown = [s for s in self.slices if s not in self.split]
            if unknown or not self.slices:
                raise MmpeftValueError(f"slices {self.slices} must be a non-empty subset of split {self.split}")
        self.lambda_init = check_fusion(self.fusion, self.lambda_init)
        for name in ("use_rslora", "lora_bias", "use_dora"):
            if not isinstance(getattr(self, name), bool):
                raise MmpeftTypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        self.init_lora_weights = check_init(self.init_lora_weights)
        lora_scaling(self.rank, self.alpha, self.use_rslora)  # rsLoRA needs an explicit alpha
        if self.kind != "lora":
            raise MmpeftValueError(f"a LoRAConfig has kind 'lora', got {self.kind!r}")
