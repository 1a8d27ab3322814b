"""MFNet's encoders beyond SAM: SAM2's Hiera and any timm ViT (DINOv2, ...), as feature encoders
(TerraTorch's geospatial encoders: :mod:`.geo_encoders`).

A feature encoder holds the timm model as ``trunk`` (the official SAM2 layout's name) and its
``forward`` returns a list of NCHW maps, one per modality after ``wrap_multimodal`` splits them:

- :class:`HieraFeatures` (``sam2_hiera_tiny`` / ``small`` / ``base_plus`` / ``large``): the four
  stage ends, ``[(B, C1, H/4, W/4), (B, C2, H/8, W/8), (B, C3, H/16, W/16), (B, C4, H/32, W/32)]``;
- :class:`ViTFeatures` (``dinov2_vits14`` ..., or any timm ViT name): the chosen blocks' token
  maps ``(B, D, H/16, W/16)`` each, after the ViT's final norm. A ViT whose patch is not 16 sees
  its input resized (bilinear, antialiased) to ``(H/16 * patch, W/16 * patch)``, so that its token
  grid is always the stride-16 grid of SAM's encoder (224 x 224 for a 256 crop and patch 14).

Both are built with random weights (``pretrained=False``); weights come from a local file
(:mod:`.encoder_weights`, :mod:`.sam2_weights`), never from the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .encoder_weights import EncoderLoadReport, load_vit_checkpoint
from .geo_encoders import GEO_EXTRA, TERRATORCH_TIMM_NAMES, GeoFeatures, build_geo_encoder, check_geo_name, is_geo_name
from .sam2_weights import load_sam2_checkpoint

__all__ = [
    "SAM2_BACKBONES",
    "DINOV2_BACKBONES",
    "BackboneKind",
    "resolve_backbone",
    "known_backbones",
    "HieraFeatures",
    "ViTFeatures",
    "build_feature_encoder",
    "default_pyramid_blocks",
]

#: SAM2's image-encoder trunks (timm names)
SAM2_BACKBONES = ("sam2_hiera_tiny", "sam2_hiera_small", "sam2_hiera_base_plus", "sam2_hiera_large")
#: DINOv2's torch-hub names -> timm names
DINOV2_BACKBONES = {
    "dinov2_vits14": "vit_small_patch14_dinov2",
    "dinov2_vitb14": "vit_base_patch14_dinov2",
    "dinov2_vitl14": "vit_large_patch14_dinov2",
    "dinov2_vitg14": "vit_giant_patch14_dinov2",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2",
    "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2",
    "dinov2_vitl14_reg": "vit_large_patch14_reg4_dinov2",
    "dinov2_vitg14_reg": "vit_giant_patch14_reg4_dinov2",
}
#: the token grid every ViT encoder is brought to (SAM's: input / 16)
GRID_STRIDE = 16


@dataclass(frozen=True)
class BackboneKind:
    """What ``MFNetConfig.backbone`` names: ``kind`` "sam" (SAM's ViT), "sam2" (Hiera), "vit"
    (a timm ViT) or "geo" (TerraTorch's registry, :mod:`.geo_encoders`); ``timm_name`` the timm
    model name, or the registry's name for "geo" (None for SAM)."""

    kind: str
    timm_name: str | None = None


def known_backbones(sam_names: Sequence[str]) -> str:
    """The choices of ``model.backbone``, for error messages."""
    return (
        f"SAM {sorted(sam_names)}, SAM2 {list(SAM2_BACKBONES)}, DINOv2 {list(DINOV2_BACKBONES)}, "
        "any timm ViT name (timm.list_models('vit_*')), "
        "or a TerraTorch backbone-registry name (terratorch_prithvi_eo_v2_tiny_tl, timm_clay_v1_base, ...: "
        f"terratorch.registry.BACKBONE_REGISTRY) or a timm name it registers {list(TERRATORCH_TIMM_NAMES)} "
        f"(the optional extra geo-fm: {GEO_EXTRA})"
    )


def resolve_backbone(name: str, sam_names: Sequence[str]) -> BackboneKind:
    """The kind of encoder ``name`` is; ValueError listing the choices for an unknown name."""
    if name in sam_names:
        return BackboneKind("sam")
    if name in SAM2_BACKBONES:
        return BackboneKind("sam2", name)
    if name in DINOV2_BACKBONES:
        return BackboneKind("vit", DINOV2_BACKBONES[name])
    if is_geo_name(name):  # before timm: TerraTorch's timm names (clay_v1_base) are timm's once it is imported
        return BackboneKind("geo", check_geo_name(name))
    import timm

    if isinstance(name, str) and timm.is_model(name):
        return BackboneKind("vit", name)
    raise ValueError(f"unknown backbone {name!r} (model.backbone); choose {known_backbones(sam_names)}")


def default_pyramid_blocks(depth: int) -> list[int]:
    """Four evenly spaced blocks ending with the last (2, 5, 8, 11 for 12 blocks); the last alone
    (ViTDet) when there are fewer than 4."""
    if depth < 4:
        return [depth - 1]
    return [depth * (i + 1) // 4 - 1 for i in range(4)]


class HieraFeatures(nn.Module):
    """SAM2's Hiera trunk returning its four stage-end maps (NCHW).

    Args:
        trunk: a timm ``HieraDet`` (``sam2_hiera_*``); its classifier head is removed.
    """

    def __init__(self, trunk: nn.Module) -> None:
        super().__init__()
        trunk.prune_intermediate_layers(indices=len(trunk.stage_ends), prune_head=True)  # no head: SAM2 has none
        self.trunk = trunk
        self.out_channels: tuple[int, ...] = tuple(int(f["num_chs"]) for f in trunk.feature_info)
        self.strides: tuple[int, ...] = tuple(int(f["reduction"]) for f in trunk.feature_info)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, 3, H, W), H and W multiples of 32 -> [(B, C_i, H / s_i, W / s_i)], s = 4, 8, 16, 32."""
        return self.trunk.forward_intermediates(x, intermediates_only=True, output_fmt="NCHW")


class ViTFeatures(nn.Module):
    """A timm ViT returning the token maps of ``blocks`` (NCHW, after the final norm).

    Args:
        trunk: a timm ``VisionTransformer`` (or a model with the same ``forward_intermediates``),
            built for the input size ``grid * patch``; blocks after the last one taken are removed.
        blocks: block indices to take (negative counts from the end), in increasing order.
    """

    def __init__(self, trunk: nn.Module, blocks: Sequence[int]) -> None:
        super().__init__()
        depth = len(trunk.blocks)
        inside = bool(blocks) and all(-depth <= int(b) < depth for b in blocks)
        taken = [int(b) % depth for b in blocks] if inside else []
        if not inside or taken != sorted(set(taken)):
            raise ValueError(f"model.pyramid_blocks {list(blocks)} must be increasing block indices of 0..{depth - 1}")
        self.blocks_taken: list[int] = taken
        trunk.prune_intermediate_layers(indices=self.blocks_taken, prune_norm=False, prune_head=True)
        self.trunk = trunk
        self.input_size: tuple[int, int] = tuple(int(s) for s in trunk.patch_embed.img_size)  # type: ignore[assignment]
        self.out_channels: tuple[int, ...] = (int(trunk.embed_dim),) * len(self.blocks_taken)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, 3, H, W) -> [(B, D, H/16, W/16)] per block taken (the input resized to the ViT's
        ``patch * H/16`` first when its patch is not 16)."""
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        return self.trunk.forward_intermediates(  # (B, D, h, w) each, prefix tokens dropped
            x,
            indices=self.blocks_taken,
            norm=True,
            output_fmt="NCHW",
            intermediates_only=True,
        )


def _vit_trunk(timm_name: str, size: tuple[int, int], kwargs: dict[str, Any]) -> nn.Module:
    import timm

    probe = timm.create_model(timm_name, pretrained=False, num_classes=0, **{**kwargs, "device": "meta"})
    patch = getattr(getattr(probe, "patch_embed", None), "patch_size", None)
    if patch is None or not hasattr(probe, "forward_intermediates") or not hasattr(probe, "blocks"):
        raise ValueError(
            f"model.backbone {timm_name!r} is not a plain timm ViT (no patch_embed.patch_size / blocks / "
            "forward_intermediates); MFNet takes SAM, SAM2 (sam2_hiera_*) or a timm ViT"
        )
    grid = (size[0] // GRID_STRIDE, size[1] // GRID_STRIDE)
    img = (grid[0] * int(patch[0]), grid[1] * int(patch[1]))
    return timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=img, **kwargs)


def build_feature_encoder(
    name: str,
    kind: BackboneKind,
    size: tuple[int, int],
    kwargs: dict[str, Any] | None = None,
    pyramid_blocks: Sequence[int] | None = None,
    checkpoint: str | None = None,
    depth: int | None = None,
) -> tuple[HieraFeatures | ViTFeatures | GeoFeatures, EncoderLoadReport | None]:
    """The unwrapped feature encoder of backbone ``name`` (a SAM2 / ViT / geo ``kind``) for inputs of
    ``size``, with the weights of the local file ``checkpoint`` (None: random) and its load report.

    ``kwargs``: extra timm ``create_model`` arguments (e.g. a smaller ``embed_dim`` / ``depth`` for
    tests; for "geo" the registry builder's); ``pyramid_blocks``: the ViT blocks taken (default
    :func:`default_pyramid_blocks`); ``depth``: the first blocks a "geo" encoder keeps (``model.depth``).
    """
    import timm

    kwargs = dict(kwargs or {})
    report = None
    if kind.kind == "geo" and kind.timm_name is not None:  # no load report: the registry's builder loads the file
        return build_geo_encoder(kind.timm_name, size, kwargs, depth, pyramid_blocks, checkpoint), None
    if kind.kind == "sam2":
        hiera = HieraFeatures(timm.create_model(kind.timm_name, pretrained=False, num_classes=0, **kwargs))
        if checkpoint:
            report = load_sam2_checkpoint(hiera.trunk, checkpoint, name)
        return hiera, report
    if kind.kind != "vit" or kind.timm_name is None:
        raise ValueError(f"build_feature_encoder builds SAM2 and ViT encoders, not {kind}")
    trunk = _vit_trunk(kind.timm_name, size, kwargs)
    if checkpoint:  # before the blocks after the last one taken are removed: their keys are then known
        report = load_vit_checkpoint(trunk, checkpoint, name)
    blocks = list(pyramid_blocks) if pyramid_blocks else default_pyramid_blocks(len(trunk.blocks))
    return ViTFeatures(trunk, blocks), report
