"""Frozen backbones: SAM image encoders and their official checkpoints; the official SAM / SAM2 /
DINOv2 weight files by name (:mod:`.weights`); torchvision's ViT attention with called projections
(see docs/backbones.md for every supported family)."""

from .sam_build import (
    SAM_SPECS,
    SamImpl,
    SamSpec,
    TimmSamEncoder,
    build_sam_encoder,
    replace_spec,
    resolve_sam_spec,
    sam_encoder_grid,
    sam_encoder_impl,
)
from .sam_load import (
    SamCheckpointError,
    SamLoadReport,
    load_sam_checkpoint,
    read_sam_state_dict,
    resize_pos_embed,
    resize_rel_pos,
    zero_rel_pos,
)
from .torchvision_vit import ExplicitMultiheadAttention, make_attention_explicit
from .weights import WEIGHT_FILES, WeightFile, fetch_timm_weights, fetch_weights, resolve_weights, weights_cache_dir

__all__ = [
    "ExplicitMultiheadAttention",
    "SAM_SPECS",
    "SamCheckpointError",
    "SamImpl",
    "SamLoadReport",
    "SamSpec",
    "TimmSamEncoder",
    "WEIGHT_FILES",
    "WeightFile",
    "build_sam_encoder",
    "fetch_timm_weights",
    "fetch_weights",
    "load_sam_checkpoint",
    "make_attention_explicit",
    "read_sam_state_dict",
    "replace_spec",
    "resize_pos_embed",
    "resize_rel_pos",
    "resolve_sam_spec",
    "resolve_weights",
    "sam_encoder_grid",
    "sam_encoder_impl",
    "weights_cache_dir",
    "zero_rel_pos",
]
