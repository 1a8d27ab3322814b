"""Per-modality reference execution of a wrapped SAM-style encoder.

The batched path runs the frozen encoder once over the stacked ``(M*B, ...)`` batch. This module
runs the *same layers* the way the MFNet authors' code does: every modality one after the other
through every block (patch embedding, attention, MLP, neck), exchanging only the per-modality
updates inside the mixing layers. It is the reference the tests compare the batched path with, and
the "per-modality" scheme that ``benchmarks/speed.py`` measures.

Supported encoders: segment-anything's ``ImageEncoderViT`` and timm's ``VisionTransformerSAM``
(``patch_embed``, ``pos_embed``, ``blocks`` with ``norm1/attn/norm2/mlp/window_size``, ``neck``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from segment_anything.modeling.image_encoder import window_partition, window_unpartition

from ..errors import MmpeftTypeError, MmpeftValueError
from ..model.multimodal import MultimodalModel
from ..tuners import only_modality, set_execution

__all__ = ["per_modality_forward"]


def _attention_half(block: Any, x: torch.Tensor) -> torch.Tensor:
    """x + attn(norm1(x)) with window partition, for one modality. x: (B, H, W, C)."""
    h, w = x.shape[1:3]
    y = block.norm1(x)
    ws = int(getattr(block, "window_size", 0))
    if ws > 0:
        y, pad_hw = window_partition(y, ws)  # SAM's own partition (pads to a multiple of ws)
    y = block.attn(y)
    ls1 = getattr(block, "ls1", None)
    if ls1 is not None:
        y = ls1(y)
    if ws > 0:
        y = window_unpartition(y, ws, pad_hw, (h, w))
    return x + y


def per_modality_forward(
    wrapped: MultimodalModel,
    inputs: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    finite_checked: bool = False,
) -> dict[str, torch.Tensor]:
    """Run ``wrapped`` (a wrapped SAM-style encoder) modality by modality; returns {modality: neck output}.

    Numerically the same function as ``wrapped(inputs)`` (up to float rounding), executed the way
    the authors' code executes it. Leaves the layers in ``"batched"`` execution afterwards.
    ``finite_checked``: the inputs were already checked for NaN / inf (as in ``wrapped.forward``).
    """
    enc: Any = wrapped.base_model  # a SAM-style encoder, checked below
    missing = [a for a in ("patch_embed", "blocks", "neck") if not hasattr(enc, a)]
    if missing:
        raise MmpeftTypeError(
            f"per_modality_forward runs SAM-style encoders block by block as the MFNet authors' code does; "
            f"{type(enc).__name__} has no {missing}. For any model, mmpeft.reference_forward runs it modality "
            "by modality through its own forward"
        )
    mods = wrapped.modalities
    x = wrapped.stack(inputs, finite_checked)  # (M*B, C, H, W): validated, stems applied
    set_execution(wrapped, "loop")
    try:  # the patch embedding per modality (a LoRA on it may mix, so it sees every modality)
        hs = list(enc.patch_embed(x).chunk(len(mods), 0))  # M x (B, H, W, C)
    finally:
        set_execution(wrapped, "batched")
    pos = getattr(enc, "pos_embed", None)
    if pos is not None:
        if pos.shape[1:3] != hs[0].shape[1:3]:
            raise MmpeftValueError(f"pos_embed {tuple(pos.shape)} does not match the grid {tuple(hs[0].shape)}")
        hs = [h + pos for h in hs]
    set_execution(wrapped, "loop")
    try:
        for block in enc.blocks:
            new = []
            for m, h in zip(mods, hs):
                with only_modality(wrapped, m):
                    new.append(_attention_half(block, h))
            normed = torch.cat([block.norm2(h) for h in new], 0)  # mixing layers need every modality
            mlp_out = block.mlp(normed).chunk(len(mods), 0)  # loop execution: base layers per modality
            ls2 = getattr(block, "ls2", None)
            hs = [h + (ls2(o) if ls2 is not None else o) for h, o in zip(new, mlp_out)]
    finally:
        set_execution(wrapped, "batched")
    outs = {}
    for m, h in zip(mods, hs):
        with only_modality(wrapped, m):
            outs[m] = enc.neck(h.permute(0, 3, 1, 2))
    return outs
