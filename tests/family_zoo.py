"""Tiny random models of the families issue 24 tried (timm 1.0, torchvision, transformers 5): one
builder per family, small enough that a wrap and a few forwards take about a second."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn


def timm_class(module: str, cls: str, **kw: Any) -> Callable[[], nn.Module]:
    """A builder of ``timm.models.<module>.<cls>(num_classes=0, **kw)`` (pooled features)."""

    def build() -> nn.Module:
        pytest.importorskip("timm")
        return getattr(importlib.import_module("timm.models." + module), cls)(num_classes=0, **kw)

    return build


def timm_model(name: str, **kw: Any) -> Callable[[], nn.Module]:
    """A builder of ``timm.create_model(name, num_classes=0, **kw)`` (random weights)."""

    def build() -> nn.Module:
        timm = pytest.importorskip("timm")
        return timm.create_model(name, pretrained=False, num_classes=0, **kw)

    return build


def maxvit_rmlp() -> nn.Module:
    """timm MaxViT with relative-position MLPs (``rel_pos_type="mlp"``, as maxvit_rmlp_*)."""
    pytest.importorskip("timm")
    from timm.models.maxxvit import MaxxVit, MaxxVitCfg, _rw_max_cfg

    cfg = MaxxVitCfg(
        embed_dim=(16, 32),
        depths=(1, 1),
        block_type=("M", "M"),
        stem_width=(8, 16),
        **_rw_max_cfg(rel_pos_type="mlp", dim_head=8, window_size=(4, 4)),
    )
    return MaxxVit(cfg, img_size=64, num_classes=0)


def coat(parallel_depth: int) -> Callable[[], nn.Module]:
    """timm CoaT at 64 px, one serial block per stage and ``parallel_depth`` parallel blocks."""
    return timm_class(
        "coat",
        "CoaT",
        img_size=64,
        patch_size=4,
        embed_dims=(16, 32, 32, 32),
        serial_depths=(1, 1, 1, 1),
        parallel_depth=parallel_depth,
        num_heads=8,
        mlp_ratios=(2, 2, 2, 2),
    )


def tv_maxvit() -> nn.Module:
    """torchvision's MaxVit, two one-block stages."""
    from torchvision.models import MaxVit

    return MaxVit(
        input_size=(64, 64),
        stem_channels=16,
        partition_size=2,
        block_channels=[16, 32],
        block_layers=[1, 1],
        head_dim=8,
        stochastic_depth_prob=0.0,
        num_classes=5,
    )


def vitmae() -> nn.Module:
    """transformers' ViTMAEModel (its forward masks a random 75 % of the tokens)."""
    t = pytest.importorskip("transformers")
    cfg = t.ViTMAEConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    return t.ViTMAEModel(cfg)


# name: (builder, input size)
ZOO: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "volo": (
        timm_class(
            "volo",
            "VOLO",
            img_size=64,
            layers=[1, 1, 1, 1],
            embed_dims=[32, 64, 64, 64],
            num_heads=[1, 2, 2, 2],
            stem_hidden_dim=16,
        ),
        64,
    ),
    "gcvit": (
        timm_class("gcvit", "GlobalContextVit", img_size=64, depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2), embed_dim=16),
        64,
    ),
    "coat_lite": (
        timm_model(
            "coat_lite_tiny",
            img_size=64,
            embed_dims=(16, 16, 32, 32),
            serial_depths=(1, 1, 1, 1),
            num_heads=8,
            mlp_ratios=(2, 2, 2, 2),
        ),
        64,
    ),
    "davit": (
        timm_class(
            "davit", "DaVit", depths=(1, 1, 1, 1), embed_dims=(16, 32, 32, 32), num_heads=(1, 2, 2, 2), window_size=2
        ),
        64,
    ),
    "naflexvit": (timm_model("naflexvit_base_patch16_gap", img_size=32, depth=2, embed_dim=32, num_heads=2), 32),
    "vit_relpos": (timm_model("vit_relpos_small_patch16_224", img_size=32, depth=2, embed_dim=32, num_heads=2), 32),
    "maxvit_rmlp": (maxvit_rmlp, 64),
    "cait": (timm_model("cait_xxs24_224", img_size=32, depth=2, embed_dim=32, num_heads=2, depth_token_only=1), 32),
    "mobilevit": (timm_model("mobilevit_xxs"), 64),
    "vitmae": (vitmae, 32),
    "tv_maxvit": (tv_maxvit, 64),
    "tnt": (
        timm_class("tnt", "TNT", img_size=32, depth=2, embed_dim=32, inner_dim=8, num_heads_outer=2, num_heads_inner=2),
        32,
    ),
    "coat": (coat(parallel_depth=1), 64),
    "efficientformer": (
        timm_model("efficientformer_l1", depths=(1, 1, 1, 2), embed_dims=(16, 16, 32, 32), num_vit=1),
        64,
    ),
    "efficientformerv2": (
        timm_model("efficientformerv2_s0", depths=(1, 1, 1, 1), embed_dims=(16, 16, 32, 32), num_vit=1),
        64,
    ),
    "nextvit": (
        timm_class("nextvit", "NextViT", in_chans=3, depths=(1, 1, 5, 1), stem_chs=(8, 8, 16), head_dim=32),
        64,
    ),
    "levit": (
        timm_model("levit_128s", img_size=64, embed_dim=(32, 48, 64), key_dim=8, num_heads=(2, 2, 2), depth=(1, 1, 1)),
        64,
    ),
    "visformer": (
        timm_model("visformer_tiny", img_size=64, depth=(1, 1, 1), embed_dim=32, num_heads=2, init_channels=8),
        64,
    ),
    "fastvit": (
        timm_model(
            "fastvit_t8",
            layers=(1, 1, 1, 1),
            embed_dims=(16, 16, 32, 32),
            token_mixers=("repmixer", "repmixer", "repmixer", "attention"),
        ),
        64,
    ),
    "mobilevitv2": (timm_model("mobilevitv2_050"), 64),
    # issue 31: attention the names do not tell (GPSA, XCA, convolutional q / k / v), kv-only blocks
    "convit": (
        timm_model("convit_tiny", img_size=32, depth=2, embed_dim=32, num_heads=2, local_up_to_layer=1, patch_size=8),
        32,
    ),
    "xcit": (timm_model("xcit_nano_12_p8_224", img_size=32, depth=2, embed_dim=32, num_heads=2, cls_attn_layers=1), 32),
    "shvit": (timm_model("shvit_s1", embed_dim=(16, 32, 48), depth=(1, 1, 1), partial_dim=(8, 8, 8)), 64),
    "iformer": (
        timm_class(
            "iformer",
            "IFormer",
            dims=(16, 16, 32, 32),
            depths=(1, 1, 3, 3),
            attn_groups=(0, 0, 1, 1),
            attn_head_dim_reduction=(0, 0, 2, 4),
        ),
        64,
    ),
    "efficientvit_mit": (
        timm_class(
            "efficientvit_mit",
            "EfficientVit",
            widths=(8, 16, 32, 32, 32),
            depths=(1, 1, 1, 2, 2),
            head_dim=16,
            head_widths=(64, 64),
        ),
        64,
    ),
    # the registered structure: two block classes (serial, parallel) sharing their crpe
    "coat_parallel": (coat(parallel_depth=2), 64),
    "gcvit_kv": (
        timm_class("gcvit", "GlobalContextVit", img_size=64, depths=(2, 2, 1, 1), num_heads=(1, 2, 2, 2), embed_dim=16),
        64,
    ),
    "convnext": (timm_model("convnext_atto", depths=(1, 1, 1, 1), dims=(8, 16, 16, 16)), 64),
    "hgnet": (timm_model("hgnetv2_b0"), 64),
}


def build(name: str, seed: int = 0) -> nn.Module:
    """The zoo's model ``name``, seeded, in eval mode; layer scales (1e-5 / 1e-6 at init in CaiT and
    vit_relpos) and zero-initialised norm weights (LeViT's residual BatchNorms) set to 1: the
    residual branches were off, their gradients too small to move or zero."""
    torch.manual_seed(seed)
    model = ZOO[name][0]().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.rsplit(".", 1)[-1] in ("gamma", "gamma_1", "gamma_2") and p.abs().max() < 1e-4:
                p.fill_(1.0)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None and not m.weight.any():
                m.weight.fill_(1.0)
    return model
