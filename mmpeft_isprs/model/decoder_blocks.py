"""Building blocks of the UNetFormer decoder: convolutions, helpers and the global-local Block.

Written from the project's fact sheet (``shared/DFM_DECODER.md`` sections 0 and 4-15); see
:mod:`mmpeft_isprs.model.decoder` for the data flow and the padding rule.
"""

from __future__ import annotations

import math

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
]


# ----------------------------------------------------------------------------- building blocks
def _same_padding(kernel_size: int, stride: int = 1, dilation: int = 1) -> int:
    """Sheet rule ((stride-1) + dilation*(k-1)) // 2; an even k (8 -> 3) shrinks the map by 1."""
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2


def _conv2d(in_ch: int, out_ch: int, k: int, stride: int, dilation: int, groups: int, bias: bool) -> nn.Conv2d:
    pad = _same_padding(k, stride, dilation)
    return nn.Conv2d(in_ch, out_ch, k, stride=stride, padding=pad, dilation=dilation, groups=groups, bias=bias)


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

    def __init__(self, dim: int = 64, num_heads: int = 8, qkv_bias: bool = False, window_size: int = 8) -> None:
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
