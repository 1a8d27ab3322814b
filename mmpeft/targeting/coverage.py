"""What a preset leaves out: attention modules that get no update, and models with no attention.

:func:`warn_uncovered_attention` names the attention modules (a class called ``*Attention*`` /
``*Attn*`` / ``*MHSA*`` holding an ``nn.Linear`` or ``nn.Conv2d``, an ``nn.MultiheadAttention``, or a
module seen computing attention in the dry run, :mod:`mmpeft.targeting.attention_trace`) that hold
none of a preset's targets: CaiT's class-attention blocks (``ClassAttn``, separate q / k /
v) beside its talking-heads attention (fused qkv), VOLO's outlook attention. Each gets a
:class:`~mmpeft.targeting.probe.ProbeWarning`-style warning; ``targets=`` covers them.

:func:`attention_modules` is also how :func:`mmpeft.targeting.targets.detect_family` tells a
model with no attention at all (a CNN: ConvNeXt, HGNet) from one it cannot place.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from ..errors import MmpeftWarning
from ..utils import listing
from .structure import warn_structural

__all__ = ["CoverageWarning", "attention_modules", "conv_projections", "has_attention", "warn_uncovered_attention"]

#: names (last part) of the projections an attention computes (any family's spelling)
_PROJECTION = re.compile(r"(^|_)(qkv|to_qkv|in_proj|qk|kv|q|k|v|query|key|value|[qkv]_proj)$")


class CoverageWarning(MmpeftWarning):
    """A preset leaves some attention modules of the model without an update."""


def _is_attention(module: nn.Module) -> bool:
    if isinstance(module, nn.MultiheadAttention):
        return True
    name = type(module).__name__.lower()
    if not any(t in name for t in ("attention", "attn", "mhsa")):
        return False
    return any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in module.modules())


def attention_modules(model: nn.Module, traced: Iterable[str] = ()) -> list[str]:
    """Names of the innermost attention modules of ``model``: those named like one (see the
    module's doc; a block class named after its attention, as CaiT's ``LayerScaleBlockClassAttn``,
    holds one) and ``traced``, the modules seen computing attention
    (:func:`mmpeft.targeting.attention_trace.traced_attention`: ConViT's GPSA, XCiT's XCA)."""
    found = sorted({n for n, m in model.named_modules() if n and _is_attention(m)} | set(traced))
    inner = {n for n in found if not any(o.startswith(n + ".") for o in found)}
    return [n for n, _ in model.named_modules() if n in inner]  # the model's order


def _traced(model: nn.Module) -> list[str]:
    """The modules seen computing attention in one forward at the model's own input (shapes only)."""
    from .attention_trace import traced_attention
    from .inputs import choose_size, infer_in_channels

    channels = infer_in_channels(model, None) or 3
    return traced_attention(model, channels, choose_size(model, channels))


def has_attention(model: nn.Module) -> bool:
    """Whether ``model`` has an attention module, a linear / convolution named like one of an
    attention's projections (``qkv``, ``in_proj``, ``q`` / ``k`` / ``v``, ``query``, ...), or a
    module seen computing attention in a forward (IFormer's, SHViT's, EfficientViT's convolutional
    attention: :mod:`mmpeft.targeting.attention_trace`)."""
    if attention_modules(model):
        return True
    named = any(
        isinstance(m, (nn.Linear, nn.Conv2d)) and _PROJECTION.search(n.rsplit(".", 1)[-1])
        for n, m in model.named_modules()
    )
    return named or bool(_traced(model))


def conv_projections(model: nn.Module) -> list[str]:
    """The 1x1 ``nn.Conv2d`` projections of the attention modules (named, or seen computing
    attention) when none holds an ``nn.Linear`` (Visformer, EfficientFormerV2, MobileViT v2, SHViT
    compute q / k / v on (N, C, H, W) maps); else empty."""
    names = attention_modules(model)
    modules = [(a, model.get_submodule(a)) for a in attention_modules(model, () if names else _traced(model))]
    if any(isinstance(m, nn.Linear) for _, module in modules for m in module.modules()):
        return []
    return [
        f"{a}.{n}"
        for a, module in modules
        for n, m in module.named_modules()
        if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
    ]


def warn_uncovered_attention(model: nn.Module, targets: Iterable[str], traced: Iterable[str] = ()) -> list[str]:
    """Warn naming the attention modules (named, or ``traced``: seen computing attention in the dry
    run) that hold none of ``targets``; returns them. Attention left bare is never silent."""
    names = list(targets)
    attention = attention_modules(model, traced)

    def covered(a: str) -> bool:
        return any(n == a or n.startswith(a + ".") or a.startswith(n + ".") for n in names)

    left = [a for a in attention if not covered(a)]
    if left and names:  # (a preset that adapts nothing, "frozen", leaves all by choice)
        classes = sorted({type(model.get_submodule(a)).__name__ for a in left})
        warn_structural(
            f"the preset leaves {len(left)} of the model's {len(attention)} attention modules without an update "
            f"({', '.join(classes)}: {listing(left)}); pass targets= to cover them",
            CoverageWarning,
        )
    return left
