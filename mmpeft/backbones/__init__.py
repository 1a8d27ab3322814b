"""Frozen backbones: SAM image encoders and their official checkpoints."""

from .sam import (
    SAM_SPECS,
    SamCheckpointError,
    SamImpl,
    SamLoadReport,
    SamSpec,
    TimmSamEncoder,
    build_sam_encoder,
    load_sam_checkpoint,
    read_sam_state_dict,
    replace_spec,
    resize_pos_embed,
    resize_rel_pos,
    resolve_sam_spec,
    sam_encoder_grid,
    sam_encoder_impl,
)

__all__ = [
    "SAM_SPECS",
    "SamCheckpointError",
    "SamImpl",
    "SamLoadReport",
    "SamSpec",
    "TimmSamEncoder",
    "build_sam_encoder",
    "load_sam_checkpoint",
    "read_sam_state_dict",
    "replace_spec",
    "resize_pos_embed",
    "resize_rel_pos",
    "resolve_sam_spec",
    "sam_encoder_grid",
    "sam_encoder_impl",
]
