"""torchvision's Swin Transformer (v1 and v2) with an attention whose projections are called.

torchvision's ``ShiftedWindowAttention`` hands ``self.qkv.weight`` and ``self.proj.weight`` to the
function ``shifted_window_attention`` (``F.linear``), so a multimodal layer put in place of
``attn.qkv`` or ``attn.proj`` would be read as ``.weight`` and never called.
:func:`make_swin_attention_explicit` changes the class of each such attention, in place, to a
subclass whose forward computes the same function but calls ``self.qkv(x)`` and ``self.proj(x)``:
the same module, parameters, buffers and state-dict keys (torchvision checkpoints load unchanged).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, ShiftedWindowAttentionV2

__all__ = ["ExplicitShiftedWindowAttention", "ExplicitShiftedWindowAttentionV2", "make_swin_attention_explicit"]


def _windows(x: torch.Tensor, ws: list[int], shift: list[int]) -> tuple[torch.Tensor, list[int], int, int]:
    """(B, H, W, C) -> padded, shifted windows (B*nW, Ws*Ws, C), the effective shift and padded size."""
    _, h, w, c = x.shape
    x = F.pad(x, (0, 0, 0, (ws[1] - w % ws[1]) % ws[1], 0, (ws[0] - h % ws[0]) % ws[0]))
    _, ph, pw, _ = x.shape
    shift = [0 if ws[0] >= ph else shift[0], 0 if ws[1] >= pw else shift[1]]  # no shift in a single window
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = x.view(-1, ph // ws[0], ws[0], pw // ws[1], ws[1], c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws[0] * ws[1], c), shift, ph, pw


def _shift_mask(x: torch.Tensor, ws: list[int], shift: list[int], ph: int, pw: int) -> torch.Tensor:
    """(nW, N, N) additive mask keeping shifted windows' regions apart (torchvision's values)."""
    mask = x.new_zeros((ph, pw))
    hs = ((0, -ws[0]), (-ws[0], -shift[0]), (-shift[0], None))
    wss = ((0, -ws[1]), (-ws[1], -shift[1]), (-shift[1], None))
    for i, h in enumerate(hs):
        for j, w in enumerate(wss):
            mask[h[0] : h[1], w[0] : w[1]] = 3 * i + j
    mask = mask.view(ph // ws[0], ws[0], pw // ws[1], ws[1]).permute(0, 2, 1, 3).reshape(-1, ws[0] * ws[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def _linear(m: nn.Module) -> nn.Module:
    """The ``nn.Linear`` under any wrappers (``base_layer``, as peft and mmpeft name it)."""
    while not isinstance(m, nn.Linear) and isinstance(getattr(m, "base_layer", None), nn.Module):
        m = m.base_layer
    return m


def explicit_window_attention(attn: ShiftedWindowAttention, x: torch.Tensor, v2: bool) -> torch.Tensor:
    """torchvision's ``shifted_window_attention`` on x (B, H, W, C), calling ``attn.qkv`` / ``attn.proj``."""
    b, h, w, c = x.shape
    ws, heads = attn.window_size, attn.num_heads
    win, shift, ph, pw = _windows(x, ws, attn.shift_size)  # (B*nW, N, C)
    qkv = attn.qkv(win)  # (B*nW, N, 3C), the module called
    bias = _linear(attn.qkv).bias
    if v2 and bias is not None:  # v2 drops the key bias: subtract what the called module added
        qkv = qkv - F.pad(bias[c : 2 * c], (c, c)).to(qkv.dtype)
    q, k, v = qkv.reshape(win.shape[0], win.shape[1], 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    if v2:
        scores = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        scores = scores * torch.clamp(attn.logit_scale, max=math.log(100.0)).exp()
    else:
        scores = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
    scores = scores + attn.get_relative_position_bias()  # (B*nW, h, N, N)
    if sum(shift) > 0:
        mask = _shift_mask(x, ws, shift, ph, pw)  # (nW, N, N), the same for every image
        n_w = mask.shape[0]
        scores = (scores.view(-1, n_w, heads, *scores.shape[-2:]) + mask[None, :, None]).view_as(scores)
    probs = F.dropout(scores.softmax(-1), p=attn.attention_dropout, training=attn.training)
    out = (probs @ v).transpose(1, 2).reshape(win.shape[0], win.shape[1], c)
    out = F.dropout(attn.proj(out), p=attn.dropout, training=attn.training)  # the module called
    out = out.view(b, ph // ws[0], pw // ws[1], ws[0], ws[1], c).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
    if sum(shift) > 0:
        out = torch.roll(out, shifts=(shift[0], shift[1]), dims=(1, 2))
    return out[:, :h, :w, :].contiguous()


class ExplicitShiftedWindowAttention(ShiftedWindowAttention):
    """torchvision's ``ShiftedWindowAttention`` calling its ``qkv`` and ``proj`` modules."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, H, W, C)
        return explicit_window_attention(self, x, v2=False)


class ExplicitShiftedWindowAttentionV2(ShiftedWindowAttentionV2):
    """torchvision's ``ShiftedWindowAttentionV2`` calling its ``qkv`` and ``proj`` modules."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, H, W, C)
        return explicit_window_attention(self, x, v2=True)


_EXPLICIT = {
    ShiftedWindowAttention: ExplicitShiftedWindowAttention,
    ShiftedWindowAttentionV2: ExplicitShiftedWindowAttentionV2,
}


def make_swin_attention_explicit(model: nn.Module) -> list[str]:
    """Give every torchvision Swin attention of ``model`` the explicit forward (in place: the
    module's class changes, nothing else); returns the names changed."""
    changed = []
    for name, m in model.named_modules():
        new = _EXPLICIT.get(type(m))
        if new is not None:
            m.__class__ = new
            changed.append(name)
    return changed
