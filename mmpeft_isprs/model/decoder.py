"""UNetFormer decoder as used by MFNet (global-local attention blocks + weighted fusions).

Written from the project's fact sheet (``shared/DFM_DECODER.md`` sections 0 and 4-15); no line
comes from the authors' code. Layer names, registration order (= state-dict order), RNG
consumption order and every numeric step follow the sheet, so reference checkpoints load with
``strict=True`` and a seeded build gives the reference initial weights.

Data flow (decode channels D = 64, input h x w, levels from the DFM)::

    res4 (B,256,h/32,w/32) -> pre_conv (1x1 ConvBN) -> b4 (Block)                 (B,D,h/32,w/32)
    p3: up x2, fuse with res3 (1/16) -> b3                                        (B,D,h/16,w/16)
    p2: up x2, fuse with res2 (1/8)  -> b2                                        (B,D,h/8,w/8)
    p1: up x2, fuse with res1 (1/4), feature refinement                           (B,D,h/4,w/4)
    segmentation_head -> bilinear resize to (h, w)                                (B,K,h,w)

Input sizes. The reference pads a window row/column with a 2-element ``F.pad`` that crashes on
4-D input, so it only runs when every Block sees a width that is a multiple of 8 and reflect
padding has room (sheet section 14). Here :func:`pad_right_bottom` pads right/bottom with one
4-element reflect ``F.pad``; where reflect is impossible (pad >= size along an axis, e.g. a
4-row map padded by 4, or a 1-pixel map padded by 1) that axis is padded with ``replicate``
instead, the nearest analogue of reflect (real border content, never zeros). Every side that
is a multiple of 32 therefore works; wherever the reference runs, the padding and hence the
output are the same as the reference's.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .decoder_blocks import Block, Conv, ConvBN, ConvBNReLU, SeparableConvBN

__all__ = [
    "WF",
    "FeatureRefinementHead",
    "SegmentationHead",
    "UNetFormerDecoder",
    "check_decoder_features",
]


# ----------------------------------------------------------------------------- fusion heads
def _check_skip(x: Tensor, res: Tensor) -> None:
    if res.shape[-2:] != (2 * x.shape[-2], 2 * x.shape[-1]):
        raise ValueError(f"skip map must be twice the decoder map: decoder {tuple(x.shape)}, skip {tuple(res.shape)}")


class WF(nn.Module):
    """Weighted fusion: post_conv(f0 * pre_conv(res) + f1 * up2(x)), f = relu(w) / (sum + eps).

    ``weights`` starts at ones(2), so f = [0.5, 0.5] exactly. 53,378 parameters for 256 -> 64.
    """

    def __init__(self, in_channels: int = 256, decode_channels: int = 64, eps: float = 1e-8) -> None:
        super().__init__()
        self.pre_conv = Conv(in_channels, decode_channels, kernel_size=1)
        self.weights = nn.Parameter(torch.ones(2, dtype=torch.float32))
        self.eps = eps
        self.post_conv = ConvBNReLU(decode_channels, decode_channels, kernel_size=3)

    def fusion_weights(self) -> Tensor:
        """(2,) normalised weights [skip, decoder path]."""
        w = F.relu(self.weights)
        return w / (torch.sum(w, dim=0) + self.eps)

    def fuse(self, x: Tensor, res: Tensor) -> Tensor:
        """x: (B, D, H, W), res: (B, C_in, 2H, 2W) -> (B, D, 2H, 2W) (after post_conv)."""
        _check_skip(x, res)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)  # (B, D, 2H, 2W)
        f = self.fusion_weights()
        x = f[0] * self.pre_conv(res) + f[1] * x
        return self.post_conv(x)

    def forward(self, x: Tensor, res: Tensor) -> Tensor:
        """x: (B, D, H, W) decoder map, res: (B, C_in, 2H, 2W) skip -> (B, D, 2H, 2W)."""
        return self.fuse(x, res)


class FeatureRefinementHead(WF):
    """WF fusion followed by spatial (pa) and channel (ca) attention and a residual (63,554 params).

    out = ReLU6(proj(sigmoid(dw3x3(x)) * x + sigmoid(MLP(GAP(x))) * x) + shortcut(x)).
    """

    def __init__(self, in_channels: int = 64, decode_channels: int = 64, eps: float = 1e-8) -> None:
        super().__init__(in_channels, decode_channels, eps)
        d = decode_channels
        self.pa = nn.Sequential(nn.Conv2d(d, d, kernel_size=3, padding=1, groups=d), nn.Sigmoid())
        self.ca = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            Conv(d, d // 16, kernel_size=1),
            nn.ReLU6(),
            Conv(d // 16, d, kernel_size=1),
            nn.Sigmoid(),
        )
        self.shortcut = ConvBN(d, d, kernel_size=1)
        self.proj = SeparableConvBN(d, d, kernel_size=3)
        self.act = nn.ReLU6()

    def forward(self, x: Tensor, res: Tensor) -> Tensor:
        """x: (B, D, H, W) decoder map, res: (B, C_in, 2H, 2W) skip -> (B, D, 2H, 2W)."""
        x = self.fuse(x, res)
        shortcut = self.shortcut(x)
        pa = self.pa(x) * x
        ca = self.ca(x) * x
        return self.act(self.proj(pa + ca) + shortcut)


class SegmentationHead(nn.Sequential):
    """ConvBNReLU 3x3 -> Dropout2d -> 1x1 conv to classes (no bias). Keys 0.0, 0.1, 2.0.

    The reference's Dropout2d is in-place; here it is not (same values, safer for autograd).
    """

    def __init__(self, decode_channels: int = 64, num_classes: int = 6, dropout: float = 0.1) -> None:
        super().__init__(
            ConvBNReLU(decode_channels, decode_channels, kernel_size=3),
            nn.Dropout2d(p=dropout),
            Conv(decode_channels, num_classes, kernel_size=1),
        )


# ----------------------------------------------------------------------------- decoder
def check_decoder_features(features: Sequence[Tensor], channels: Sequence[int]) -> None:
    """Raise ValueError unless features = [1/4, 1/8, 1/16, 1/32] maps, each half the previous.

    features: 4 tensors (B, channels[i], H_i, W_i) with H_i = 2 * H_{i+1}, W_i = 2 * W_{i+1}.
    """
    shapes = [tuple(f.shape) for f in features]
    expected = "[(B,C1,4a,4b), (B,C2,2a,2b), (B,C3,a,b), (B,C4,a/2,b/2)] with C = " + str(tuple(channels))
    if len(shapes) != 4 or any(len(s) != 4 for s in shapes):
        raise ValueError(f"decoder expects 4 maps {expected}; got shapes {shapes}")
    ok = all(s[0] == shapes[0][0] for s in shapes) and all(s[1] == c for s, c in zip(shapes, channels))
    for hi, lo in zip(shapes[:-1], shapes[1:]):
        ok = ok and hi[2] == 2 * lo[2] and hi[3] == 2 * lo[3]
    if not ok:
        raise ValueError(
            f"inconsistent decoder feature sizes: expected {expected} (each level exactly twice "
            f"the next; input sides must be multiples of 32); got shapes {shapes}"
        )


def _forward_list(features: Sequence[Tensor], size: tuple[int, int]) -> None: ...
def _forward_levels(res1: Tensor, res2: Tensor, res3: Tensor, res4: Tensor, h: int, w: int) -> None: ...


_LIST_SIGNATURE = inspect.signature(_forward_list)
_LEVELS_SIGNATURE = inspect.signature(_forward_levels)


class UNetFormerDecoder(nn.Module):
    """UNetFormer decoder: pre_conv, b4, b3, p3, b2, p2, p1, segmentation_head.

    515,102 parameters for the defaults (514,718 + 64 * num_classes). The reference's
    ``init_weight`` is a no-op (it only visits direct Conv2d children, of which there are none),
    so layers keep PyTorch's default init plus the relative-position-table recipe.

    Args:
        encoder_channels: channels of the 1/4, 1/8, 1/16 and 1/32 inputs.
        decode_channels: width D of the decoder.
        dropout: Dropout2d probability in the segmentation head.
        window_size: attention window (even).
        num_heads: attention heads of each Block.
        num_classes: K, output channels.
    """

    def __init__(
        self,
        encoder_channels: Sequence[int] = (256, 256, 256, 256),
        decode_channels: int = 64,
        dropout: float = 0.1,
        window_size: int = 8,
        num_heads: int = 8,
        num_classes: int = 6,
    ) -> None:
        super().__init__()
        if len(encoder_channels) != 4:
            raise ValueError(f"encoder_channels needs 4 entries, got {tuple(encoder_channels)}")
        self.encoder_channels = tuple(encoder_channels)
        d = decode_channels
        # Registration order = state-dict order = RNG order of the reference.
        self.pre_conv = ConvBN(encoder_channels[-1], d, kernel_size=1)
        self.b4 = Block(dim=d, num_heads=num_heads, window_size=window_size)
        self.b3 = Block(dim=d, num_heads=num_heads, window_size=window_size)
        self.p3 = WF(encoder_channels[-2], d)
        self.b2 = Block(dim=d, num_heads=num_heads, window_size=window_size)
        self.p2 = WF(encoder_channels[-3], d)
        self.p1 = FeatureRefinementHead(encoder_channels[-4], d)
        self.segmentation_head = SegmentationHead(d, num_classes, dropout)

    def decode(self, features: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        """features: [res1 (B,C,4a,4b), res2 (B,C,2a,2b), res3 (B,C,a,b), res4 (B,C,a/2,b/2)]
        (levels 1/4 .. 1/32 of the input); size: (h, w) of the logits -> (B, K, h, w).
        """
        check_decoder_features(features, self.encoder_channels)
        res1, res2, res3, res4 = features
        x = self.b4(self.pre_conv(res4))  # (B, D, a/2, b/2)
        x = self.b3(self.p3(x, res3))  # (B, D, a, b)
        x = self.b2(self.p2(x, res2))  # (B, D, 2a, 2b)
        x = self.p1(x, res1)  # (B, D, 4a, 4b)
        x = self.segmentation_head(x)  # (B, K, 4a, 4b)
        out_size = (int(size[0]), int(size[1]))
        return F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)

    @overload
    def forward(self, features: Sequence[Tensor], size: tuple[int, int]) -> Tensor: ...

    @overload
    def forward(self, res1: Tensor, res2: Tensor, res3: Tensor, res4: Tensor, h: int, w: int) -> Tensor: ...

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """``forward(features, size)`` or the reference's ``forward(res1, res2, res3, res4, h, w)``.

        res1: (B,C,4a,4b), res2: (B,C,2a,2b), res3: (B,C,a,b), res4: (B,C,a/2,b/2), with (a, b)
        the neck grid (input / 16); (h, w): logits size -> logits (B, K, h, w).
        """
        for signature in (_LIST_SIGNATURE, _LEVELS_SIGNATURE):
            try:
                a = signature.bind(*args, **kwargs).arguments
            except TypeError:
                continue
            if "features" in a:
                return self.decode(a["features"], a["size"])
            return self.decode([a["res1"], a["res2"], a["res3"], a["res4"]], (a["h"], a["w"]))
        raise TypeError("UNetFormerDecoder.forward takes (features, size) or (res1, res2, res3, res4, h, w)")
