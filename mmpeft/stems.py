"""Per-modality input stems: bring each modality to the backbone's input channels."""

from __future__ import annotations

import torch
from torch import nn

from .config import StemConfig

__all__ = ["ModalityStem"]


class ModalityStem(nn.Module):
    """Maps one modality's (B, c, H, W) input to (B, C_model, H, W).

    Kinds: "identity" (c must equal C_model), "repeat" (C_model must be a multiple of c; the
    paper repeats the 1-channel DSM to 3), "auto" (identity when c == C_model, else repeat),
    "conv1x1" (learnable; initialised to the repeat pattern when C_model % c == 0, else to the
    channel mean, so it starts as a sensible fixed mapping).
    """

    def __init__(self, modality: str, config: StemConfig, model_channels: int | None) -> None:
        super().__init__()
        self.modality, self.kind = modality, config.kind
        self.in_channels, self.model_channels = config.in_channels, model_channels
        if config.kind == "conv1x1":
            if model_channels is None:
                raise ValueError("a 'conv1x1' stem needs the model's input channels (pass in_channels=)")
            c_in = int(config.in_channels)  # type: ignore[arg-type]
            self.stem_conv = nn.Conv2d(c_in, model_channels, 1)
            with torch.no_grad():
                w = torch.zeros(model_channels, c_in)
                if model_channels % c_in == 0:
                    w[torch.arange(model_channels), torch.arange(model_channels) % c_in] = 1.0
                else:
                    w.fill_(1.0 / c_in)
                self.stem_conv.weight.copy_(w[:, :, None, None])
                self.stem_conv.bias.zero_()  # type: ignore[union-attr]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, c, ...) -> (B, C_model, ...)."""
        c, target = x.shape[1] if x.dim() > 1 else -1, self.model_channels
        if self.in_channels is not None and c != self.in_channels:
            raise ValueError(
                f"modality {self.modality!r}: its stem expects {self.in_channels} channels, "
                f"got input of shape {tuple(x.shape)}"
            )
        if self.kind == "conv1x1":
            return self.stem_conv(x)
        if target is None or c == target:
            if self.kind == "repeat" and target is None:
                raise ValueError(f"modality {self.modality!r}: 'repeat' stem needs the model's in_channels")
            return x
        if self.kind == "identity" or target % c != 0:
            raise ValueError(
                f"modality {self.modality!r} has {c} channels (shape {tuple(x.shape)}) but the model "
                f"expects {target}; use a 'repeat' stem (needs {target} divisible by {c}) or a 'conv1x1' stem"
            )
        reps = [1, target // c] + [1] * (x.dim() - 2)
        return x.repeat(*reps)  # channel tiling: c -> target

    def extra_repr(self) -> str:
        return f"{self.modality!r}, kind={self.kind!r}, in={self.in_channels}, out={self.model_channels}"
