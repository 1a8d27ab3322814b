"""Official SAM2 checkpoints (``sam2_hiera_tiny.pt`` ... ``sam2.1_hiera_large.pt``) into timm's Hiera.

An official file is ``{"model": state_dict}``; its image encoder's trunk sits under
``image_encoder.trunk.*`` in the layout of timm's ``HieraDet`` but for the MLP, which SAM2 keeps
as a list of layers. The key map, explicitly (``<i>`` a block index):

=================================================  ==============================
official key                                       timm ``HieraDet`` key
=================================================  ==============================
``image_encoder.trunk.patch_embed.proj.*``         ``patch_embed.proj.*``
``image_encoder.trunk.pos_embed``                  ``pos_embed``
``image_encoder.trunk.pos_embed_window``           ``pos_embed_window``
``image_encoder.trunk.blocks.<i>.mlp.layers.0.*``  ``blocks.<i>.mlp.fc1.*``
``image_encoder.trunk.blocks.<i>.mlp.layers.1.*``  ``blocks.<i>.mlp.fc2.*``
``image_encoder.trunk.blocks.<i>.<rest>``          ``blocks.<i>.<rest>`` (norm1, attn.qkv, attn.proj, norm2, proj)
every other key (neck, memory, mask decoder ...)   dropped, reported
=================================================  ==============================

The forward map is timm's own ``timm.models.hieradet_sam2.checkpoint_filter_fn`` (prefix
``image_encoder.trunk.``); :func:`timm_to_sam2_state_dict` is its inverse (tests write
official-layout files with it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from .encoder_weights import (
    EncoderCheckpointError,
    EncoderLoadReport,
    describe_checkpoint,
    load_checked,
    read_state_dict,
)

__all__ = ["SAM2_TRUNK_PREFIX", "sam2_to_timm_state_dict", "timm_to_sam2_state_dict", "load_sam2_checkpoint"]

SAM2_TRUNK_PREFIX = "image_encoder.trunk."
#: (width, blocks) of each official trunk
SAM2_SIZES = {
    (96, 12): "sam2_hiera_tiny",
    (96, 16): "sam2_hiera_small",
    (112, 24): "sam2_hiera_base_plus",
    (144, 48): "sam2_hiera_large",
}


def sam2_to_timm_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official SAM2 keys -> timm ``HieraDet`` keys (timm's ``checkpoint_filter_fn``); with the keys
    outside the trunk, dropped (checkpoint naming)."""
    from timm.models.hieradet_sam2 import checkpoint_filter_fn

    dropped = sorted(k for k in state if not k.startswith(SAM2_TRUNK_PREFIX))
    return checkpoint_filter_fn(dict(state), prefix=SAM2_TRUNK_PREFIX), dropped


def timm_to_sam2_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ``HieraDet`` keys -> official SAM2 keys (the inverse of :func:`sam2_to_timm_state_dict`
    on the trunk); a classifier head (``head.*``) has no official key and is left out."""
    out = {}
    for key, value in state.items():
        if key.startswith("head."):
            continue
        key = key.replace(".mlp.fc1.", ".mlp.layers.0.").replace(".mlp.fc2.", ".mlp.layers.1.")
        out[SAM2_TRUNK_PREFIX + key] = value
    return out


def _trunk_size(trunk: nn.Module) -> tuple[int, int]:
    return int(trunk.patch_embed.proj.weight.shape[0]), len(trunk.blocks)  # type: ignore[union-attr, arg-type]


def load_sam2_checkpoint(
    trunk: nn.Module, path: str | os.PathLike, backbone: str, strict: bool = True
) -> EncoderLoadReport:
    """Load the image-encoder trunk of an official SAM2 file into timm's ``HieraDet`` ``trunk``.

    Keys outside ``image_encoder.trunk.`` are dropped (listed in the report); with ``strict`` any
    missing or unexpected trunk key is an error naming it. A file of another encoder (SAM, DINOv2, a
    timm ViT) or another SAM2 size is refused with an error saying what the file is.
    """
    state = read_state_dict(path)
    report = EncoderLoadReport(os.fspath(path), backbone)
    kind = describe_checkpoint(state)
    if not any(k.startswith(SAM2_TRUNK_PREFIX) for k in state):
        raise EncoderCheckpointError(
            f"model.checkpoint {report.source} is {kind}, not a SAM2 checkpoint (no {SAM2_TRUNK_PREFIX}* keys); "
            f"model.backbone {backbone} needs an official sam2_hiera_*.pt / sam2.1_hiera_*.pt file"
        )
    mapped, report.dropped = sam2_to_timm_state_dict(state)
    width = mapped.get("patch_embed.proj.weight", torch.empty(0)).shape[0]
    blocks = len({k.split(".")[1] for k in mapped if k.startswith("blocks.")})
    if (width, blocks) != _trunk_size(trunk):
        named = SAM2_SIZES.get((width, blocks), "a trunk of no official size")
        w, d = _trunk_size(trunk)
        raise EncoderCheckpointError(
            f"model.checkpoint {report.source} is {kind}, i.e. {named}; model.backbone {backbone} has width {w} "
            f"and {d} blocks: set model.backbone={named} or give the {backbone} checkpoint"
        )
    return load_checked(trunk, mapped, report, strict, "timm HieraDet, SAM2 key map")
