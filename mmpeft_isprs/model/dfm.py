"""Deep Fusion Module (DFM) of MFNet: per-modality simple pyramids + per-level SE fusion.

Written from the project's fact sheet (``shared/DFM_DECODER.md`` sections 2, 3, 11 and 15);
no line comes from the authors' code.

Data flow for ``M`` modalities, each leaving the encoder neck as ``(B, C, h, w)``
(``h, w`` = input size / 16)::

    modality m --SimplePyramid_m--> [L1 (B,C,4h,4w), L2 (B,C,2h,2w), L3 (B,C,h,w), L4 (B,C,h/2,w/2)]
    fused_i = SEFusion_i(L_i(modality 0), ..., L_i(modality M-1))        i = 1..4

State-dict names differ from the authors' (their names only fit two modalities);
:func:`convert_reference_dfm_state_dict` maps a reference checkpoint onto this module:

=====================================  ============================================
authors' key                           key here
=====================================  ============================================
``fpn1x.{0,3}.*``, ``fpn1x.1.ln.*``    ``pyramids.0.fpn1.{0,3}.*``, ``pyramids.0.fpn1.1.ln.*``
``fpn1y.{0,3}.*``, ``fpn1y.1.*`` (BN)  ``pyramids.1.fpn1.{0,3}.*``, ``pyramids.1.fpn1.1.*``
``fpn2x.0.*`` / ``fpn2y.0.*``          ``pyramids.0.fpn2.0.*`` / ``pyramids.1.fpn2.0.*``
``fusionI.se_rgb.fc.{0,2}.*``          ``fusions.{I-1}.se.0.fc.{0,2}.*``
``fusionI.se_depth.fc.{0,2}.*``        ``fusions.{I-1}.se.1.fc.{0,2}.*``
=====================================  ============================================
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LayerNorm2dChannels",
    "SimplePyramid",
    "SqueezeExcitation",
    "SEFusion",
    "DeepFusionModule",
    "PyramidNorm",
    "resolve_pyramid_norms",
    "convert_reference_dfm_state_dict",
]

PyramidNorm = Literal["layernorm", "batchnorm"]
#: ``"authors"`` = LayerNorm for modality 0 and BatchNorm for every other modality (the
#: published model: optical LayerNorm, DSM BatchNorm); ``"layernorm"`` / ``"batchnorm"`` = the
#: same norm everywhere; or one entry per modality.
NormSpec = Literal["authors", "layernorm", "batchnorm"] | Sequence[str]
_NORMS: tuple[str, ...] = ("layernorm", "batchnorm")


class LayerNorm2dChannels(nn.Module):
    """LayerNorm over the channels of every pixel of an NCHW map (the authors' ``Norm2d``).

    Permutes to NHWC, applies ``nn.LayerNorm(channels, eps)`` (biased variance, affine) and
    permutes back (contiguous). The inner LayerNorm is called ``ln`` so that state-dict keys
    read ``....ln.weight`` / ``....ln.bias`` as in the reference checkpoints.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H, W), each pixel normalised over its C channels."""
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = self.ln(x)
        return x.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


def _make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "layernorm":
        return LayerNorm2dChannels(channels, eps=1e-6)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"unknown pyramid norm {kind!r}; expected one of {_NORMS}")


class SimplePyramid(nn.Module):
    """ViTDet-style simple feature pyramid from one stride-16 map (sheet section 2).

    Levels: ``fpn1`` 4x up (ConvT k2 s2 -> norm -> GELU -> ConvT k2 s2), ``fpn2`` 2x up
    (one ConvT k2 s2), ``fpn3`` identity, ``fpn4`` 2x2 max-pool (floor). ConvTs keep the channel
    count and have a bias. Parameters for 256 channels: 525,312 + 262,400 = 787,712.

    Args:
        channels: channels in and out of every level.
        norm: the norm inside ``fpn1``: ``"layernorm"`` (channel LayerNorm, eps 1e-6) or
            ``"batchnorm"`` (``nn.BatchNorm2d`` with PyTorch defaults).
        pool: down-sampling of the 1/32 level; only ``"max"`` (MaxPool2d(2)) is defined.
    """

    def __init__(
        self,
        channels: int = 256,
        norm: PyramidNorm = "layernorm",
        pool: Literal["max"] = "max",
    ) -> None:
        super().__init__()
        if pool != "max":
            raise ValueError(f"unknown pyramid pool {pool!r}; only 'max' is defined")
        # Registration order = RNG order: fpn1 ConvT (index 0), fpn1 ConvT (index 3), fpn2 ConvT.
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2),
            _make_norm(norm, channels),
            nn.GELU(),
            nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2),
        )
        self.fpn2 = nn.Sequential(nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2))
        self.fpn3 = nn.Identity()
        self.fpn4 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.channels = channels
        self.norm = norm

    def forward(self, x: Tensor) -> list[Tensor]:
        """x: (B, C, h, w) -> [(B,C,4h,4w), (B,C,2h,2w), (B,C,h,w), (B,C,h//2,w//2)]."""
        return [self.fpn1(x), self.fpn2(x), self.fpn3(x), self.fpn4(x)]


class SqueezeExcitation(nn.Module):
    """Channel gate: x * sigmoid(conv(relu(conv(GAP(x))))) (sheet section 3).

    ``fc`` = Conv1x1(C -> C // reduction, bias) -> ReLU -> Conv1x1(C // reduction -> C, bias)
    -> Sigmoid, so the keys are ``fc.0.*`` and ``fc.2.*``. 8,464 parameters for C = 256.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = channels // reduction
        if hidden < 1:
            raise ValueError(f"channels={channels} // reduction={reduction} must be >= 1")
        self.fc = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, kernel_size=1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H, W), x scaled by a per-(sample, channel) gate."""
        w = F.adaptive_avg_pool2d(x, 1)  # (B, C, 1, 1)
        w = self.fc(w)  # (B, C, 1, 1), in (0, 1)
        return x * w


class SEFusion(nn.Module):
    """Sum of per-input SE gates: ``out = SE_0(x_0) + SE_1(x_1) + ...`` (summed left to right).

    With two inputs ``se.0`` is the authors' ``se_rgb`` and ``se.1`` their ``se_depth``.
    """

    def __init__(self, channels: int, num_inputs: int = 2, reduction: int = 16) -> None:
        super().__init__()
        if num_inputs < 1:
            raise ValueError(f"num_inputs must be >= 1, got {num_inputs}")
        self.se = nn.ModuleList(SqueezeExcitation(channels, reduction) for _ in range(num_inputs))

    def forward(
        self, inputs: Sequence[Tensor], present: Sequence[int] | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """inputs: tensors (B, C, H, W) of one shape -> (B, C, H, W).

        Missing modalities: ``present`` = the indices of the inputs given (default all
        ``num_inputs``); ``mask``: (S, B) bool per-sample presence. The sum runs over the present
        branches only: ``out_b = sum_{m present in b} SE_m(x_m)_b`` (no rescaling).
        """
        idx = list(range(len(self.se))) if present is None else list(present)
        if len(inputs) != len(idx):
            raise ValueError(f"SEFusion expects {len(idx)} inputs, got {len(inputs)}")
        parts = [self.se[i](x) for i, x in zip(idx, inputs)]
        if mask is not None:  # an absent sample's branch contributes nothing (where: even a NaN branch)
            parts = [torch.where(mask[j].view(-1, 1, 1, 1), p, torch.zeros_like(p)) for j, p in enumerate(parts)]
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return out


def resolve_pyramid_norms(norms: NormSpec, num_modalities: int) -> tuple[str, ...]:
    """Turn a norm spec into one norm name per modality (see :data:`NormSpec`)."""
    if isinstance(norms, str):
        if norms == "authors":
            return ("layernorm",) + ("batchnorm",) * (num_modalities - 1)
        if norms in _NORMS:
            return (norms,) * num_modalities
        raise ValueError(f"unknown norms {norms!r}; expected 'authors', 'layernorm', 'batchnorm'")
    resolved = tuple(norms)
    if len(resolved) != num_modalities:
        raise ValueError(f"norms {resolved} has {len(resolved)} entries for {num_modalities} modalities")
    for kind in resolved:
        if kind not in _NORMS:
            raise ValueError(f"unknown pyramid norm {kind!r}; expected one of {_NORMS}")
    return resolved


class DeepFusionModule(nn.Module):
    """One :class:`SimplePyramid` per modality, then one :class:`SEFusion` per level.

    For 256 channels and two modalities: 1,643,136 parameters (pyramids 1,575,424 + four SE
    fusions of 16,928).

    Args:
        channels: channels of the neck output (and of every level).
        num_modalities: number of encoder outputs to fuse (1, 2, 3, ...).
        norms: norm of each pyramid's 4x branch. Default ``"authors"`` (= ``("layernorm",
            "batchnorm")`` for two modalities, as in the published model); ``"layernorm"``
            gives the clean variant with a channel LayerNorm everywhere.
        reduction: SE bottleneck reduction (16 -> 256 // 16 = 16 hidden channels).
        pyramid: builds one modality's pyramid from its norm name (default: a
            :class:`SimplePyramid` of ``channels`` on one map); :mod:`.pyramid` has those of the
            multi-scale encoders (SAM2's Hiera, timm ViTs), which take a list of maps per modality.
    """

    num_levels: int = 4

    def __init__(
        self,
        channels: int = 256,
        num_modalities: int = 2,
        norms: NormSpec = "authors",
        reduction: int = 16,
        pyramid: Callable[[str], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if num_modalities < 1:
            raise ValueError(f"num_modalities must be >= 1, got {num_modalities}")
        self.channels = channels
        self.num_modalities = num_modalities
        self.norms = resolve_pyramid_norms(norms, num_modalities)
        # Registration order = RNG order of the reference: all pyramids, then fusion1..4.
        make = pyramid or (lambda norm: SimplePyramid(channels, norm))  # type: ignore[arg-type]
        self.pyramids = nn.ModuleList(make(norm) for norm in self.norms)
        self.fusions = nn.ModuleList(SEFusion(channels, num_modalities, reduction) for _ in range(self.num_levels))

    def _check_inputs(self, features: Sequence[Tensor], expected: int) -> None:
        if features and not isinstance(features[0], Tensor):  # lists of maps: the pyramids check them
            if len(features) != expected:
                raise ValueError(f"DFM expects the maps of {expected} modalities, got {len(features)}")
            return
        shapes = [tuple(f.shape) for f in features]
        if len(features) != expected or not features:
            raise ValueError(f"DFM expects {expected} feature maps, got shapes {shapes}")
        first = shapes[0]
        if len(first) != 4 or first[1] != self.channels or any(s != first for s in shapes):
            raise ValueError(
                f"DFM expects {self.num_modalities} maps of one shape (B, {self.channels}, h, w); got shapes {shapes}"
            )

    def forward(
        self, features: Sequence[Tensor], present: Sequence[int] | None = None, mask: Tensor | None = None
    ) -> list[Tensor]:
        """features: num_modalities maps (B, C, h, w) (neck outputs, h, w = input / 16), or one list of
        maps per modality when the pyramids take lists (:mod:`.pyramid`).

        Returns the fused maps [(B,C,4h,4w), (B,C,2h,2w), (B,C,h,w), (B,C,h//2,w//2)], i.e.
        levels 1/4, 1/8, 1/16 and 1/32 of the input. Missing modalities: ``present`` = indices
        of the modalities whose maps are given (default all), ``mask`` (S, B) per-sample presence;
        only the present branches run and enter the SE fusion (:class:`SEFusion`).
        """
        idx = list(range(self.num_modalities)) if present is None else list(present)
        self._check_inputs(features, len(idx))
        levels = [self.pyramids[i](x) for i, x in zip(idx, features)]  # [S][4] maps
        return [fusion([lv[i] for lv in levels], idx, mask) for i, fusion in enumerate(self.fusions)]


_REF_PYRAMID = re.compile(r"^fpn([1-4])([xy])\.(.+)$")
_REF_FUSION = re.compile(r"^fusion([1-4])\.se_(rgb|depth)\.(.+)$")


def convert_reference_dfm_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a reference (authors') two-modality DFM state dict to this module's names.

    ``state_dict`` holds the DFM keys without any model prefix (``fpn1x.0.weight``,
    ``fusion3.se_depth.fc.2.bias``, ...). Raises ``KeyError`` on any key it cannot map, so
    nothing is silently dropped. The result loads with ``strict=True`` into
    ``DeepFusionModule(256, 2, "authors")``.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        m = _REF_PYRAMID.match(key)
        if m is not None:
            level, branch, rest = m.groups()
            out[f"pyramids.{'xy'.index(branch)}.fpn{level}.{rest}"] = value
            continue
        m = _REF_FUSION.match(key)
        if m is not None:
            level, branch, rest = m.groups()
            se_idx = 0 if branch == "rgb" else 1
            out[f"fusions.{int(level) - 1}.se.{se_idx}.{rest}"] = value
            continue
        raise KeyError(f"not a reference DFM key: {key!r}")
    return out
