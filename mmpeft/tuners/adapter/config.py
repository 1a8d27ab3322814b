"""The bottleneck-adapter method's options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ...errors import MmpeftTypeError, MmpeftValueError
from ...utils import check_number
from ..options import Targets, check_fusion, check_targets

__all__ = ["AdapterConfig", "ACTIVATIONS"]

ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


@dataclass
class AdapterConfig:
    """Multimodal bottleneck adapters beside or after the modules selected by ``targets``.

    Attributes:
        targets: as in :class:`~mmpeft.LoRAConfig`.
        placement: "beside" (parallel to the module, on its input) or "after" (on its output,
            with its own skip).
        ratio: bottleneck width as a fraction of the adapter's input channels (0.25 in MFNet), in (0, 16].
        activation: "gelu" (the authors' code), "relu" (the paper's text) or "silu".
        bias: biases on both projections.
        dropout: dropout after the activation, in [0, 1).
        scale: factor on the adapter output, a finite number (any sign; 1 in the authors' code).
        init: "zeros" (up projection zero-initialised: identity at init) or "default"
            (PyTorch default init, as the authors' code).
        fusion, lambda_init: as in :class:`~mmpeft.LoRAConfig`.
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
        self.targets = check_targets(self.targets)
        if self.placement not in ("beside", "after"):
            raise MmpeftValueError(f"placement must be 'beside' or 'after', got {self.placement!r}")
        self.ratio = check_number("ratio", self.ratio, positive=True)
        if self.ratio > 16.0:
            raise MmpeftValueError(f"ratio must be in (0, 16], got {self.ratio}")
        if not isinstance(self.activation, str):
            raise MmpeftTypeError(f"activation must be a name (a str), got {self.activation!r}")
        if self.activation not in ACTIVATIONS:
            raise MmpeftValueError(f"unknown activation {self.activation!r}; known: {sorted(ACTIVATIONS)}")
        if not isinstance(self.bias, bool):
            raise MmpeftTypeError(f"bias must be a bool, got {self.bias!r}")
        self.dropout = check_number("dropout", self.dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise MmpeftValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self.scale = check_number("scale", self.scale)
        if self.init not in ("zeros", "default"):
            raise MmpeftValueError(f"init must be 'zeros' or 'default', got {self.init!r}")
        self.lambda_init = check_fusion(self.fusion, self.lambda_init)
        if self.kind != "adapter":
            raise MmpeftValueError(f"an AdapterConfig has kind 'adapter', got {self.kind!r}")
