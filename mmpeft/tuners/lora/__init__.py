"""The LoRA method: per-modality low-rank updates of frozen ``nn.Linear`` and ``nn.Conv2d`` layers."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ...errors import MmpeftTypeError, MmpeftValueError
from ..base import MultimodalLayer
from ..registry import Method, register_method
from .config import LoRAConfig
from .conv import MultimodalLoRAConv2d
from .layer import MultimodalLoRA

__all__ = ["LoRAConfig", "MultimodalLoRA", "MultimodalLoRAConv2d", "build_lora"]


def _slice_ranges(rule: LoRAConfig, layer: nn.Linear, name: str) -> dict[str, tuple[int, int]] | None:
    """The output ranges of ``rule.slices``; only on a fused projection (e.g. qkv) that the split fits."""
    if rule.slices is None:
        return None
    n = len(rule.split)
    fused = layer.out_features == n * layer.in_features or name.rsplit(".", 1)[-1] in ("qkv", "in_proj")
    if not fused or layer.out_features % n != 0:
        raise MmpeftValueError(
            f"{name} ({layer.in_features} -> {layer.out_features}) is not a fused {'/'.join(rule.split)} projection: "
            f"slices={rule.slices} would cut its {layer.out_features} outputs into {n} parts that are not "
            f"{rule.split}. Use slices only on a fused qkv (outputs = {n} x inputs), or drop slices for this module"
        )
    step = layer.out_features // n
    return {s: (rule.split.index(s) * step, (rule.split.index(s) + 1) * step) for s in rule.slices}


#: the LoRA variants a convolution does not take (their plain values)
_CONV_PLAIN = {"init_lora_weights": "kaiming", "lora_bias": False}


def _build_conv(rule: LoRAConfig, module: nn.Conv2d, name: str, modalities: Sequence[str]) -> MultimodalLoRAConv2d:
    """The :class:`MultimodalLoRAConv2d` of ``rule`` around the ``nn.Conv2d`` ``module`` called ``name``."""
    if rule.slices is not None:
        raise MmpeftValueError(
            f"{name} is a Conv2d ({module.in_channels} -> {module.out_channels} channels): slices={rule.slices} cut "
            "the outputs of a fused qkv projection, which a convolution is not; give it a rule without slices"
        )
    variants = [f"{k}={getattr(rule, k)!r}" for k, v in _CONV_PLAIN.items() if getattr(rule, k, v) != v]
    if variants:
        raise MmpeftValueError(
            f"{name} is a Conv2d: {', '.join(variants)} are LoRA variants of nn.Linear layers only (a "
            "convolution takes use_rslora and use_dora); give the convolution its own rule without them"
        )
    try:
        return MultimodalLoRAConv2d(
            module,
            modalities,
            rank=rule.rank,
            alpha=rule.alpha,
            dropout=rule.dropout,
            fusion=rule.fusion,
            lambda_init=rule.lambda_init,
            use_rslora=rule.use_rslora,
            use_dora=rule.use_dora,
        )
    except ValueError as e:
        raise MmpeftValueError(f"{name}: {e}") from e


def build_lora(rule: LoRAConfig, module: nn.Module, name: str, modalities: Sequence[str]) -> MultimodalLayer:
    """The LoRA layer of ``rule`` around ``module`` called ``name``: :class:`MultimodalLoRA` for an
    ``nn.Linear``, :class:`MultimodalLoRAConv2d` for an ``nn.Conv2d``."""
    if isinstance(module, nn.Conv2d):
        return _build_conv(rule, module, name, modalities)
    if not isinstance(module, nn.Linear):
        raise MmpeftTypeError(
            f"{name} is a {type(module).__name__}; the LoRA method wraps nn.Linear and nn.Conv2d modules"
        )
    return MultimodalLoRA(
        module,
        modalities,
        rank=rule.rank,
        alpha=rule.alpha,
        dropout=rule.dropout,
        slices=_slice_ranges(rule, module, name),
        fusion=rule.fusion,
        lambda_init=rule.lambda_init,
        use_rslora=rule.use_rslora,
        init_lora_weights=rule.init_lora_weights,
        lora_bias=rule.lora_bias,
        use_dora=rule.use_dora,
    )


register_method(
    Method(
        name="lora",
        config=LoRAConfig,
        layer=MultimodalLoRA,
        build=build_lora,
        wraps=(nn.Linear, nn.Conv2d),
        preset="mmlora",
    )
)
