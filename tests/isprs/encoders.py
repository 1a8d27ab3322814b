"""Tiny MFNet encoders (SAM2 Hiera, DINOv2) and their inputs, shared by the encoder tests."""

from __future__ import annotations

import torch

from mmpeft_isprs.model import MFNetConfig
from mmpeft_isprs.model.encoders import build_feature_encoder

#: tiny SAM2 Hiera (one block per stage, widths 16..128) and tiny DINOv2 (4 blocks of width 32);
#: DINOv2's layer scale (1e-5) set to 1 so that every block's updates show in the outputs
HIERA = dict(
    backbone="sam2_hiera_tiny",
    embed_dim=16,
    num_heads=1,
    encoder_kwargs={"stages": [1, 1, 1, 1], "global_att_blocks": []},
)
DINO = dict(backbone="dinov2_vits14", embed_dim=32, depth=4, num_heads=2, encoder_kwargs={"init_values": 1.0})
ENCODERS = {"sam2": HIERA, "dinov2": DINO}
S = 64  # side of the fast tests (a multiple of 32; the ViT sees 56 x 56: grid 4 x 4 of patch 14)


def inputs(size: int = S, b: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"optical": torch.rand(b, 3, size, size, generator=g), "dsm": torch.rand(b, 1, size, size, generator=g)}


def base_encoder(cfg: MFNetConfig, seed: int = 0) -> torch.nn.Module:
    """The unwrapped feature encoder MFNet builds from ``cfg`` (same seed: same weights)."""
    torch.manual_seed(seed)
    kind = cfg.backbone_kind
    enc, _ = build_feature_encoder(cfg.backbone, kind, cfg.size, cfg.timm_kwargs, cfg.pyramid_blocks, cfg.checkpoint)
    return enc.eval()
