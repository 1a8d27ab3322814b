"""The UNetFormer decoder's blocks against the fact sheet: relative positions, the init recipe,
axial pooling, padding, global-local attention against a naive computation, the WF fusion
(the whole decoder and the DFM: test_dfm_decoder.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmpeft_isprs.model.decoder import WF
from mmpeft_isprs.model.decoder_blocks import (
    GlobalLocalAttention,
    pad_right_bottom,
    relative_position_index,
    trunc_normal_inverse_cdf_,
)
from tests.helpers import assert_close


# ----------------------------------------------------------------------------- attention pieces
def test_relative_position_index_formula() -> None:
    attn = GlobalLocalAttention(64, 8, window_size=8)
    idx = attn.relative_position_index
    assert idx.dtype == torch.int64 and idx.shape == (64, 64)
    assert int(idx[0, 0]) == 112 and int(idx.min()) == 0 and int(idx.max()) == 224
    assert int(idx[0, 63]) == 0  # (0,0) vs (7,7)
    assert int(idx[63, 0]) == 224
    assert int(idx[1, 0]) == 113  # same row, column +1
    assert int(idx[8, 0]) == 127  # row +1
    assert int(idx[10, 17]) == 98  # (1,2) vs (2,1): 6*15 + 8
    assert torch.equal(idx, relative_position_index(8))
    assert attn.relative_position_bias_table.shape == (225, 8)
    bias = attn.relative_position_bias()
    assert bias[3, 10, 17] == attn.relative_position_bias_table[98, 3]


def test_trunc_normal_recipe() -> None:
    timm_layers = pytest.importorskip("timm.layers")
    t = torch.zeros(200_000)
    torch.manual_seed(0)
    trunc_normal_inverse_cdf_(t, std=0.02)
    assert float(t.abs().max()) <= 2.0
    assert abs(float(t.std()) - 0.02) < 5e-4 and abs(float(t.mean())) < 5e-4
    # Same recipe and RNG consumption as timm's trunc_normal_ (bit for bit).
    ref = torch.zeros(200_000)
    torch.manual_seed(0)
    timm_layers.trunc_normal_(ref, std=0.02)
    assert torch.equal(t, ref)
    # Inside a GLA the table is drawn after its five convs, with the sheet's literal recipe.
    torch.manual_seed(0)
    table = GlobalLocalAttention(8, 8).relative_position_bias_table
    torch.manual_seed(0)
    for args in ((8, 24, 1), (8, 8, 3), (8, 8, 1)):  # qkv, local1, local2
        nn.Conv2d(*args, bias=False)
    nn.Conv2d(8, 8, 8, groups=8, bias=False)  # proj depthwise
    nn.Conv2d(8, 8, 1, bias=False)  # proj pointwise
    manual = torch.zeros(225, 8).uniform_(-1, 1).erfinv_().mul_(0.02 * math.sqrt(2.0)).clamp_(-2, 2)
    assert torch.equal(table, manual)


def _expected_axial(o: Tensor, ws: int) -> Tensor:
    """Sheet formula: AX[i] = 1/ws * sum_{t=i-ws/2+1}^{i+ws/2} O'[t], O'[H] = O[H-2], 0 outside."""
    h, w = o.shape[-2:]
    half = ws // 2
    ext_h = torch.cat([o, o[:, :, h - 2 : h - 1]], dim=2)  # (B, C, H+1, W)
    ext_w = torch.cat([o, o[:, :, :, w - 2 : w - 1]], dim=3)  # (B, C, H, W+1)
    ax = torch.zeros_like(o)
    ay = torch.zeros_like(o)
    for i in range(h):
        for t in range(i - half + 1, i + half + 1):
            if 0 <= t <= h:
                ax[:, :, i] += ext_h[:, :, t]
    for j in range(w):
        for t in range(j - half + 1, j + half + 1):
            if 0 <= t <= w:
                ay[:, :, :, j] += ext_w[:, :, :, t]
    return ax / ws + ay / ws


def test_axial_pool_formula() -> None:
    attn = GlobalLocalAttention(4, 2, window_size=8)
    o = torch.randn(1, 2, 5, 6)
    assert_close(attn.axial_pool(o), _expected_axial(o, 8), rel=1e-5)


def test_pad_right_bottom_reflect_and_fallback() -> None:
    x = torch.arange(20.0).view(1, 1, 4, 5)
    out = pad_right_bottom(x, 3, 2)  # reflect possible on both axes
    rows = [0, 1, 2, 3, 2, 1, 0]
    cols = [0, 1, 2, 3, 4, 3, 2]
    assert torch.equal(out, x[:, :, rows][:, :, :, cols])
    out = pad_right_bottom(x, 4, 1)  # pad 4 >= 4 rows: replicate the bottom row; reflect the width
    assert torch.equal(out, x[:, :, [0, 1, 2, 3, 3, 3, 3, 3]][:, :, :, [0, 1, 2, 3, 4, 3]])
    one = torch.ones(1, 1, 1, 1) * 7
    assert torch.equal(pad_right_bottom(one, 1, 1), torch.full((1, 1, 2, 2), 7.0))
    assert pad_right_bottom(x, 0, 0) is x


def _naive_gla(attn: GlobalLocalAttention, x: Tensor) -> Tensor:
    """Sheet section 6 with explicit loops over windows, heads and tokens (reflect pads)."""
    b, c, h, w = x.shape
    ws, nh = attn.window_size, attn.num_heads
    hd = c // nh
    local = attn.local2(x) + attn.local1(x)
    hp, wp = h + (-h) % ws, w + (-w) % ws
    rows = [i if i < h else 2 * (h - 1) - i for i in range(hp)]
    cols = [j if j < w else 2 * (w - 1) - j for j in range(wp)]
    qkv = F.conv2d(x[:, :, rows][:, :, :, cols], attn.qkv[0].weight)  # (B, 3C, Hp, Wp)
    table = attn.relative_position_bias_table
    o = torch.zeros(b, c, hp, wp)
    coords = [(t // ws, t % ws) for t in range(ws * ws)]
    bias_idx = torch.tensor(
        [[(ri - rj + ws - 1) * (2 * ws - 1) + (ci - cj + ws - 1) for (rj, cj) in coords] for (ri, ci) in coords]
    )
    for bi in range(b):
        for wr in range(hp // ws):
            for wc in range(wp // ws):
                win = qkv[bi, :, wr * ws : (wr + 1) * ws, wc * ws : (wc + 1) * ws].reshape(3 * c, ws * ws)
                for n in range(nh):
                    q = win[n * hd : (n + 1) * hd].T
                    k = win[c + n * hd : c + (n + 1) * hd].T
                    v = win[2 * c + n * hd : 2 * c + (n + 1) * hd].T
                    s = (q @ k.T) * hd**-0.5 + table[bias_idx, n]
                    res = (s.softmax(-1) @ v).T.reshape(hd, ws, ws)
                    o[bi, n * hd : (n + 1) * hd, wr * ws : (wr + 1) * ws, wc * ws : (wc + 1) * ws] = res
    y = _expected_axial(o[:, :, :h, :w], ws) + local
    y = y[:, :, list(range(h)) + [h - 2]][:, :, :, list(range(w)) + [w - 2]]  # reflect 1 right/bottom
    dw, bn, pw = attn.proj
    y = F.conv2d(y, dw.weight, padding=ws // 2 - 1, groups=c)
    return pw(bn(y))


@pytest.mark.parametrize("hw", [(5, 12), (8, 8), (10, 16)])
def test_gla_matches_naive_sheet_computation(hw: tuple[int, int]) -> None:
    torch.manual_seed(1)
    attn = GlobalLocalAttention(16, 2, window_size=8).eval()
    with torch.no_grad():
        for m in attn.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        attn.relative_position_bias_table.normal_(0, 1.0)
        x = torch.randn(2, 16, *hw)
        assert_close(attn(x), _naive_gla(attn, x), rel=1e-5)


# ----------------------------------------------------------------------------- WF
def test_wf_weights_and_hand_computed_output() -> None:
    wf = WF(in_channels=2, decode_channels=1)
    assert torch.equal(wf.fusion_weights(), torch.tensor([0.5, 0.5]))
    wf.post_conv = nn.Identity()  # isolate the fusion step
    with torch.no_grad():
        wf.pre_conv[0].weight.copy_(torch.tensor([1.0, 2.0]).view(1, 2, 1, 1))
    x = torch.tensor([[[[4.0]]]])  # (1, 1, 1, 1) -> bilinear x2 = constant 4
    res = torch.tensor([[[[1.0, 0.0], [2.0, -1.0]], [[0.0, 1.0], [1.0, 3.0]]]])  # (1, 2, 2, 2)
    pre = torch.tensor([[[[1.0, 2.0], [4.0, 5.0]]]])  # 1*res[0] + 2*res[1]
    assert_close(wf(x, res), 0.5 * pre + 0.5 * 4.0, rel=1e-5)
    with torch.no_grad():
        wf.weights.copy_(torch.tensor([1.0, 3.0]))
    assert_close(wf(x, res), 0.25 * pre + 0.75 * 4.0, rel=1e-5)
    with torch.no_grad():
        wf.weights.copy_(torch.tensor([-2.0, 5.0]))  # ReLU drops the skip
    assert_close(wf(x, res), torch.full((1, 1, 2, 2), 4.0), rel=1e-5)
