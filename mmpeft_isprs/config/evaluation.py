"""The ``eval`` section: sliding-window evaluation of whole tiles."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["EvalConfig"]


@dataclass
class EvalConfig:
    """Sliding-window evaluation of whole tiles (windows of ``model.img_size``).

    Attributes:
        stride: step between windows (32 in the paper; 128 runs 16x fewer windows).
        val_stride: stride of the per-epoch validation during training.
        mode: ``"average"`` (mean softmax) or ``"logit_sum"`` (the authors' sum of logits).
        tta_flip: average over flipped windows as well (4x the cost).
        batch_size: windows per forward pass.
        split: tiles to score (``test``; ``val`` or ``train`` also work).
        labels: ``"eroded"`` (ISPRS protocol: boundaries ignored) or ``"full"``.
        save_predictions: write index and colour maps of every tile (``eval`` command).
        amp: autocast during evaluation (``none``, ``bf16``, ``fp16``).
    """

    stride: int = 128
    val_stride: int = 128
    mode: Literal["average", "logit_sum"] = "average"
    tta_flip: bool = False
    batch_size: int = 8
    split: str = "test"
    labels: Literal["eroded", "full"] = "eroded"
    save_predictions: bool = False
    amp: Literal["none", "bf16", "fp16"] = "none"
