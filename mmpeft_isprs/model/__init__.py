"""The model layer: MFNet = wrapped encoder (SAM, SAM2's Hiera, a timm ViT) + Deep Fusion Module + UNetFormer decoder.

Imports only the core (``mmpeft``), torch, timm and safetensors; never the data, task or
command layers (see docs/architecture.md).

- :mod:`.config`: :class:`MFNetConfig`, the paper's presets (:data:`MFNET_PRESETS`);
- :mod:`.mfnet`: :class:`MFNet`, :func:`build_mfnet` (the one place a model is built);
- :mod:`.weights`: :func:`save_mfnet` / :func:`load_mfnet` (trainable tensors + config), :func:`read_mfnet`
  (the file read once, :class:`MFNetFile`);
- :mod:`.dfm`, :mod:`.decoder`, :mod:`.decoder_blocks`: the fusion module and the decoder;
- :mod:`.encoders` (SAM2 / ViT feature encoders, ``model.backbone`` names), :mod:`.pyramid` (their DFM
  pyramids), :mod:`.encoder_weights` and :mod:`.sam2_weights` (their local checkpoints).
"""

from .config import MFNET_PRESETS, MFNetConfig, check_input_size, mfnet_preset
from .mfnet import MFNet, build_encoder, build_mfnet
from .weights import MFNetFile, load_mfnet, read_mfnet, save_mfnet

__all__ = [
    "MFNetConfig",
    "MFNet",
    "MFNET_PRESETS",
    "mfnet_preset",
    "build_mfnet",
    "build_encoder",
    "save_mfnet",
    "load_mfnet",
    "read_mfnet",
    "MFNetFile",
    "check_input_size",
]
