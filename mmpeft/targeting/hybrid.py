"""Families of hybrid models (convolutions and attention) whose presets differ from a ViT's.

The attention's fused projection is tuned whole where it cannot be cut into q and v thirds (a 1x1
``nn.Conv2d`` takes no slices; LeViT's and EfficientFormer's ``qkv`` hold 2 keys + values); the MLPs
are 1x1 convolutions in most (per-modality ``nn.Conv2d`` LoRA); the adapter presets are refused
where the features are (N, C, H, W) maps, an adapter being a bottleneck over the last axis.
:data:`HYBRID_FAMILIES` joins :data:`mmpeft.targeting.targets.FAMILIES` before the class-less
families (detection by marker class first). docs/backbones.md lists each with its status.
"""

from __future__ import annotations

from .family import BackboneFamily

__all__ = ["HYBRID_FAMILIES"]

_NCHW = (
    "its attention and MLP are 1x1 convolutions on (N, C, H, W) maps, while an adapter is a bottleneck over the "
    "last axis of (..., C) features; use the LoRA presets (Conv2d LoRA per modality)"
)

HYBRID_FAMILIES: dict[str, BackboneFamily] = {
    # convolutional attention (issue 24): 1x1 Conv2d projections on (N, C, H, W) maps; LoRA on the whole
    # fused projection (a Conv2d LoRA takes no q / v slices), the MLP's two 1x1 convolutions
    "timm_visformer": BackboneFamily(
        "timm_visformer",
        "attn.qkv",
        "mlp.conv1",
        "mlp.conv3",
        "attn",
        "mlp",
        classes=("timm.models.visformer.Attention",),
        qkv_whole=True,
        adapter_refused=_NCHW,
        note="timm Visformer: Conv2d LoRA on attn.qkv (whole) and the MLP",
    ),
    "timm_mobilevitv2": BackboneFamily(
        "timm_mobilevitv2",
        "attn.qkv_proj",
        "mlp.fc1",
        "mlp.fc2",
        "attn",
        "mlp",
        qkv_whole=True,
        classes=("timm.models.mobilevit.LinearSelfAttention",),
        adapter_refused=_NCHW,
        note="timm MobileViT v2: Conv2d LoRA on attn.qkv_proj (whole: 1 + 2 x C outputs) and the MLP",
    ),
    # timm's EfficientFormer (v1): attention blocks at the end (qkv: 2 key + value, not 3 x in) after
    # blocks whose MLP is two 1x1 convolutions (Conv2d LoRA there)
    "timm_efficientformer": BackboneFamily(
        "timm_efficientformer",
        "token_mixer.qkv",
        "mlp.fc1",
        "mlp.fc2",
        "token_mixer",
        "mlp",
        qkv_whole=True,
        classes=("timm.models.efficientformer.Attention",),
        adapter_refused=_NCHW,
        note="timm EfficientFormer: LoRA on the whole token_mixer.qkv; MLPs Linear or 1x1 Conv2d",
    ),
    # timm's LeViT: LinearNorm projections (Linear + BatchNorm1d, its statistics frozen); FastViT: attention
    # blocks on (N, C, H, W) maps after RepMixer blocks, 1x1 convolution MLPs (Conv2d LoRA) in both
    "timm_levit": BackboneFamily(
        "timm_levit",
        "attn.qkv.linear",
        "mlp.ln1.linear",
        "mlp.ln2.linear",
        "attn",
        "mlp",
        qkv_whole=True,
        classes=("timm.models.levit.Attention",),
        note="timm LeViT: LoRA on the whole qkv (2 key + value outputs)",
    ),
    "timm_fastvit": BackboneFamily(
        "timm_fastvit",
        "token_mixer.qkv",
        "mlp.fc1",
        "mlp.fc2",
        "token_mixer",
        "mlp",
        adapter_refused=_NCHW,
        classes=("timm.models.fastvit.Attention",),
        note="timm FastViT: qkv thirds, Conv2d LoRA on the MLPs",
    ),
    # torchvision's MaxVit: window and grid attention per block, each an attention + MLP pair
    "torchvision_maxvit": BackboneFamily(
        "torchvision_maxvit",
        "attn_layer.1.to_qkv",
        "mlp_layer.1",
        "mlp_layer.3",
        "attn_layer.1",
        "mlp_layer",
        classes=("torchvision.models.maxvit.RelativePositionalMultiHeadAttention",),
        note="torchvision MaxVit: window and grid attention layers",
    ),
    # timm's NextViT: efficient self-attention on tokens (separate q, v) in its transformer blocks; every
    # block's MLP two 1x1 convolutions; its convolutional attention (mhca) left out, named by the warning
    "timm_nextvit": BackboneFamily(
        "timm_nextvit",
        None,
        "mlp.fc1",
        "mlp.fc2",
        "e_mhsa",
        "mlp",
        q="e_mhsa.q",
        v="e_mhsa.v",
        adapter_refused=_NCHW,
        classes=("timm.models.nextvit.EfficientAttention",),
        note="timm NextViT: e_mhsa q, v; Conv2d LoRA on the MLPs",
    ),
    # timm's EfficientFormerV2: q, k, v 1x1 convolutions behind BatchNorms (ConvNorm: LoRA on the convolution)
    "timm_efficientformerv2": BackboneFamily(
        "timm_efficientformerv2",
        None,
        "mlp.fc1.conv",
        "mlp.fc2.conv",
        "token_mixer",
        "mlp",
        q="token_mixer.q.conv",
        v="token_mixer.v.conv",
        classes=("timm.models.efficientformer_v2.Attention2d",),
        adapter_refused=_NCHW,
        note="timm EfficientFormerV2: Conv2d LoRA on q, v and the MLP's 1x1 convolutions",
    ),
    # timm's TNT: an inner transformer on pixel tokens and an outer one on patch tokens per block; the
    # presets tune the outer (q half of the fused qk, v; its MLP), the inner attention named as left out
    "timm_tnt": BackboneFamily(
        "timm_tnt",
        None,
        "mlp.fc1",
        "mlp.fc2",
        "attn_out",
        "mlp",
        qk="attn_out.qk",
        v="attn_out.v",
        classes=("timm.models.tnt.Attention",),
        note="timm TNT: the outer transformer (q half of attn_out.qk, v)",
    ),
}
