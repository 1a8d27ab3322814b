"""Tests of the Deep Fusion Module and the UNetFormer decoder against the fact sheet (the
decoder's blocks: test_decoder_blocks.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmpeft_isprs.model.decoder import UNetFormerDecoder
from mmpeft_isprs.model.decoder_blocks import trunc_normal_inverse_cdf_
from mmpeft_isprs.model.dfm import (
    DeepFusionModule,
    LayerNorm2dChannels,
    SEFusion,
    SimplePyramid,
    SqueezeExcitation,
    convert_reference_dfm_state_dict,
)
from tests.helpers import assert_close


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- parameter counts
def test_dfm_parameter_counts() -> None:
    dfm = DeepFusionModule(256, 2)
    assert n_params(dfm) == 1_643_136
    assert sum(n_params(p) for p in dfm.pyramids) == 1_575_424
    assert [n_params(f) for f in dfm.fusions] == [16_928] * 4
    assert n_params(SqueezeExcitation(256)) == 8_464
    assert n_params(SimplePyramid(256, "batchnorm")) == n_params(SimplePyramid(256, "layernorm"))
    assert all(p.requires_grad for p in dfm.parameters())


def test_decoder_parameter_counts() -> None:
    dec6 = UNetFormerDecoder(num_classes=6)
    assert n_params(dec6) == 515_102
    assert n_params(UNetFormerDecoder(num_classes=7)) == 515_166
    assert n_params(dec6) + n_params(DeepFusionModule()) == 2_158_238
    assert n_params(dec6.b4) == 96_968
    assert n_params(dec6.b4.attn) == 63_624
    assert n_params(dec6.p3) == 53_378
    assert n_params(dec6.p1) == 63_554
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in dec6.modules())
    assert n_bn == 22


def test_dfm_one_and_three_modalities() -> None:
    one = DeepFusionModule(32, num_modalities=1)
    three = DeepFusionModule(32, num_modalities=3, norms="layernorm")
    assert one.norms == ("layernorm",)
    assert three.norms == ("layernorm",) * 3
    assert DeepFusionModule(32, 3).norms == ("layernorm", "batchnorm", "batchnorm")
    assert [len(f.se) for f in three.fusions] == [3] * 4
    for dfm, m in ((one, 1), (three, 3)):
        out = dfm([torch.randn(2, 32, 4, 6) for _ in range(m)])
        assert [tuple(t.shape) for t in out] == [(2, 32, 16, 24), (2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3)]
    with pytest.raises(ValueError, match="norms"):
        DeepFusionModule(32, 3, norms=("layernorm", "batchnorm"))


# ----------------------------------------------------------------------------- DFM pieces
def test_layernorm2d_matches_channel_layernorm() -> None:
    norm = LayerNorm2dChannels(8)
    assert norm.ln.eps == 1e-6
    x = torch.randn(2, 8, 3, 5)
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, unbiased=False, keepdim=True)
    assert_close(norm(x), (x - mean) / torch.sqrt(var + 1e-6), rel=1e-5)


def test_pyramid_keys_and_exact_2x_upsampling() -> None:
    keys = set(SimplePyramid(8, "layernorm").state_dict())
    assert {"fpn1.0.weight", "fpn1.0.bias", "fpn1.1.ln.weight", "fpn1.3.weight", "fpn2.0.bias"} <= keys
    bn_keys = set(SimplePyramid(8, "batchnorm").state_dict())
    assert {"fpn1.1.running_mean", "fpn1.1.num_batches_tracked"} <= bn_keys
    pyr = SimplePyramid(4)
    x = torch.randn(1, 4, 3, 5)
    l1, l2, l3, l4 = pyr(x)
    assert l3 is x
    assert_close(l4, F.max_pool2d(x, 2), rel=1e-5)
    # kernel = stride = 2: pixel (i, j) writes the block (2i..2i+1, 2j..2j+1) only.
    conv = pyr.fpn2[0]
    manual = torch.einsum("bchw,cokl->bohkwl", x, conv.weight).reshape(1, 4, 6, 10) + conv.bias.view(1, 4, 1, 1)
    assert_close(l2, manual, rel=1e-5)
    assert l1.shape == (1, 4, 12, 20)


def test_se_fusion_hand_computed() -> None:
    fusion = SEFusion(channels=2, num_inputs=2, reduction=2)  # hidden = 1
    with torch.no_grad():
        for se, (w1, b1, w2, b2) in zip(
            fusion.se, [((1.0, -1.0), 0.5, (2.0, -3.0), (0.0, 1.0)), ((0.5, 0.5), -1.0, (1.0, 1.0), (-1.0, 0.0))]
        ):
            se.fc[0].weight.copy_(torch.tensor(w1).view(1, 2, 1, 1))
            se.fc[0].bias.fill_(b1)
            se.fc[2].weight.copy_(torch.tensor(w2).view(2, 1, 1, 1))
            se.fc[2].bias.copy_(torch.tensor(b2))
    x = torch.tensor([[[[1.0, 3.0]], [[2.0, 2.0]]]])  # (1, 2, 1, 2): channel means 2, 2
    y = torch.tensor([[[[4.0, 0.0]], [[6.0, 2.0]]]])  # channel means 2, 4

    def sig(v: float) -> float:
        return 1.0 / (1.0 + math.exp(-v))

    hx = max(0.0, 1.0 * 2 - 1.0 * 2 + 0.5)  # 0.5
    gx = [sig(2.0 * hx + 0.0), sig(-3.0 * hx + 1.0)]
    hy = max(0.0, 0.5 * 2 + 0.5 * 4 - 1.0)  # 2.0
    gy = [sig(1.0 * hy - 1.0), sig(1.0 * hy + 0.0)]
    expected = torch.tensor(
        [[[[1 * gx[0] + 4 * gy[0], 3 * gx[0] + 0 * gy[0]]], [[2 * gx[1] + 6 * gy[1], 2 * gx[1] + 2 * gy[1]]]]]
    )
    assert_close(fusion([x, y]), expected, rel=1e-5)
    with pytest.raises(ValueError, match="expects 2 inputs"):
        fusion([x])


def test_reference_dfm_keys_load_strictly() -> None:
    dfm = DeepFusionModule(256, 2)
    ref: dict[str, Tensor] = {}
    for branch, idx in (("x", 0), ("y", 1)):
        for key, v in dfm.pyramids[idx].state_dict().items():
            level, rest = key.split(".", 1)
            ref[f"{level}{branch}.{rest}"] = torch.full_like(v, idx + 1) if v.is_floating_point() else v
    for i in range(4):
        for j, name in enumerate(("rgb", "depth")):
            for key, v in dfm.fusions[i].se[j].state_dict().items():
                ref[f"fusion{i + 1}.se_{name}.{key}"] = torch.full_like(v, 10 * i + j)
    expected_ref = {
        "fpn1x.0.weight",
        "fpn1x.3.bias",
        "fpn1x.1.ln.weight",
        "fpn1y.1.running_var",
        "fpn1y.1.num_batches_tracked",
        "fpn2x.0.weight",
        "fpn2y.0.bias",
        "fusion1.se_rgb.fc.0.weight",
        "fusion4.se_depth.fc.2.bias",
    }
    assert expected_ref <= set(ref)
    dfm.load_state_dict(convert_reference_dfm_state_dict(ref), strict=True)
    assert torch.all(dfm.pyramids[1].fpn1[1].running_var == 2)
    assert torch.all(dfm.fusions[3].se[1].fc[2].bias == 31)
    with pytest.raises(KeyError):
        convert_reference_dfm_state_dict({"decoder.pre_conv.0.weight": torch.zeros(1)})


# ----------------------------------------------------------------------------- whole path
_STAGES = ("pre_conv", "b4", "b3", "p3", "b2", "p2", "p1", "segmentation_head")


def _run_with_stage_shapes(
    dfm: DeepFusionModule, dec: UNetFormerDecoder, size: tuple[int, int]
) -> tuple[list[Tensor], Tensor, dict[str, tuple[int, ...]]]:
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        getattr(dec, name).register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape))
        )
        for name in _STAGES
    ]
    c = dfm.channels
    neck = [torch.randn(1, c, size[0] // 16, size[1] // 16) for _ in range(dfm.num_modalities)]
    levels = dfm(neck)
    logits = dec(levels, size)
    for hook in hooks:
        hook.remove()
    return levels, logits, shapes


@pytest.mark.parametrize("size", [(256, 256), (448, 448), (256, 384), (320, 448), (64, 96)])
@pytest.mark.parametrize("train", [True, False])
def test_stage_shapes_reduced(size: tuple[int, int], train: bool) -> None:
    torch.manual_seed(0)
    dfm = DeepFusionModule(32, 2).train(train)
    dec = UNetFormerDecoder((32,) * 4, decode_channels=16, num_classes=6).train(train)
    with torch.no_grad():
        levels, logits, shapes = _run_with_stage_shapes(dfm, dec, size)
    h, w = size
    assert [tuple(t.shape) for t in levels] == [
        (1, 32, h // 4, w // 4),
        (1, 32, h // 8, w // 8),
        (1, 32, h // 16, w // 16),
        (1, 32, h // 32, w // 32),
    ]
    s32, s16, s8, s4 = (h // 32, w // 32), (h // 16, w // 16), (h // 8, w // 8), (h // 4, w // 4)
    assert shapes == {
        "pre_conv": (1, 16, *s32),
        "b4": (1, 16, *s32),
        "b3": (1, 16, *s16),
        "p3": (1, 16, *s16),
        "b2": (1, 16, *s8),
        "p2": (1, 16, *s8),
        "p1": (1, 16, *s4),
        "segmentation_head": (1, 6, *s4),
    }
    assert logits.shape == (1, 6, h, w) and torch.isfinite(logits).all()


def test_full_size_forward_256_train_and_eval() -> None:
    torch.manual_seed(0)
    dfm, dec = DeepFusionModule(), UNetFormerDecoder()
    for train in (True, False):
        dfm.train(train)
        dec.train(train)
        with torch.no_grad():
            levels, logits, shapes = _run_with_stage_shapes(dfm, dec, (256, 256))
        assert [t.shape[-1] for t in levels] == [64, 32, 16, 8]
        assert shapes["b4"] == (1, 64, 8, 8) and shapes["p1"] == (1, 64, 64, 64)
        assert logits.shape == (1, 6, 256, 256) and torch.isfinite(logits).all()
    # Both call forms agree (eval: deterministic).
    with torch.no_grad():
        assert torch.equal(dec(levels, (256, 256)), dec(*levels, 256, 256))


def test_tiny_inputs_use_replicate_fallback() -> None:
    dfm = DeepFusionModule(32, 2).eval()
    dec = UNetFormerDecoder((32,) * 4, decode_channels=16).eval()
    with torch.no_grad():
        for size in ((32, 32), (64, 64), (128, 256)):
            _, logits, shapes = _run_with_stage_shapes(dfm, dec, size)
            assert logits.shape == (1, 6, *size) and torch.isfinite(logits).all()


def test_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    dfm = DeepFusionModule(32, 2, reduction=4).train()  # 8 hidden SE units: none all-dead
    dec = UNetFormerDecoder((32,) * 4, decode_channels=16, dropout=0.0).train()
    _, logits, _ = _run_with_stage_shapes(dfm, dec, (64, 128))
    logits.square().mean().backward()
    for name, p in list(dfm.named_parameters()) + list(dec.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_inconsistent_sizes_raise_value_error() -> None:
    dec = UNetFormerDecoder((32,) * 4, decode_channels=16)
    good = [torch.randn(1, 32, s, s) for s in (32, 16, 8, 4)]
    bad = good[:3] + [torch.randn(1, 32, 5, 4)]
    with pytest.raises(ValueError, match=r"\(1, 32, 5, 4\)") as err:
        dec(bad, (128, 128))
    assert "(1, 32, 8, 8)" in str(err.value)
    with pytest.raises(ValueError, match="shapes"):
        dec(good[:3], (128, 128))
    with pytest.raises(ValueError, match=r"\(1, 16, 8, 8\)"):  # wrong channel count
        dec(good[:3] + [torch.randn(1, 16, 8, 8)], (128, 128))
    with pytest.raises(ValueError, match="DFM expects 2"):
        DeepFusionModule(32, 2)([torch.randn(1, 32, 4, 4)])
    with pytest.raises(TypeError):
        dec(good)


# ----------------------------------------------------------------------------- state dict and init
def test_decoder_state_dict_keys() -> None:
    keys = set(UNetFormerDecoder().state_dict())
    expected = {
        "pre_conv.0.weight",
        "pre_conv.1.running_var",
        "p3.weights",
        "p2.pre_conv.0.weight",
        "p3.post_conv.0.weight",
        "p3.post_conv.1.bias",
        "p1.weights",
        "p1.pre_conv.0.weight",
        "p1.post_conv.1.weight",
        "p1.pa.0.weight",
        "p1.pa.0.bias",
        "p1.ca.1.0.weight",
        "p1.ca.3.0.weight",
        "p1.shortcut.0.weight",
        "p1.shortcut.1.num_batches_tracked",
        "p1.proj.0.weight",
        "p1.proj.1.weight",
        "p1.proj.2.weight",
        "segmentation_head.0.0.weight",
        "segmentation_head.0.1.weight",
        "segmentation_head.2.0.weight",
    }
    for blk in ("b4", "b3", "b2"):
        expected |= {
            f"{blk}.{k}"
            for k in (
                "norm1.weight",
                "attn.relative_position_bias_table",
                "attn.relative_position_index",
                "attn.qkv.0.weight",
                "attn.local1.0.weight",
                "attn.local1.1.weight",
                "attn.local2.0.weight",
                "attn.local2.1.running_mean",
                "attn.proj.0.weight",
                "attn.proj.1.bias",
                "attn.proj.2.weight",
                "mlp.fc1.weight",
                "mlp.fc1.bias",
                "mlp.fc2.weight",
                "mlp.fc2.bias",
                "norm2.running_var",
            )
        }
    assert expected <= keys, sorted(expected - keys)
    assert "p1.pa.0.bias" in keys and "segmentation_head.2.0.bias" not in keys
    assert "b4.attn.qkv.0.bias" not in keys


def _fresh_like(m: nn.Module) -> nn.Module:
    """A new layer of the same configuration: it draws from the RNG exactly as m did."""
    if isinstance(m, nn.ConvTranspose2d):
        return nn.ConvTranspose2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, bias=m.bias is not None)
    assert isinstance(m, nn.Conv2d)
    return nn.Conv2d(
        m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups, bias=m.bias is not None
    )


def _replay(model: nn.Module, order: list[str]) -> None:
    """Re-draw every random tensor in the sheet's order and compare bit for bit."""
    for path in order:
        if path.endswith("relative_position_bias_table"):
            target = model.get_parameter(path)
            assert torch.equal(trunc_normal_inverse_cdf_(torch.zeros_like(target), std=0.02), target), path
            continue
        ref, fresh = model.get_submodule(path), None
        fresh = _fresh_like(ref)
        assert torch.equal(fresh.weight, ref.weight), path
        if ref.bias is not None:
            assert torch.equal(fresh.bias, ref.bias), path


def test_rng_consumption_order() -> None:
    blk = [
        "attn.qkv.0",
        "attn.local1.0",
        "attn.local2.0",
        "attn.proj.0",
        "attn.proj.2",
        "attn.relative_position_bias_table",
        "mlp.fc1",
        "mlp.fc2",
    ]
    wf = ["pre_conv.0", "post_conv.0"]
    order = (
        ["pre_conv.0"]
        + [f"b4.{p}" for p in blk]
        + [f"b3.{p}" for p in blk]
        + [f"p3.{p}" for p in wf]
        + [f"b2.{p}" for p in blk]
        + [f"p2.{p}" for p in wf]
        + [f"p1.{p}" for p in wf + ["pa.0", "ca.1.0", "ca.3.0", "shortcut.0", "proj.0", "proj.2"]]
        + ["segmentation_head.0.0", "segmentation_head.2.0"]
    )
    torch.manual_seed(123)
    dec = UNetFormerDecoder()
    after_build = torch.rand(4)
    torch.manual_seed(123)
    _replay(dec, order)
    assert torch.equal(torch.rand(4), after_build)  # nothing else drew from the RNG

    dfm_order = [f"pyramids.{m}.{p}" for m in (0, 1) for p in ("fpn1.0", "fpn1.3", "fpn2.0")]
    dfm_order += [f"fusions.{i}.se.{j}.fc.{k}" for i in range(4) for j in (0, 1) for k in (0, 2)]
    torch.manual_seed(7)
    dfm = DeepFusionModule()
    after_build = torch.rand(4)
    torch.manual_seed(7)
    _replay(dfm, dfm_order)
    assert torch.equal(torch.rand(4), after_build)


@torch.no_grad()
def test_init_values() -> None:
    dec = UNetFormerDecoder()
    for blk in (dec.b4, dec.b3, dec.b2):
        table = blk.attn.relative_position_bias_table
        assert float(table.abs().max()) < 2.0 and 0.015 < float(table.std()) < 0.025
    assert torch.equal(dec.p1.weights.detach(), torch.ones(2))
    bn = dec.pre_conv[1]
    assert torch.equal(bn.weight.detach(), torch.ones(64)) and torch.equal(bn.running_var, torch.ones(64))
    assert float(dec.pre_conv[0].weight.abs().max()) <= 1 / 16  # U(+-1/sqrt(256))
    assert float(dec.b4.attn.proj[0].weight.abs().max()) <= 1 / 8  # depthwise 8x8
    assert dec.b4.attn.proj[0].padding == (3, 3) and dec.b4.attn.scale == 8**-0.5
