"""The backbone families of the core tests: tiny random builders, their input sizes and expected
family, the main tensor of an output, seeded trainables, and one training check."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from tests.tiny_models import tiny_sam, tiny_timm_sam

MODS = ("optical", "dsm")


def timm_builder(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=0, **kw)  # pooled features

    return build


def _torchvision() -> nn.Module:
    from torchvision.models import VisionTransformer

    model = VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=8
    )
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises the head
    return model


def _hf(model: str, config: str, **extra: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        transformers = pytest.importorskip("transformers")
        sizes = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=16)
        return getattr(transformers, model)(getattr(transformers, config)(**sizes, **extra))

    return build


VIT = dict(img_size=32, patch_size=16, depth=2, embed_dim=32, num_heads=2)
# name: (builder, input size, expected family)
BACKBONES: dict[str, tuple[Callable[[], nn.Module], int, str]] = {
    "timm_vit": (timm_builder("vit_tiny_patch16_224", **VIT), 32, "timm"),
    "timm_deit": (timm_builder("deit_tiny_patch16_224", **VIT), 32, "timm"),
    "timm_dinov2": (
        timm_builder("vit_small_patch14_reg4_dinov2", img_size=28, depth=2, embed_dim=32, num_heads=2, init_values=0.5),
        28,
        "timm",
    ),
    "timm_eva02": (
        timm_builder("eva02_tiny_patch14_224", img_size=28, depth=2, embed_dim=32, num_heads=2),
        28,
        "timm_eva",
    ),
    "timm_eva02_swiglu": (
        timm_builder("eva02_base_patch14_224", img_size=28, depth=2, embed_dim=32, num_heads=2),
        28,
        "timm_eva_swiglu",
    ),
    "timm_swin": (
        timm_builder("swin_tiny_patch4_window7_224", img_size=56, depths=(1, 1), num_heads=(1, 2), embed_dim=16),
        56,
        "timm",
    ),
    "timm_sam": (lambda: tiny_timm_sam(), 64, "timm"),
    "segment_anything": (lambda: tiny_sam(), 64, "segment_anything"),
    "torchvision": (_torchvision, 32, "torchvision"),
    "hf_vit": (_hf("ViTModel", "ViTConfig", intermediate_size=32), 32, "hf_vit"),
    "hf_dinov2": (_hf("Dinov2Model", "Dinov2Config", mlp_ratio=2), 32, "hf_vit"),
    "hf_clip": (_hf("CLIPVisionModel", "CLIPVisionConfig", intermediate_size=32), 32, "hf_clip"),
    "hf_siglip": (_hf("SiglipVisionModel", "SiglipVisionConfig", intermediate_size=32), 32, "hf_clip"),
}


def main_tensor(out: Any) -> torch.Tensor:
    """The main tensor of a model output (timm/torchvision tensor, transformers' last_hidden_state)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return out["last_hidden_state"]
    return out.last_hidden_state


def build_backbone(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return BACKBONES[kind][0]().eval()


def backbone_inputs(kind: str) -> dict[str, torch.Tensor]:
    s = BACKBONES[kind][1]
    g = torch.Generator().manual_seed(3)
    return {"optical": torch.rand(2, 3, s, s, generator=g), "dsm": torch.rand(2, 1, s, s, generator=g)}


def randomise_family_trainables(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (0.5 if p.numel() == 1 else 0.0))


def train_and_check(wrapped: nn.Module, x: dict[str, torch.Tensor], steps: int = 1) -> None:
    """Optimiser steps on randomised trainables: every trainable tensor gets a gradient at the
    first step and changes; every frozen tensor stays bit-identical."""
    wrapped.train()
    randomise_family_trainables(wrapped)
    frozen = {n: p.detach().clone() for n, p in wrapped.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        opt.zero_grad()
        sum(main_tensor(o).square().mean() for o in wrapped(x).values()).backward()
        if step == 0:
            no_grad = [
                n for n, p in wrapped.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
            ]
            assert not no_grad, f"trainables without gradient: {no_grad[:5]}"
        opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in wrapped.named_parameters() if n in frozen)
    unchanged = [n for n, p in wrapped.named_parameters() if n in before and torch.equal(p, before[n])]
    assert not unchanged, unchanged[:5]
