"""Tiny seeded backbones shared by the core tests (imported by the test files; fixtures live in
conftest.py)."""

from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT
from torch import nn

from mmpeft.backbones import SamSpec


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give zero-initialised tensors (pos embed, relative tables) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def tiny_sam(img_size: int = 64, window: int = 3, seed: int = 0) -> nn.Module:
    """segment-anything ImageEncoderViT: grid 4x4, window 3 (pads 4 -> 6), one global block."""
    from segment_anything.modeling import ImageEncoderViT

    torch.manual_seed(seed)
    enc = ImageEncoderViT(
        img_size=img_size,
        patch_size=16,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=4.0,
        out_chans=16,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=window,
        global_attn_indexes=(1,),
    )
    return _randomise(enc.eval(), seed)


def tiny_timm_sam(img_size: int = 64, seed: int = 0) -> nn.Module:
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    torch.manual_seed(seed)
    enc = VisionTransformerSAM(
        img_size=img_size,
        patch_size=16,
        embed_dim=32,
        depth=2,
        num_heads=2,
        window_size=3,
        global_attn_indexes=(1,),
        use_rel_pos=True,
        neck_chans=16,
        num_classes=0,
        global_pool="",
    )
    return _randomise(enc.eval(), seed)


def tiny_timm_vit(seed: int = 0) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5).eval()


class CustomBlock(nn.Module):
    """A ViT block whose modules are named unlike SAM or timm."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.ln_a, self.ln_b = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.in_proj, self.out_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.in_proj(self.ln_a(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.out_proj(a)
        return x + self.ffn(self.ln_b(x))


class CustomViT(nn.Module):
    def __init__(self, dim: int = 24, depth: int = 2, in_chans: int = 3) -> None:
        super().__init__()
        self.embed = nn.Conv2d(in_chans, dim, 8, 8)
        self.layers = nn.ModuleList(CustomBlock(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, C)
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(1))


def tiny_custom(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return CustomViT().eval()


# ------------------------------------------------------------------ SAM checkpoints in the official layout
SAM_TINY = SamSpec(embed_dim=64, depth=4, num_heads=2, global_attn_indexes=(1, 3), window_size=4, out_chans=32)
SAM_NATIVE = 256  # checkpoint's native input size: 16 x 16 tokens
SAM_DROPPED = ("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", "mask_decoder.iou_token.weight")


def reference_sam_encoder(spec: SamSpec, img_size: int) -> ImageEncoderViT:
    """segment-anything's encoder configured exactly as in its build_sam."""
    return ImageEncoderViT(
        img_size=img_size,
        patch_size=16,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        out_chans=spec.out_chans,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=spec.window_size,
        global_attn_indexes=spec.global_attn_indexes,
    )


def official_sam_state(spec: SamSpec = SAM_TINY, seed: int = 0) -> dict[str, torch.Tensor]:
    """A flat dict in the official SAM layout, every tensor (pos_embed, rel_pos too) random."""
    torch.manual_seed(seed)
    encoder = reference_sam_encoder(spec, SAM_NATIVE)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            scale = 1.0 if "rel_pos" in name or "pos_embed" in name else 0.2
            param.add_(torch.randn_like(param) * scale)
    state = {f"image_encoder.{k}": v.clone() for k, v in encoder.state_dict().items()}
    state[SAM_DROPPED[0]] = torch.randn(2, 16)
    state[SAM_DROPPED[1]] = torch.randn(1, 32)
    return state
