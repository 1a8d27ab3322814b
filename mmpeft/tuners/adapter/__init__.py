"""The adapter method: per-modality bottleneck adapters beside or after frozen modules."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ...errors import MmpeftTypeError, MmpeftValueError
from ..registry import Method, register_method
from .config import ACTIVATIONS, AdapterConfig
from .layer import MultimodalAdapter

__all__ = ["ACTIVATIONS", "AdapterConfig", "MultimodalAdapter", "build_adapter"]


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _adapter_dims(module: nn.Module, placement: str, name: str) -> tuple[int, int]:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if isinstance(module, _CONVS) or (not linears and any(isinstance(m, _CONVS) for m in module.modules())):
        raise MmpeftTypeError(
            f"cannot put an adapter on {name} ({type(module).__name__}): it is a convolution (or holds one and no "
            "nn.Linear), whose output has its channels on dim 1 (N, C, H, W), while an adapter is a bottleneck of "
            "nn.Linear layers over the last axis of token features (..., C); adapt a convolution with "
            "method='lora' (per-modality LoRA on nn.Conv2d, e.g. targets=['patch_embed.proj'])"
        )
    if not linears:
        raise MmpeftValueError(f"cannot infer the channels of {name} ({type(module).__name__}): it holds no nn.Linear")
    out = linears[-1].out_features
    return (linears[0].in_features if placement == "beside" else out), out


def build_adapter(
    rule: AdapterConfig, module: nn.Module, name: str, modalities: Sequence[str], width: int | None = None
) -> MultimodalAdapter:
    """The :class:`MultimodalAdapter` of ``rule`` beside or after ``module`` called ``name``;
    ``width``: the module's output channels as a dry run saw them (an "after" adapter's width,
    instead of its last ``nn.Linear``'s: CaiT's talking-heads attention ends in a heads x heads one)."""
    c_in, c_out = _adapter_dims(module, rule.placement, name)
    if width is not None and rule.placement == "after":
        c_in = c_out = width
    return MultimodalAdapter(
        module,
        modalities,
        in_features=c_in,
        out_features=c_out,
        hidden=max(1, int(c_in * rule.ratio)),
        placement=rule.placement,
        activation=ACTIVATIONS[rule.activation],
        bias=rule.bias,
        dropout=rule.dropout,
        scale=rule.scale,
        init=rule.init,
        fusion=rule.fusion,
        lambda_init=rule.lambda_init,
    )


register_method(
    Method(
        name="adapter",
        config=AdapterConfig,
        layer=MultimodalAdapter,
        build=build_adapter,
        wraps=None,
        preset="mmadapter",
    )
)
