"""Multimodal LoRA around a frozen ``nn.Conv2d`` (e.g. a ViT's patch embedding)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import MmpeftTypeError, MmpeftValueError
from ...utils import check_int
from ..base import MultimodalLayer, mixing_refusal
from ..fusion import Fusion, build_fusion
from ..merging import WeightMerging
from .variants import DORA_MIXING, LoRAFactor, dora_extra, dora_scale, lora_scaling, row_norms

__all__ = ["MultimodalLoRAConv2d"]


class MultimodalLoRAConv2d(WeightMerging, MultimodalLayer):
    """Per-modality low-rank updates of a frozen 2-d convolution, mixed by a fusion rule.

    As peft's LoRA ``Conv2d``: ``A_m`` is a convolution ``in -> r`` with the base layer's kernel,
    stride, padding, dilation and padding mode, ``B_m`` a 1x1 convolution ``r -> out``. For
    modality ``m`` with input ``x_m`` (N, in, H, W)::

        d_m = scaling * B_m(A_m(dropout(x_m)))
        out_m = base_layer(x_m) + fusion(d)_m

    With ``use_rslora`` the scaling is ``alpha / sqrt(rank)``; with ``use_dora`` (a rule that does not
    mix) DoRA as peft's Conv2d DoRA: ``out_m = g_m (conv(x'_m, W) + d_m) + b``, ``g_m = mag_m /
    ||W + s B_m A_m||`` per output channel (the norm over (in, kh, kw), detached), the magnitude
    ``lora_magnitude_vector.<modality>`` (out,) starting at ``||W||``.

    Its weight form is ``scaling * B_m A_m`` contracted over the rank: (out, in, kh, kw), the base
    weight's shape. Parameters follow peft's naming: ``lora_A.<modality>.weight`` (r, in, kh, kw),
    ``lora_B.<modality>.weight`` (out, r, 1, 1). Only ``groups=1`` convolutions are supported.

    Args:
        base_layer: the frozen ``nn.Conv2d`` (kept as ``self.base_layer``).
        modalities: modality names in stacked order.
        rank: LoRA rank r.
        alpha: scaling numerator; ``scaling = alpha / rank`` (``alpha / sqrt(rank)`` with
            ``use_rslora``); ``None`` means scaling 1.
        dropout: dropout on the LoRA input.
        fusion: fusion rule name (see :mod:`mmpeft.tuners.fusion`).
        lambda_init: initial value of the fusion parameters.
    """

    method = "lora"

    def __init__(
        self,
        base_layer: nn.Conv2d,
        modalities: Sequence[str],
        rank: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
        fusion: str = "scalar",
        lambda_init: float = 0.5,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        super().__init__(base_layer, modalities)
        _check_conv(base_layer)
        self.in_channels = base_layer.in_channels
        self.out_channels = base_layer.out_channels
        self.rank = check_int("rank", rank)
        self.scaling = lora_scaling(rank, alpha, bool(use_rslora))  # as the linear LoRA (alpha None: 1)
        self.use_dora = bool(use_dora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dev, dt = base_layer.weight.device, base_layer.weight.dtype
        b = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        for name in self.modalities:
            self.lora_A[name] = nn.Conv2d(
                b.in_channels,
                rank,
                b.kernel_size,
                b.stride,
                b.padding,
                b.dilation,
                bias=False,
                padding_mode=b.padding_mode,
                device=dev,
                dtype=dt,
            )
            self.lora_B[name] = nn.Conv2d(rank, b.out_channels, 1, bias=False, device=dev, dtype=dt)
        self.lora_fusion = build_fusion(fusion, self.modalities, lambda_init, device=dev)
        if self.use_dora and self.lora_fusion.mixes:
            raise MmpeftValueError(f"use_dora=True with fusion={fusion!r}: {DORA_MIXING}")
        self._init_merging()  # merged_weight: (M, *W.shape) while merged (:meth:`merge`), else None
        self.reset_lora_parameters()
        if self.use_dora:  # ||W + delta_m|| = ||W|| at init (B_m = 0)
            norms = row_norms(base_layer.weight.flatten(1), None)
            self.lora_magnitude_vector = nn.ParameterDict({m: nn.Parameter(norms.clone()) for m in self.modalities})

    def reset_lora_parameters(self) -> None:
        """A: kaiming-uniform(a=sqrt(5)) (as peft / loralib); B: zeros, so the update starts at 0."""
        for name in self.modalities:
            nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[name].weight)

    def _fusion(self) -> Fusion:
        return self.lora_fusion

    def factors(self, modality: str) -> list[LoRAFactor]:
        """``modality``'s one low-rank pair over every output channel, as
        :meth:`MultimodalLoRA.factors <mmpeft.tuners.lora.MultimodalLoRA.factors>` gives a linear layer's."""
        self._check_modality(modality)
        return [LoRAFactor("all", slice(0, self.out_channels), self.lora_A[modality], self.lora_B[modality], None)]

    # ------------------------------------------------------------------ merging
    def cannot_merge(self) -> str | None:
        return mixing_refusal(self.lora_fusion)

    def _lora_weight(self, modality: str) -> torch.Tensor:
        """(out, in, kh, kw) float32: ``scaling * sum_r B_m[:, r] A_m[r]`` (B_m is 1x1)."""
        a = self.lora_A[modality].weight.float()  # (r, in, kh, kw)
        b = self.lora_B[modality].weight.float().flatten(1)  # (out, r)
        return torch.einsum("or,rikl->oikl", b, a) * self.scaling

    def _dora_scale(self, modality: str) -> torch.Tensor:
        """(out,) DoRA's ``mag_m / ||W + delta_m||`` per output channel (the norm detached)."""
        w = self.base_layer.weight.flatten(1)  # (out, in*kh*kw)
        return dora_scale(self.lora_magnitude_vector[modality], w, self._lora_weight(modality).flatten(1), None)

    def get_delta_weight(self, modality: str) -> torch.Tensor:
        """(out, in, kh, kw) float32: ``scaling * B_m A_m``; with DoRA ``g_m (W + delta_m) - W``."""
        self._check_modality(modality)
        delta = self._lora_weight(modality)
        if not self.use_dora:
            return delta
        g = self._dora_scale(modality).float()[:, None, None, None]  # (out, 1, 1, 1)
        return (g - 1) * self.base_layer.weight.float() + g * delta

    def _forward_merged(self, x: torch.Tensor) -> torch.Tensor:
        """x: (S*N, in, H, W) -> (S*N, out, H', W') with the merged per-modality weights."""
        w, b = self.merged_weight, self.base_layer.bias
        assert w is not None
        b = None if b is None else b.to(x.dtype)
        if self.single is not None:
            return self._conv(x, w[self.single].to(x.dtype), b)
        idx = list(range(len(self.modalities))) if self.present is None else list(self.present)
        y = self._grouped(x, w[idx].to(x.dtype), b)  # (S, N, out, H', W')
        return y.reshape(x.shape[0], *y.shape[2:])

    # ------------------------------------------------------------------ convolutions
    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int = 1) -> torch.Tensor:
        """The base layer's convolution (stride, padding, dilation, padding mode) with ``weight``."""
        base = self.base_layer
        padding = base.padding
        if base.padding_mode != "zeros":
            x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            padding = (0, 0)
        return F.conv2d(x, weight, bias, base.stride, padding, base.dilation, groups)

    def _grouped(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """One grouped convolution applying ``weight[s]`` (S, o, in, kh, kw) to modality s of the
        stacked x (S*N, in, H, W), with the shared ``bias`` (o,). Returns (S, N, o, H', W')."""
        s = weight.shape[0]
        n, c, h, w = x.shape
        xg = x.view(s, n // s, c, h, w).transpose(0, 1).reshape(n // s, s * c, h, w)  # (N, S*in, H, W)
        y = self._conv(xg, weight.flatten(0, 1), None if bias is None else bias.repeat(s), groups=s)
        return y.view(n // s, s, -1, *y.shape[-2:]).transpose(0, 1)

    # ------------------------------------------------------------------ the forward's steps (MultimodalLayer.forward)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (M*N, in, H, W) stacked modality-major -> (M*N, out, H', W') (:meth:`MultimodalLayer.forward`)."""
        if x.dim() != 4:
            raise MmpeftValueError(f"{type(self).__name__} expects a (M*N, C, H, W) batch, got shape {tuple(x.shape)}")
        return super().forward(x)

    def _delta(self, xd: torch.Tensor, modality: str) -> torch.Tensor:
        """scaling * B_m(A_m(x')), x' the input after dropout; the (float32 master) weights cast to its dtype."""
        h = self._conv(xd, self.lora_A[modality].weight.to(xd.dtype), None)
        return F.conv2d(h, self.lora_B[modality].weight.to(h.dtype)) * self.scaling

    def _frozen_product(self, xd: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``conv(x', W)`` without the bias: from the base output when x' is x (no dropout)."""
        b = self.base_layer.bias
        if isinstance(self.lora_dropout, nn.Identity) or not self.lora_dropout.training:
            return out if b is None else out - b.to(out.dtype).view(-1, 1, 1)
        return self._conv(xd, self.base_layer.weight.to(xd.dtype), None)

    def _dora(self, g: torch.Tensor, wx: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """DoRA's addition (:func:`dora_extra`) with g (..., out) broadcast over (out, H', W')."""
        return dora_extra(g[..., None, None], wx, d)

    def _forward_one(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        """One modality's batch (N, in, H, W) -> base output plus its update (no mixing)."""
        out = self.base_layer(x)
        xd = self.lora_dropout(x)
        d = self._delta(xd, modality)
        if self.use_dora:
            d = self._dora(self._dora_scale(modality), self._frozen_product(xd, out), d)
        return out + d.to(out.dtype)

    def _forward_batched(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen convolution once over the stacked batch; every A_m in one grouped convolution."""
        mods = self._active()
        out = self.base_layer(x)  # (S*N, out, H', W')
        xd = self.lora_dropout(x)
        a = torch.stack([self.lora_A[m].weight for m in mods]).to(x.dtype)  # (S, r, in, kh, kw)
        h = self._grouped(xd, a)  # (S, N, r, H', W')
        b = torch.stack([self.lora_B[m].weight.flatten(1) for m in mods]).to(h.dtype)  # (S, out, r)
        d = torch.einsum("snrhw,sor->snohw", h, b) * self.scaling
        if self.use_dora:
            g = torch.stack([self._dora_scale(m) for m in mods])[:, None]  # (S, 1, out)
            d = self._dora(g, self._frozen_product(xd, out).view(d.shape), d)
        return out + self._mix(d).reshape(out.shape).to(out.dtype)

    def _forward_loop(self, x: torch.Tensor) -> torch.Tensor:
        mods = self._active()
        xs = x.chunk(len(mods), 0)
        outs = [self.base_layer(xm) for xm in xs]  # the frozen layer once per modality
        xds = [self.lora_dropout(xm) for xm in xs]
        d = [self._delta(xdm, mod) for xdm, mod in zip(xds, mods)]
        if self.use_dora:
            parts = zip(mods, xds, outs, d)
            d = [self._dora(self._dora_scale(m), self._frozen_product(xdm, o), dm) for m, xdm, o, dm in parts]
        mixed = self._mix(torch.stack(d))
        return torch.cat([o + dm.to(o.dtype) for o, dm in zip(outs, mixed)], 0)

    def extra_repr(self) -> str:
        dora = ", dora" if self.use_dora else ""
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}{dora}, merged={self.merged}"


def _check_conv(layer: nn.Module) -> None:
    """Refuse what the layer cannot express: not a Conv2d, or a grouped convolution."""
    if not isinstance(layer, nn.Conv2d):
        raise MmpeftTypeError(f"MultimodalLoRAConv2d wraps nn.Conv2d, got {type(layer).__name__}")
    if layer.groups != 1:
        raise MmpeftValueError(
            f"MultimodalLoRAConv2d supports groups=1 convolutions only, got groups={layer.groups}: a grouped "
            "(e.g. depthwise) convolution's weight has no full in -> out map for a rank-r update B A"
        )
