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
import math
from collections.abc import Sequence
from typing import Any, overload

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

__all__ = [
    "Conv",
    "ConvBN",
    "ConvBNReLU",
    "SeparableConvBN",
    "trunc_normal_inverse_cdf_",
    "relative_position_index",
    "pad_right_bottom",
    "GlobalLocalAttention",
    "Mlp",
    "Block",
    "WF",
    "FeatureRefinementHead",
    "SegmentationHead",
    "UNetFormerDecoder",
    "check_decoder_features",
]


# ----------------------------------------------------------------------------- building blocks
def _same_padding(kernel_size: int, stride: int = 1, dilation: int = 1) -> int:
    """Sheet rule ((stride-1) + dilation*(k-1)) // 2; an even k (8 -> 3) shrinks the map by 1."""
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2


def _conv2d(
    in_ch: int, out_ch: int, k: int, stride: int, dilation: int, groups: int, bias: bool
) -> nn.Conv2d:
    pad = _same_padding(k, stride, dilation)
    return nn.Conv2d(
        in_ch, out_ch, k, stride=stride, padding=pad, dilation=dilation, groups=groups, bias=bias
    )


class Conv(nn.Sequential):
    """A lone Conv2d (no bias by default) in a Sequential, so its keys read ``*.0.weight``."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        dilation: int = 1,
        stride: int = 1,
        bias: bool = False,
    ) -> None:
        super().__init__(_conv2d(in_ch, out_ch, kernel_size, stride, dilation, 1, bias))


class ConvBN(nn.Sequential):
    """Conv2d (no bias) -> norm. Keys ``*.0`` (conv) and ``*.1`` (norm)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        dilation: int = 1,
        stride: int = 1,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        bias: bool = False,
    ) -> None:
        super().__init__(_conv2d(in_ch, out_ch, kernel_size, stride, dilation, 1, bias), norm_layer(out_ch))


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias) -> norm -> activation (ReLU6). Keys ``*.0``, ``*.1``."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        dilation: int = 1,
        stride: int = 1,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.ReLU6,
        bias: bool = False,
    ) -> None:
        super().__init__(
            _conv2d(in_ch, out_ch, kernel_size, stride, dilation, 1, bias), norm_layer(out_ch), act_layer()
        )


class SeparableConvBN(nn.Sequential):
    """Depthwise k x k conv -> norm -> pointwise 1x1 conv, all without bias; no activation.

    The reference normalises with ``BatchNorm2d(out)``, which only works because in == out at
    every use; here the norm has ``in_ch`` channels (same keys and shapes when in == out).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 3,
        dilation: int = 1,
        stride: int = 1,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
    ) -> None:
        super().__init__(
            _conv2d(in_ch, in_ch, kernel_size, stride, dilation, in_ch, False),
            norm_layer(in_ch),
            nn.Conv2d(in_ch, out_ch, kernel_size=1, bias=False),
        )


# ----------------------------------------------------------------------------- helpers
@torch.no_grad()
def trunc_normal_inverse_cdf_(
    tensor: Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0
) -> Tensor:
    """Truncated normal by inverse CDF, in place (the recipe timm's ``trunc_normal_`` uses).

    Draw u ~ U(2*Phi((a-mean)/std) - 1, 2*Phi((b-mean)/std) - 1), then erfinv(u) * std * sqrt(2)
    + mean, clamped to [a, b]. ``a`` and ``b`` are absolute bounds. With std 0.02 and the
    default bounds this is U(-1, 1) -> erfinv -> * 0.02 * sqrt(2) -> clamp(-2, 2). It consumes
    exactly ``tensor.numel()`` uniforms (unlike torch's rejection-sampling ``trunc_normal_``).
    """

    def norm_cdf(x: float) -> float:
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    lo = norm_cdf((a - mean) / std)
    hi = norm_cdf((b - mean) / std)
    tensor.uniform_(2 * lo - 1, 2 * hi - 1)
    tensor.erfinv_()
    tensor.mul_(std * math.sqrt(2.0))
    tensor.add_(mean)
    tensor.clamp_(min=a, max=b)
    return tensor


def relative_position_index(window_size: int) -> Tensor:
    """(ws*ws, ws*ws) int64 index into a ((2ws-1)^2, heads) bias table.

    Tokens are numbered row-major, t = ws*r + c; index[i, j] = (r_i - r_j + ws - 1) * (2ws - 1)
    + (c_i - c_j + ws - 1). For ws = 8: range 0..224, index[0, 0] = 112.
    """
    ws = window_size
    rows, cols = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")  # (ws, ws) each
    coords = torch.stack([rows.flatten(), cols.flatten()])  # (2, N), N = ws*ws
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    rel = rel + (ws - 1)  # both offsets now in 0..2ws-2
    return rel[0] * (2 * ws - 1) + rel[1]  # (N, N)


def pad_right_bottom(x: Tensor, pad_h: int, pad_w: int) -> Tensor:
    """Pad x: (B, C, H, W) to (B, C, H + pad_h, W + pad_w) at the bottom and right.

    Reflect padding (one 4-element ``F.pad``) where it is possible, i.e. pad < size along
    that axis; an axis where it is not (pad >= size) is padded with ``replicate``.
    """
    if pad_h == 0 and pad_w == 0:
        return x
    height, width = x.shape[-2:]
    if pad_h < height and pad_w < width:
        return F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
    if pad_w > 0:
        x = F.pad(x, (0, pad_w, 0, 0), mode="reflect" if pad_w < width else "replicate")
    if pad_h > 0:
        x = F.pad(x, (0, 0, 0, pad_h), mode="reflect" if pad_h < height else "replicate")
    return x


# ----------------------------------------------------------------------------- attention
class GlobalLocalAttention(nn.Module):
    """Window self-attention (global branch) + 3x3/1x1 ConvBN (local branch) of UNetFormer.

    Steps (sheet section 6): local = local2(x) + local1(x); pad to a multiple of the window;
    per-window multi-head attention with a relative position bias (no shift, no mask); crop;
    axial average pooling of the result along H and along W; add local; reflect-pad 1 right and
    bottom; proj (depthwise ws x ws, pad ws/2 - 1, -> BN -> 1x1). The raw attention output is
    only used through its two pooled versions. 63,624 parameters for dim 64, 8 heads, window 8.

    Args:
        dim: channels in and out.
        num_heads: attention heads; ``dim`` must be divisible by it.
        qkv_bias: bias on the fused 1x1 qkv conv.
        window_size: window side; must be even (the axial pools and proj are then size-exact).
    """

    def __init__(
        self, dim: int = 64, num_heads: int = 8, qkv_bias: bool = False, window_size: int = 8
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        if window_size < 2 or window_size % 2 != 0:
            raise ValueError(f"window_size must be even and >= 2, got {window_size}")
        self.num_heads = num_heads
        self.window_size = ws = window_size
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(ws), persistent=True)
        # RNG order: qkv, local1, local2, proj (dw, pw), then the bias table below.
        self.qkv = Conv(dim, 3 * dim, kernel_size=1, bias=qkv_bias)
        self.local1 = ConvBN(dim, dim, kernel_size=3)
        self.local2 = ConvBN(dim, dim, kernel_size=1)
        self.proj = SeparableConvBN(dim, dim, kernel_size=ws)
        pool_pad = ws // 2 - 1
        self.attn_x = nn.AvgPool2d(kernel_size=(ws, 1), stride=1, padding=(pool_pad, 0))
        self.attn_y = nn.AvgPool2d(kernel_size=(1, ws), stride=1, padding=(0, pool_pad))
        trunc_normal_inverse_cdf_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> Tensor:
        """(heads, N, N) bias, N = ws*ws: bias[n, i, j] = table[index[i, j], n]."""
        n = self.window_size**2
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # (N*N, heads)
        return bias.view(n, n, -1).permute(2, 0, 1).contiguous()  # (heads, N, N)

    def window_attention(self, qkv: Tensor) -> Tensor:
        """qkv: (B, 3C, Hp, Wp), Hp and Wp multiples of ws -> attention output (B, C, Hp, Wp).

        Channels split as (which in q/k/v, head, d); windows are ordered (b, row, col) and
        tokens row-major inside a window.
        """
        b, c3, hp, wp = qkv.shape
        ws, nh = self.window_size, self.num_heads
        hd = c3 // (3 * nh)
        hh, ww = hp // ws, wp // ws
        qkv = qkv.view(b, 3, nh, hd, hh, ws, ww, ws)
        qkv = qkv.permute(1, 0, 4, 6, 2, 5, 7, 3)  # (3, B, hh, ww, nh, ws, ws, hd)
        q, k, v = qkv.reshape(3, b * hh * ww, nh, ws * ws, hd).unbind(0)  # each (Bw, nh, N, hd)
        dots = (q @ k.transpose(-2, -1)) * self.scale  # (Bw, nh, N, N)
        dots = dots + self.relative_position_bias().unsqueeze(0)
        out = dots.softmax(dim=-1) @ v  # (Bw, nh, N, hd)
        out = out.view(b, hh, ww, nh, ws, ws, hd)
        out = out.permute(0, 3, 6, 1, 4, 2, 5)  # (B, nh, hd, hh, ws, ww, ws)
        return out.reshape(b, nh * hd, hp, wp)

    def axial_pool(self, o: Tensor) -> Tensor:
        """o: (B, C, H, W) -> AX + AY, (B, C, H, W).

        AX[i] = (1/ws) * sum_{t=i-ws/2+1}^{i+ws/2} O'[t] along H, where O' is o with one
        reflected row at the bottom (O'[H] = O[H-2]) and zeros beyond; AY likewise along W.
        """
        ax = self.attn_x(pad_right_bottom(o, 1, 0))  # (B, C, H, W)
        ay = self.attn_y(pad_right_bottom(o, 0, 1))  # (B, C, H, W)
        return ax + ay

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) (any H, W >= 1) -> (B, C, H, W)."""
        _, _, h, w = x.shape
        local = self.local2(x) + self.local1(x)  # on the unpadded map
        ws = self.window_size
        xp = pad_right_bottom(x, (-h) % ws, (-w) % ws)  # (B, C, Hp, Wp)
        out = self.window_attention(self.qkv(xp))[:, :, :h, :w]  # (B, C, H, W)
        out = self.axial_pool(out) + local
        out = pad_right_bottom(out, 1, 1)  # (B, C, H+1, W+1)
        return self.proj(out)  # even ws: exactly (B, C, H, W)


class Mlp(nn.Module):
    """1x1 conv MLP: fc1 (bias) -> act -> dropout -> fc2 (bias) -> dropout."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int,
        act_layer: type[nn.Module] = nn.ReLU6,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(in_features, hidden_features, kernel_size=1)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(hidden_features, out_features, kernel_size=1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H, W)."""
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + GLA(norm1(x)), then x + Mlp(norm2(x)).

    96,968 parameters for dim 64, 8 heads, window 8, mlp_ratio 4.
    (The reference also accepts an ``attn_drop`` that it never uses; it is left out here.)
    """

    def __init__(
        self,
        dim: int = 64,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: type[nn.Module] = nn.ReLU6,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        window_size: int = 8,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = GlobalLocalAttention(dim, num_heads, qkv_bias, window_size)
        self.drop_path: nn.Module = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim, act_layer, drop)
        self.norm2 = norm_layer(dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# ----------------------------------------------------------------------------- fusion heads
def _check_skip(x: Tensor, res: Tensor) -> None:
    if res.shape[-2:] != (2 * x.shape[-2], 2 * x.shape[-1]):
        raise ValueError(
            f"skip map must be twice the decoder map: decoder {tuple(x.shape)}, skip {tuple(res.shape)}"
        )


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
def _forward_levels(
    res1: Tensor, res2: Tensor, res3: Tensor, res4: Tensor, h: int, w: int
) -> None: ...


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
    def forward(
        self, res1: Tensor, res2: Tensor, res3: Tensor, res4: Tensor, h: int, w: int
    ) -> Tensor: ...

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
        raise TypeError(
            "UNetFormerDecoder.forward takes (features, size) or (res1, res2, res3, res4, h, w)"
        )
