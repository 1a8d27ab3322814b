"""SAM image encoders (timm or segment-anything) and official-checkpoint loading.

A single import point for :mod:`.sam_build` (specs, builders) and :mod:`.sam_load`
(checkpoint reading, key mapping, grid resizing).
"""

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
