"""Tiny random transformers vision models (transformers 5): one per architecture a user would wrap,
built from a small config (hidden size 32 or less, 1-2 layers per stage, 32 px input). Shared by
``benchmarks/hf_model_status.py`` (every entry) and ``tests/test_hf_models.py`` (a subset).

``MODELS`` are the 22 attention backbones counted by the benchmark; ``EXTRAS`` are measured beside
them (a CNN that must be refused, models whose forward needs more than the image).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SIZE = 32  # the input's height and width

_VIT = {"image_size": SIZE, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
_VIT_MLP = {**_VIT, "intermediate_size": 64}
_SWIN = {"image_size": SIZE, "patch_size": 4, "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4}
_HIER = {"num_channels": 3, "hidden_sizes": [16, 32], "num_attention_heads": [1, 2], "depths": [1, 1]}

# the convolutions' default init (std 0.02) makes a tiny MobileViT's features underflow (1e-25)
_CONV_INIT = {"initializer_range": 0.3}

# name: (model class, config class, config fields)
MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "vit": ("ViTModel", "ViTConfig", _VIT_MLP),
    "deit": ("DeiTModel", "DeiTConfig", _VIT_MLP),
    "beit": ("BeitModel", "BeitConfig", {**_VIT_MLP, "use_relative_position_bias": True}),
    "data2vec_vision": ("Data2VecVisionModel", "Data2VecVisionConfig", _VIT_MLP),
    "dinov2": ("Dinov2Model", "Dinov2Config", {**_VIT, "mlp_ratio": 2}),
    "dinov2_with_registers": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", {**_VIT, "mlp_ratio": 2}),
    "dinov3_vit": ("DINOv3ViTModel", "DINOv3ViTConfig", _VIT_MLP),
    "vit_mae": ("ViTMAEModel", "ViTMAEConfig", _VIT_MLP),
    "vit_msn": ("ViTMSNModel", "ViTMSNConfig", _VIT_MLP),
    "clip_vision": ("CLIPVisionModel", "CLIPVisionConfig", _VIT_MLP),
    "siglip_vision": ("SiglipVisionModel", "SiglipVisionConfig", _VIT_MLP),
    "swin": ("SwinModel", "SwinConfig", _SWIN),
    "swinv2": ("Swinv2Model", "Swinv2Config", _SWIN),
    "donut_swin": ("DonutSwinModel", "DonutSwinConfig", _SWIN),
    "maskformer_swin": ("MaskFormerSwinModel", "MaskFormerSwinConfig", _SWIN),
    "segformer": (
        "SegformerModel",
        "SegformerConfig",
        {**_HIER, "num_encoder_blocks": 2, "sr_ratios": [2, 1], "patch_sizes": [7, 3], "strides": [4, 2]},
    ),
    "pvt_v2": (
        "PvtV2Model",
        "PvtV2Config",
        {**_HIER, "num_encoder_blocks": 2, "sr_ratios": [2, 1], "patch_sizes": [7, 3], "strides": [4, 2]},
    ),
    "mobilevit": (
        "MobileViTModel",
        "MobileViTConfig",
        {"image_size": 64, "hidden_sizes": [16, 24, 32], "neck_hidden_sizes": [8, 8, 16, 16, 24, 32, 64], **_CONV_INIT},
    ),
    "mobilevitv2": (
        "MobileViTV2Model",
        "MobileViTV2Config",
        {"image_size": 64, "width_multiplier": 0.25, **_CONV_INIT},
    ),
    "levit": (
        "LevitModel",
        "LevitConfig",
        {"image_size": 64, "hidden_sizes": [16, 32, 48], "num_attention_heads": [1, 2, 3], "depths": [1, 1, 1]},
    ),
    "hiera": (
        "HieraModel",
        "HieraConfig",
        {"image_size": [64, 64], "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2]},
    ),
    "yolos": ("YolosModel", "YolosConfig", {**_VIT_MLP, "image_size": [SIZE, SIZE], "num_detection_tokens": 2}),
}

EXTRAS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "vitdet": ("VitDetModel", "VitDetConfig", {**_VIT, "pretrain_image_size": SIZE, "mlp_ratio": 2}),
    "ijepa": ("IJepaModel", "IJepaConfig", _VIT_MLP),
    "pvt": (
        "PvtModel",
        "PvtConfig",
        {
            **_HIER,
            "image_size": SIZE,
            "num_encoder_blocks": 2,
            "sequence_reduction_ratios": [2, 1],
            "patch_sizes": [4, 2],
            "strides": [4, 2],
        },
    ),
    "aimv2_vision": ("Aimv2VisionModel", "Aimv2VisionConfig", {**_VIT_MLP, "hidden_size": 32}),
    "focalnet": ("FocalNetModel", "FocalNetConfig", {"image_size": SIZE, "embed_dim": 16, "depths": [1, 1]}),
    "convnext": ("ConvNextModel", "ConvNextConfig", {"hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2}),
}


def build(name: str, seed: int = 0) -> nn.Module:
    """The tiny random model ``name`` of MODELS or EXTRAS, in eval mode, seeded."""
    import transformers

    cls, cfg_cls, fields = {**MODELS, **EXTRAS}[name]
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**fields)).eval()
    if name == "vit_mae":  # its forward masks and shuffles tokens at random: a fixed noise, as its docs ask
        model.embeddings.register_forward_pre_hook(_fixed_noise, with_kwargs=True)
    return model


def vit_classifier(seed: int = 0, **config: Any) -> nn.Module:
    """A tiny ``ViTForImageClassification`` (2 layers of width 16, 32 px in 16 px patches, 4 labels;
    ``config`` overrides, e.g. ``problem_type``), seeded, as built (training mode): the head the
    Trainer, ``labels=`` and accelerate tests wrap."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(
        **{**_VIT, "hidden_size": 16, "patch_size": 16, "intermediate_size": 32, "num_labels": 4, **config}
    )
    return transformers.ViTForImageClassification(cfg)


def _fixed_noise(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """ViTMAE's embeddings given the same noise for every sample when none is passed."""
    if kwargs.get("noise") is not None:
        return None
    x = args[0] if args else kwargs["pixel_values"]
    tokens = module.position_embeddings.shape[1] - 1
    noise = torch.linspace(0, 1, tokens, device=x.device).flip(0).expand(x.shape[0], tokens)
    return args, {**kwargs, "noise": noise}


def input_size(name: str) -> int:
    fields = {**MODELS, **EXTRAS}[name][2]
    size = fields.get("image_size", SIZE)
    return size[0] if isinstance(size, list) else size
