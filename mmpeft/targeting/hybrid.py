"""Families of hybrid models (convolutions and attention) whose presets differ from a ViT's.

The attention's fused projection is tuned whole where it cannot be cut into q and v thirds (a 1x1
``nn.Conv2d`` takes no slices; LeViT's and EfficientFormer's ``qkv`` hold 2 keys + values); the MLPs
are 1x1 convolutions in most (per-modality ``nn.Conv2d`` LoRA); the adapter presets are refused
where the features are (N, C, H, W) maps, an adapter being a bottleneck over the last axis.
:data:`HYBRID_FAMILIES` are registered after the other built-in families
(:func:`~mmpeft.targeting.family.register_family`: detection by marker class first).
docs/backbones.md lists each with its status.
"""

from __future__ import annotations

from .family import BackboneFamily

__all__ = ["HYBRID_FAMILIES"]

_NCHW = (
    "its attention and MLP are 1x1 convolutions on (N, C, H, W) maps, while an adapter is a bottleneck over the "
    "last axis of (..., C) features; use the LoRA presets (Conv2d LoRA per modality)"
)

HYBRID_FAMILIES: tuple[BackboneFamily, ...] = (
    # timm's TinyViT: attn.qkv's output is laid out per head (q, k, v of head 0, then of head 1, ...:
    # view(B, N, heads, -1).split), so its q / v thirds are no queries and values: LoRA on it whole
    BackboneFamily(
        name="timm_tiny_vit",
        qkv="attn.qkv",
        mlp_in="mlp.fc1",
        mlp_out="mlp.fc2",
        attn="attn",
        mlp="mlp",
        qkv_whole=True,
        classes=("timm.models.tiny_vit.Attention",),
        note="timm TinyViT: LoRA on the whole attn.qkv (laid out per head)",
    ),
    # convolutional attention (issue 24): 1x1 Conv2d projections on (N, C, H, W) maps; LoRA on the whole
    # fused projection (a Conv2d LoRA takes no q / v slices), the MLP's two 1x1 convolutions
    BackboneFamily(
        name="timm_visformer",
        qkv="attn.qkv",
        mlp_in="mlp.conv1",
        mlp_out="mlp.conv3",
        attn="attn",
        mlp="mlp",
        classes=("timm.models.visformer.Attention",),
        qkv_whole=True,
        adapter_refused=_NCHW,
        note="timm Visformer: Conv2d LoRA on attn.qkv (whole) and the MLP",
    ),
    BackboneFamily(
        name="timm_mobilevitv2",
        qkv="attn.qkv_proj",
        mlp_in="mlp.fc1",
        mlp_out="mlp.fc2",
        attn="attn",
        mlp="mlp",
        qkv_whole=True,
        classes=("timm.models.mobilevit.LinearSelfAttention",),
        adapter_refused=_NCHW,
        note="timm MobileViT v2: Conv2d LoRA on attn.qkv_proj (whole: 1 + 2 x C outputs) and the MLP",
    ),
    # timm's EfficientFormer (v1): attention blocks at the end (qkv: 2 key + value, not 3 x in) after
    # blocks whose MLP is two 1x1 convolutions (Conv2d LoRA there)
    BackboneFamily(
        name="timm_efficientformer",
        qkv="token_mixer.qkv",
        mlp_in="mlp.fc1",
        mlp_out="mlp.fc2",
        attn="token_mixer",
        mlp="mlp",
        qkv_whole=True,
        classes=("timm.models.efficientformer.Attention",),
        adapter_refused=_NCHW,
        note="timm EfficientFormer: LoRA on the whole token_mixer.qkv; MLPs Linear or 1x1 Conv2d",
    ),
    # timm's LeViT: LinearNorm projections (Linear + BatchNorm1d, its statistics frozen); FastViT: attention
    # blocks on (N, C, H, W) maps after RepMixer blocks, 1x1 convolution MLPs (Conv2d LoRA) in both
    BackboneFamily(
        name="timm_levit",
        qkv="attn.qkv.linear",
        mlp_in="mlp.ln1.linear",
        mlp_out="mlp.ln2.linear",
        attn="attn",
        mlp="mlp",
        qkv_whole=True,
        classes=("timm.models.levit.Attention",),
        note="timm LeViT: LoRA on the whole qkv (2 key + value outputs)",
    ),
    BackboneFamily(
        name="timm_fastvit",
        qkv="token_mixer.qkv",
        mlp_in="mlp.fc1",
        mlp_out="mlp.fc2",
        attn="token_mixer",
        mlp="mlp",
        adapter_refused=_NCHW,
        classes=("timm.models.fastvit.Attention",),
        note="timm FastViT: qkv thirds, Conv2d LoRA on the MLPs",
    ),
    # torchvision's MaxVit: window and grid attention per block, each an attention + MLP pair
    BackboneFamily(
        name="torchvision_maxvit",
        qkv="attn_layer.1.to_qkv",
        mlp_in="mlp_layer.1",
        mlp_out="mlp_layer.3",
        attn="attn_layer.1",
        mlp="mlp_layer",
        classes=("torchvision.models.maxvit.RelativePositionalMultiHeadAttention",),
        note="torchvision MaxVit: window and grid attention layers",
    ),
    # timm's NextViT: efficient self-attention on tokens (separate q, v) in its transformer blocks; every
    # block's MLP two 1x1 convolutions; its convolutional attention (mhca) left out, named by the warning
    BackboneFamily(
        name="timm_nextvit",
        qkv=None,
        mlp_in="mlp.fc1",
        mlp_out="mlp.fc2",
        attn="e_mhsa",
        mlp="mlp",
        q="e_mhsa.q",
        v="e_mhsa.v",
        adapter_refused=_NCHW,
        classes=("timm.models.nextvit.EfficientAttention",),
        note="timm NextViT: e_mhsa q, v; Conv2d LoRA on the MLPs",
    ),
    # timm's EfficientFormerV2: q, k, v 1x1 convolutions behind BatchNorms (ConvNorm: LoRA on the convolution)
    BackboneFamily(
        name="timm_efficientformerv2",
        qkv=None,
        mlp_in="mlp.fc1.conv",
        mlp_out="mlp.fc2.conv",
        attn="token_mixer",
        mlp="mlp",
        q="token_mixer.q.conv",
        v="token_mixer.v.conv",
        classes=("timm.models.efficientformer_v2.Attention2d",),
        adapter_refused=_NCHW,
        note="timm EfficientFormerV2: Conv2d LoRA on q, v and the MLP's 1x1 convolutions",
    ),
    # timm's TNT: an inner transformer on pixel tokens and an outer one on patch tokens per block; the
    # presets tune the outer (q half of the fused qk, v; its MLP), the inner attention named as left out
    BackboneFamily(
        name="timm_tnt",
        qkv=None,
        mlp_in="mlp.fc1",
        mlp_out="mlp.fc2",
        attn="attn_out",
        mlp="mlp",
        qk="attn_out.qk",
        v="attn_out.v",
        classes=("timm.models.tnt.Attention",),
        note="timm TNT: the outer transformer (q half of attn_out.qk, v)",
    ),
)
