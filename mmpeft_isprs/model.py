"""MFNet: a frozen SAM encoder wrapped by mmpeft, the Deep Fusion Module and the UNetFormer decoder."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mmpeft import count_parameters, wrap_multimodal
from mmpeft.backbones import SAM_SPECS, build_sam_encoder, load_sam_checkpoint, replace_spec
from mmpeft.checkpointing import enable_gradient_checkpointing
from mmpeft.io import atomic_write
from mmpeft.reference import per_modality_forward
from mmpeft.wrap import is_trainable_name, state_mismatches

from .decoder import UNetFormerDecoder
from .dfm import DeepFusionModule, SimplePyramid

__all__ = [
    "MFNetConfig", "MFNet", "MFNET_PRESETS", "mfnet_preset", "build_mfnet", "save_mfnet", "load_mfnet",
    "check_input_size",
]

METHOD_PRESETS = {  # (method, fusion) -> mmpeft preset
    ("adapter", "scalar"): "mmadapter", ("adapter", "none"): "adapter",
    ("lora", "scalar"): "mmlora", ("lora", "none"): "lora",
}  # fmt: skip


@dataclass
class MFNetConfig:
    """Every choice that defines an MFNet (JSON round-trip; no argv, no globals).

    Attributes:
        backbone: SAM size: "vit_b", "vit_l", "vit_h" or "vit_tiny" (tests, CPU demo).
        impl: "timm" (timm's VisionTransformerSAM) or "segment_anything" (the original ImageEncoderViT).
        method: "adapter", "lora" or "none" (frozen encoder: Table IV's "without Adapter").
        fusion: cross-modal rule inside the encoder: "scalar" (MFNet), "none" (standard
            per-modality tuning), "matrix".
        preset: an mmpeft preset overriding (method, fusion), e.g. "mmadapter_authors".
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
            attention (``mmpeft.attention``; same outputs). False: the encoder's own blocks.
        execution: "batched" (one frozen pass over the stacked modalities) or "per_modality"
            (every modality through every layer one after the other: the authors' scheme, for
            benchmarks and checks; same maths).
        decode_channels, decoder_dropout, window_size, decoder_heads: the UNetFormer decoder.
        embed_dim, depth, num_heads: override the backbone size (tests).
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
    efficient_attention: bool = True
    execution: str = "batched"
    decode_channels: int = 64
    decoder_dropout: float = 0.1
    window_size: int = 8
    decoder_heads: int = 8
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None

    def __post_init__(self) -> None:
        if self.backbone not in SAM_SPECS:
            raise ValueError(f"unknown backbone {self.backbone!r}; known: {sorted(SAM_SPECS)}")
        if self.method not in ("adapter", "lora", "none"):
            raise ValueError(f"method must be 'adapter', 'lora' or 'none', got {self.method!r}")
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be unique and non-empty, got {self.modalities}")
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
    def mmpeft_preset(self) -> str:
        if self.preset is not None:
            return self.preset
        if self.method == "none":
            return "frozen"
        return METHOD_PRESETS.get((self.method, self.fusion), "mmlora" if self.method == "lora" else "mmadapter")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MFNetConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MFNet config keys {unknown}; known: {sorted(known)}")
        return cls(**dict(d))


def _global_blocks(depth: int) -> tuple[int, ...]:
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


class MFNet(nn.Module):
    """Multimodal fine-tuning network: wrapped SAM encoder -> DFM -> UNetFormer decoder.

    ``forward({"optical": (B,3,H,W), "dsm": (B,1,H,W)}) -> logits (B, num_classes, H, W)``.
    """

    def __init__(self, config: MFNetConfig) -> None:
        super().__init__()
        self.config = config
        self.modalities = tuple(config.modalities)
        spec = SAM_SPECS[config.backbone]
        overrides = {k: getattr(config, k) for k in ("embed_dim", "depth", "num_heads") if getattr(config, k)}
        if overrides:
            depth = overrides.get("depth", spec.depth)
            spec = replace_spec(spec, global_attn_indexes=_global_blocks(depth), **overrides)
        encoder = build_sam_encoder(spec, impl=config.impl, img_size=config.size)  # type: ignore[arg-type]
        self.load_report = None
        if config.checkpoint:
            self.load_report = load_sam_checkpoint(
                encoder, config.checkpoint, zero_rel_pos=config.zero_rel_pos,
                pos_embed_interp=config.pos_embed_interp,  # type: ignore[arg-type]
            )  # fmt: skip
        elif config.zero_rel_pos:
            with torch.no_grad():
                for n, p in encoder.named_parameters():
                    if n.endswith(("rel_pos_h", "rel_pos_w")):
                        p.zero_()
        options = {k: getattr(config, k) for k in ("rank", "alpha", "ratio", "lambda_init")}
        self.encoder = wrap_multimodal(
            encoder, self.modalities, preset=config.mmpeft_preset, stems=dict(config.stems),
            efficient_attention=config.efficient_attention, **{k: v for k, v in options.items() if v is not None},
        )  # fmt: skip
        if config.grad_checkpointing:
            enable_gradient_checkpointing(self.encoder.base_model)
        c = spec.out_chans
        if config.dfm:
            self.dfm: nn.Module = DeepFusionModule(c, len(self.modalities), norms=config.dfm_norms)  # type: ignore[arg-type]
        else:  # Table V "without DFM": sum the encoder outputs, one simple pyramid
            self.dfm = SimplePyramid(c, norm="layernorm")
        self.decoder = UNetFormerDecoder(
            (c, c, c, c), config.decode_channels, config.decoder_dropout, config.window_size,
            config.decoder_heads, config.num_classes,
        )  # fmt: skip

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """inputs: {modality: (B, c_m, H, W)} with (H, W) = config size -> logits (B, K, H, W)."""
        first = inputs[self.modalities[0]] if self.modalities[0] in inputs else None
        if first is not None and tuple(first.shape[-2:]) != self.config.size:
            check_input_size(first.shape[-2:])
            raise ValueError(
                f"this MFNet was built for {self.config.size[0]}x{self.config.size[1]} inputs "
                f"(position embeddings are resized once, at build time); got {tuple(first.shape[-2:])}. "
                "Build it with img_size set to your crop size."
            )
        enc_inputs = {m: inputs[m] for m in self.modalities} if isinstance(inputs, Mapping) else inputs
        if self.config.execution == "per_modality":
            feats = per_modality_forward(self.encoder, enc_inputs)
        else:
            feats = self.encoder(enc_inputs)
        maps = [feats[m] for m in self.modalities]  # each (B, 256, H/16, W/16)
        levels = self.dfm(maps) if self.config.dfm else self.dfm(torch.stack(maps).sum(0))
        return self.decoder(levels, self.config.size)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What trains and nothing else: encoder LoRA/adapters/lambdas/stems + DFM + decoder (with BN buffers)."""
        out = {f"encoder.{k}": v for k, v in self.encoder.trainable_state_dict().items()}
        for prefix, module in (("dfm", self.dfm), ("decoder", self.decoder)):
            out.update({f"{prefix}.{k}": v.detach() for k, v in module.state_dict().items()})
        return out

    def load_trainable_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Strict inverse of :meth:`trainable_state_dict`; errors name the keys at fault."""
        problems = state_mismatches(self.trainable_state_dict(), state)
        if problems:
            raise ValueError("checkpoint does not match this MFNet: " + " | ".join(problems))
        enc = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
        self.encoder.load_trainable_state_dict(enc)
        self.dfm.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("dfm.")})
        self.decoder.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("decoder.")})

    def parameter_groups(self) -> dict[str, dict[str, int]]:
        """Trainable / frozen parameters of encoder (by kind), DFM and decoder."""
        def group(name: str) -> str:
            if name.startswith("encoder."):
                return "encoder (trainable)" if is_trainable_name(name) else "encoder (frozen)"
            return name.split(".")[0]

        return count_parameters(self, by=group).to_dict()


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
    "authors_mmadapter": {"preset": "mmadapter_authors", "method": "adapter", "zero_rel_pos": True,
                          "dfm_norms": "authors", "pos_embed_interp": "bicubic"},
    "authors_mmlora": {"preset": "mmlora_authors", "method": "lora", "zero_rel_pos": True,
                       "dfm_norms": "authors", "pos_embed_interp": "bicubic"},
}  # fmt: skip


def mfnet_preset(name: str, **overrides: Any) -> MFNetConfig:
    """The :class:`MFNetConfig` of preset ``name`` (see :data:`MFNET_PRESETS`) with ``overrides``."""
    if name not in MFNET_PRESETS:
        raise ValueError(f"unknown MFNet preset {name!r}; known: {sorted(MFNET_PRESETS)}")
    return MFNetConfig(**{**MFNET_PRESETS[name], **overrides})


def build_mfnet(config: MFNetConfig | Mapping[str, Any] | None = None, **overrides: Any) -> MFNet:
    """Build an MFNet from a config (or a dict, or keyword overrides of the defaults)."""
    if config is None:
        config = MFNetConfig(**overrides)
    elif isinstance(config, Mapping):
        config = MFNetConfig.from_dict({**config, **overrides})
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    return MFNet(config)


def save_mfnet(model: MFNet, path: str | os.PathLike, extra: Mapping[str, str] | None = None) -> None:
    """Write the trainable part of ``model`` and its config to one safetensors file (atomically)."""
    tensors = {k: v.contiguous().cpu() for k, v in model.trainable_state_dict().items()}
    meta = {"format": "mfnet", "config": json.dumps(model.config.to_dict()), **(extra or {})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: save_file(tensors, p, metadata=meta))


def load_mfnet(path: str | os.PathLike, checkpoint: str | None = None, **overrides: Any) -> MFNet:
    """Rebuild the MFNet saved at ``path`` and load its trained tensors.

    Args:
        checkpoint: the SAM file the model was trained from (default: the path in its config).
        overrides: config fields to change (e.g. ``grad_checkpointing``); shapes must still match.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"MFNet checkpoint {path} not found")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "mfnet":
            raise ValueError(f"{path} is not an MFNet checkpoint written by save_mfnet")
        state = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["config"])
    if checkpoint is not None:
        cfg["checkpoint"] = checkpoint
    model = build_mfnet(cfg, **overrides)
    model.load_trainable_state_dict(state)
    return model
