"""The MFNet configuration: every choice that defines a model, and the paper's named presets."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mmpeft import FUSION_RULES, resolve_dtype
from mmpeft.backbones import SAM_SPECS

from .encoders import BackboneKind, resolve_backbone

__all__ = ["MFNetConfig", "MFNET_PRESETS", "mfnet_preset", "check_input_size", "global_blocks"]


@dataclass
class MFNetConfig:
    """Every choice that defines an MFNet (JSON round-trip; no argv, no globals).

    Attributes:
        backbone: the frozen encoder (docs/mfnet.md#encoders). SAM's ViT: "vit_b", "vit_l", "vit_h" or
            "vit_tiny" (tests, CPU demo); SAM2's Hiera: "sam2_hiera_tiny", "sam2_hiera_small",
            "sam2_hiera_base_plus", "sam2_hiera_large" (its four stages feed the DFM); DINOv2:
            "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14" (and "_reg" variants),
            or any timm ViT name (a simple pyramid from ``pyramid_blocks`` feeds the DFM); TerraTorch's
            backbone registry (the extra geo-fm): "terratorch_prithvi_eo_v2_tiny_tl", "timm_clay_v1_base",
            ... or a timm name it registers ("clay_v1_base", "prithvi_swin_B", "prithvi_swin_L")
            (docs/mfnet.md#terratorch-encoders).
        impl: "timm" (timm's VisionTransformerSAM) or "segment_anything" (the original ImageEncoderViT).
        method: "adapter", "lora" or "none" (frozen encoder: Table IV's "without Adapter").
        fusion: cross-modal rule of the mixing parts of the encoder, passed to
            ``wrap_multimodal``: "scalar" (MFNet), "none" (standard per-modality tuning),
            "matrix" (a learnable M x M mix), or any rule added with
            ``mmpeft.register_fusion`` (register it before building the config).
        preset: an mmpeft preset choosing the placement instead of ``method``, e.g.
            "mmadapter_authors" (``fusion`` still sets the rule of its mixing parts).
        modalities: input modalities in order (optical first; one or more).
        dfm: the Deep Fusion Module; False is Table V's "without DFM" (encoder outputs summed,
            then one simple pyramid).
        dfm_norms: "authors" (LayerNorm in the optical pyramid, BatchNorm in the DSM one) or "layernorm".
        num_classes: 6 for ISPRS, 7 for MMHunan.
        img_size: input (H, W) or side; multiples of 32. Position embeddings are resized once.
        checkpoint: local path of an official SAM checkpoint (None: random encoder weights).
        zero_rel_pos: zero the relative position tables after loading (the published runs).
        pos_embed_interp: "bicubic" (the authors' resize) or "antialias".
        rank, alpha, ratio, lambda_init: method options (None: the preset's value).
        stems: per-modality stem kinds, e.g. {"dsm": "repeat"} (default: auto = repeat to 3).
        grad_checkpointing: recompute encoder block activations in backward (less memory).
        efficient_attention: run the encoder blocks without work on window padding, with fused
            attention (``mmpeft.runtime.attention``; same outputs). True: the attention calls chosen per
            device at run time (one call over the padded windows on CUDA, the real queries only
            elsewhere); "real" / "all" force one; False: the encoder's own blocks.
        base_dtype: keep the frozen encoder weights in this dtype ("bf16", "fp16"; None: float32):
            half their memory, no per-step casts under autocast; trainable tensors stay float32.
        compile: "auto" (regional ``torch.compile`` of the encoder blocks on CUDA, none elsewhere),
            "blocks" (always), "model" (``torch.compile`` of the whole training forward),
            "model-ro" (the same with ``mode="reduce-overhead"``: CUDA graphs), "none". Same
            function as eager; the first step pays the compile time.
        execution: "batched" (one frozen pass over the stacked modalities) or "per_modality"
            (every modality through every layer one after the other: the authors' scheme, for
            benchmarks and checks; same maths).
        decode_channels, decoder_dropout, window_size, decoder_heads: the UNetFormer decoder.
        embed_dim, depth, num_heads: override the backbone size (tests); for SAM2 only
            ``embed_dim`` / ``num_heads`` (its depth is ``encoder_kwargs={"stages": [...]}``); for a
            TerraTorch ViT ``depth`` keeps the first blocks of the built model (Clay's builder takes none).
        encoder_kwargs: further timm ``create_model`` arguments of a SAM2 / ViT backbone (e.g.
            ``{"stages": [1, 1, 1, 1], "global_att_blocks": []}`` for a tiny Hiera in tests); for a
            TerraTorch backbone its registry builder's (``bands``, ``depth``, ``depths``, ...).
        pyramid_blocks: the ViT blocks whose maps feed the DFM: four (one per pyramid level,
            shallow to deep) or one (ViTDet: the last block, ``[-1]``); default four evenly spaced
            blocks ending with the last. ViTs only (timm's and TerraTorch's).
        wavelengths: per-modality wavelengths (the model's units: micrometres for DOFA and Clay), e.g.
            ``{"sar": [3.5, 4.0]}``, for a TerraTorch encoder whose patch embedding is generated from
            them: each modality named is embedded from its own (``mmpeft.set_modality_arguments``),
            the others from the bands the model was built for.
    """

    backbone: str = "vit_b"
    impl: str = "timm"
    method: str = "adapter"
    fusion: str = "scalar"
    preset: str | None = None
    modalities: list[str] = field(default_factory=lambda: ["optical", "dsm"])
    dfm: bool = True
    dfm_norms: str = "authors"
    num_classes: int = 6
    img_size: int | list[int] = 256
    checkpoint: str | None = None
    zero_rel_pos: bool = False
    pos_embed_interp: str = "bicubic"
    rank: int | None = None
    alpha: float | None = None
    ratio: float | None = None
    lambda_init: float | None = None
    stems: dict[str, Any] = field(default_factory=dict)
    grad_checkpointing: bool = False
    efficient_attention: bool | str = True
    base_dtype: str | None = None
    compile: str = "auto"
    execution: str = "batched"
    decode_channels: int = 64
    decoder_dropout: float = 0.1
    window_size: int = 8
    decoder_heads: int = 8
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    pyramid_blocks: list[int] | None = None
    wavelengths: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fusion not in FUSION_RULES:
            raise ValueError(f"unknown fusion rule {self.fusion!r}; known: {sorted(FUSION_RULES)}")
        _check_encoder_options(self, self.backbone_kind)
        if self.method not in ("adapter", "lora", "none"):
            raise ValueError(f"method must be 'adapter', 'lora' or 'none', got {self.method!r}")
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be unique and non-empty, got {self.modalities}")
        if self.efficient_attention not in (True, False, "auto", "real", "all"):
            raise ValueError(
                f"efficient_attention must be true, false, 'real' or 'all', got {self.efficient_attention!r}"
            )
        resolve_dtype(self.base_dtype)  # ValueError naming the accepted names
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.execution not in ("batched", "per_modality"):
            raise ValueError(f"execution must be 'batched' or 'per_modality', got {self.execution!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        check_input_size(self.size)

    @property
    def size(self) -> tuple[int, int]:
        s = self.img_size
        return (int(s), int(s)) if isinstance(s, int) else (int(s[0]), int(s[1]))

    @property
    def backbone_kind(self) -> BackboneKind:
        """What ``backbone`` names: "sam", "sam2" or "vit", with the timm model name."""
        return resolve_backbone(self.backbone, tuple(SAM_SPECS))

    @property
    def timm_kwargs(self) -> dict[str, Any]:
        """The timm ``create_model`` arguments of a SAM2 / ViT backbone: the size overrides that are
        set, then ``encoder_kwargs``."""
        sizes = {k: getattr(self, k) for k in ("embed_dim", "depth", "num_heads") if getattr(self, k)}
        return {**sizes, **self.encoder_kwargs}

    @property
    def geo_kwargs(self) -> dict[str, Any]:
        """The registry builder's arguments of a TerraTorch backbone: ``embed_dim`` / ``num_heads`` when
        set, then ``encoder_kwargs`` (``depth`` keeps the first blocks of the built model instead)."""
        sizes = {k: getattr(self, k) for k in ("embed_dim", "num_heads") if getattr(self, k)}
        return {**sizes, **self.encoder_kwargs}

    @property
    def mmpeft_preset(self) -> str:
        """The mmpeft placement preset: ``preset``, else "frozen" / "mm<method>" / "<method>" (no mixing)."""
        if self.preset is not None:
            return self.preset
        if self.method == "none":
            return "frozen"
        return self.method if self.fusion == "none" else f"mm{self.method}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MFNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MFNet config keys {unknown}; known: {sorted(known)}")
        return cls(**dict(d))


def _check_encoder_options(cfg: MFNetConfig, kind: BackboneKind) -> None:
    """The options that only some encoders take, named when given to another."""
    name = f"model.backbone={cfg.backbone}"
    if kind.kind == "sam":
        bad = [k for k in ("encoder_kwargs", "pyramid_blocks", "wavelengths") if getattr(cfg, k)]
        if bad:
            raise ValueError(
                f"{bad} apply to SAM2 / timm ViT backbones, not to SAM's {name} (wavelengths: to TerraTorch encoders)"
            )
        return
    bad = [
        k
        for k, v in (
            ("impl", cfg.impl != "timm"),
            ("zero_rel_pos", cfg.zero_rel_pos),
            ("pos_embed_interp", cfg.pos_embed_interp != "bicubic"),
        )
        if v
    ]
    if kind.kind == "sam2":
        bad += [k for k in ("depth", "pyramid_blocks") if getattr(cfg, k)] + (
            ["dfm_norms"] if cfg.dfm_norms != "authors" else []
        )
    if kind.kind != "geo":
        bad += ["wavelengths"] if cfg.wavelengths else []
    else:
        _check_geo_options(cfg)
    if bad:
        raise ValueError(
            f"{bad} do not apply to {name} (impl / zero_rel_pos / pos_embed_interp are SAM's; a SAM2 trunk's depth is "
            "encoder_kwargs={'stages': [...]}; pyramid_blocks are a ViT's; SAM2's pyramid projection always uses "
            "LayerNorm, so dfm_norms does not apply; wavelengths are a TerraTorch encoder's): leave them at their "
            "defaults"
        )
    if cfg.pyramid_blocks is not None and len(cfg.pyramid_blocks) not in (1, 4):
        raise ValueError(f"model.pyramid_blocks takes 1 block (ViTDet) or 4 (one per level); got {cfg.pyramid_blocks}")


def _check_geo_options(cfg: MFNetConfig) -> None:
    """A TerraTorch encoder's options: single-date inputs, wavelengths of known modalities."""
    frames = cfg.encoder_kwargs.get("num_frames", 1)
    if frames != 1:
        raise ValueError(
            f"model.encoder_kwargs.num_frames={frames}: MFNet's inputs are single images (B, C, H, W), without a "
            "time axis; build the encoder with num_frames=1"
        )
    if cfg.wavelengths and cfg.execution == "per_modality":  # else SAR embedded as optical: a silent wrong result
        raise ValueError(
            "model.execution='per_modality' runs each modality through the encoder's own forward "
            "(mmpeft.reference_forward), where model.wavelengths do not act (mmpeft.set_modality_arguments acts in "
            "the stacked forward only): use model.execution=batched"
        )
    unknown = sorted(set(cfg.wavelengths) - set(cfg.modalities))
    if unknown:
        raise ValueError(f"model.wavelengths names {unknown}, not modalities of the model {cfg.modalities}")
    for m, waves in cfg.wavelengths.items():
        if not isinstance(waves, (list, tuple)) or not waves or not all(isinstance(w, (int, float)) for w in waves):
            raise ValueError(f"model.wavelengths.{m} must be a non-empty list of numbers (one per band), got {waves!r}")


def global_blocks(depth: int) -> tuple[int, ...]:
    """SAM's pattern of global-attention blocks: the last block of each quarter (2,5,8,11 for 12)."""
    if depth < 4:
        return (depth - 1,)
    k = depth // 4
    return tuple(range(k - 1, depth, k))[:4]


def check_input_size(size: Sequence[int]) -> None:
    """Raise ValueError unless both sides are positive multiples of 32."""
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        raise ValueError(
            f"MFNet needs input sides that are multiples of 32 (e.g. 256, 384, 448, 512, 320x448); got {h}x{w}"
        )


#: ``MFNetConfig.compile`` values
COMPILE_MODES = ("auto", "blocks", "model", "model-ro", "none")

_OPTICAL = {"modalities": ["optical"]}
#: Named configurations of every row of the paper's Tables IV and V, plus the authors' exact model.
MFNET_PRESETS: dict[str, dict[str, Any]] = {
    # Table IV (Vaihingen, modality x fine-tuning)
    "t4_optical_frozen": {**_OPTICAL, "method": "none"},  # NIIRG, without Adapter
    "t4_optical_lora": {**_OPTICAL, "method": "lora", "fusion": "none"},  # NIIRG, standard LoRA
    "t4_lora": {"method": "lora", "fusion": "none"},  # NIIRG + DSM, standard LoRA (no mixing)
    "t4_mmlora": {"method": "lora", "fusion": "scalar"},  # MFNet with MMLoRA
    "t4_optical_adapter": {**_OPTICAL, "method": "adapter", "fusion": "none"},
    "t4_adapter": {"method": "adapter", "fusion": "none"},
    "t4_mmadapter": {"method": "adapter", "fusion": "scalar"},
    # Table V (ablation): without DFM; the other rows are t4_adapter / t4_lora and the full model
    "t5_mmadapter_no_dfm": {"method": "adapter", "fusion": "scalar", "dfm": False},
    "t5_mmlora_no_dfm": {"method": "lora", "fusion": "scalar", "dfm": False},
    # the full models (Tables I-III, VI)
    "mfnet_mmadapter": {"method": "adapter", "fusion": "scalar"},
    "mfnet_mmlora": {"method": "lora", "fusion": "scalar"},
    # the authors' published runs exactly: default adapter init, zeroed relative tables,
    # LayerNorm/BatchNorm pyramid pair, bicubic position-embedding resize
    "authors_mmadapter": {
        "preset": "mmadapter_authors",
        "method": "adapter",
        "zero_rel_pos": True,
        "dfm_norms": "authors",
        "pos_embed_interp": "bicubic",
    },
    "authors_mmlora": {
        "preset": "mmlora_authors",
        "method": "lora",
        "zero_rel_pos": True,
        "dfm_norms": "authors",
        "pos_embed_interp": "bicubic",
    },
}


def mfnet_preset(name: str, **overrides: Any) -> MFNetConfig:
    """The :class:`MFNetConfig` of preset ``name`` (see :data:`MFNET_PRESETS`) with ``overrides``."""
    if name not in MFNET_PRESETS:
        raise ValueError(f"unknown MFNet preset {name!r}; known: {sorted(MFNET_PRESETS)}")
    return MFNetConfig(**{**MFNET_PRESETS[name], **overrides})
