"""The LoRA method: per-modality low-rank updates of frozen ``nn.Linear`` layers."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ..registry import Method, register_method
from .config import LoRAConfig
from .layer import MultimodalLoRA

__all__ = ["LoRAConfig", "MultimodalLoRA", "build_lora"]


def _slice_ranges(rule: LoRAConfig, layer: nn.Linear, name: str) -> dict[str, tuple[int, int]] | None:
    """The output ranges of ``rule.slices``; only on a fused projection (e.g. qkv) that the split fits."""
    if rule.slices is None:
        return None
    n = len(rule.split)
    fused = layer.out_features == n * layer.in_features or name.rsplit(".", 1)[-1] in ("qkv", "in_proj")
    if not fused or layer.out_features % n != 0:
        raise ValueError(
            f"{name} ({layer.in_features} -> {layer.out_features}) is not a fused {'/'.join(rule.split)} projection: "
            f"slices={rule.slices} would cut its {layer.out_features} outputs into {n} parts that are not "
            f"{rule.split}. Use slices only on a fused qkv (outputs = {n} x inputs), or drop slices for this module"
        )
    step = layer.out_features // n
    return {s: (rule.split.index(s) * step, (rule.split.index(s) + 1) * step) for s in rule.slices}


def build_lora(rule: LoRAConfig, module: nn.Module, name: str, modalities: Sequence[str]) -> MultimodalLoRA:
    """The :class:`MultimodalLoRA` of ``rule`` around the ``nn.Linear`` ``module`` called ``name``."""
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{name} is a {type(module).__name__}; the LoRA method wraps nn.Linear modules")
    return MultimodalLoRA(
        module, modalities, rank=rule.rank, alpha=rule.alpha, dropout=rule.dropout,
        slices=_slice_ranges(rule, module, name), fusion=rule.fusion, lambda_init=rule.lambda_init,
    )  # fmt: skip


register_method(Method("lora", LoRAConfig, MultimodalLoRA, build_lora, (nn.Linear,), "mmlora"))
