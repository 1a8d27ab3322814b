"""MFNet: a frozen encoder (SAM's ViT, SAM2's Hiera, a timm ViT or a TerraTorch encoder) wrapped by mmpeft,
the Deep Fusion Module and the UNetFormer decoder."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from mmpeft import (
    MultimodalModel,
    Presence,
    count_parameters,
    is_trainable_name,
    per_modality_forward,
    reference_forward,
    state_mismatches,
    wrap_multimodal,
)
from mmpeft.backbones import (
    SAM_SPECS,
    SamCheckpointError,
    SamLoadReport,
    build_sam_encoder,
    load_sam_checkpoint,
    replace_spec,
    resolve_weights,
    zero_rel_pos,
)

from .config import MFNetConfig, check_input_size, global_blocks
from .decoder import UNetFormerDecoder
from .dfm import DeepFusionModule, SimplePyramid
from .encoder_weights import EncoderCheckpointError, EncoderLoadReport, describe_checkpoint, read_state_dict
from .encoders import HieraFeatures, build_feature_encoder
from .geo_encoders import set_wavelengths
from .pyramid import BlockPyramid, MultiScaleProjection

#: the DFM's channels for the SAM2 / ViT encoders (SAM's neck width)
DFM_CHANNELS = 256

__all__ = ["MFNet", "build_mfnet", "build_encoder"]


def _base_encoder(config: MFNetConfig) -> tuple[nn.Module, SamLoadReport | EncoderLoadReport | None, int]:
    """The unwrapped encoder of ``config`` with its weights: (module, load report, DFM channels)."""
    kind = config.backbone_kind
    # a local path, or an official file's name ("sam_vit_b"): fetched, cached and checked (mmpeft.backbones.weights)
    checkpoint = resolve_weights(config.checkpoint) if config.checkpoint else None
    if kind.kind == "geo":  # TerraTorch's: model.depth keeps the first blocks of the built model
        geo = (config.geo_kwargs, config.pyramid_blocks, checkpoint, config.depth)
        encoder, loaded = build_feature_encoder(config.backbone, kind, config.size, *geo)
        return encoder, loaded, DFM_CHANNELS
    if kind.kind != "sam":
        encoder, loaded = build_feature_encoder(
            config.backbone, kind, config.size, config.timm_kwargs, config.pyramid_blocks, checkpoint
        )
        return encoder, loaded, DFM_CHANNELS
    spec = SAM_SPECS[config.backbone]
    sizes = {k: getattr(config, k) for k in ("embed_dim", "depth", "num_heads") if getattr(config, k)}
    if sizes:
        spec = replace_spec(spec, global_attn_indexes=global_blocks(sizes.get("depth", spec.depth)), **sizes)
    sam = build_sam_encoder(spec, impl=config.impl, img_size=config.size)  # type: ignore[arg-type]
    report = None
    if checkpoint:
        try:
            report = load_sam_checkpoint(
                sam,
                checkpoint,
                zero_rel_pos=config.zero_rel_pos,
                pos_embed_interp=config.pos_embed_interp,  # type: ignore[arg-type]
            )
        except SamCheckpointError as exc:
            raise _not_sam(exc, checkpoint, config.backbone) from None
    elif config.zero_rel_pos:
        zero_rel_pos(sam)
    return sam, report, spec.out_chans


def _not_sam(exc: SamCheckpointError, path: str, backbone: str) -> Exception:
    """A file that is not a SAM (v1) checkpoint named by what it is (a SAM2, DINOv2 or timm ViT file), as
    the other encoders' loaders say; other load errors as they are."""
    if "is not a SAM checkpoint" not in str(exc):
        return exc
    try:
        kind = describe_checkpoint(read_state_dict(path))
    except (EncoderCheckpointError, OSError):
        return exc
    return EncoderCheckpointError(
        f"model.checkpoint {path} is {kind}; model.backbone {backbone} is a SAM (v1) ViT: give a SAM file "
        "(sam_vit_b_01ec64.pth, ...) or the backbone the file is for (e.g. model.backbone=sam2_hiera_tiny for a SAM2 file)"
    )


def build_encoder(config: MFNetConfig) -> tuple[MultimodalModel, SamLoadReport | EncoderLoadReport | None, int]:
    """The encoder of ``config`` wrapped by mmpeft; with its load report and the DFM's channels.

    The fusion rule ``config.fusion`` goes to ``wrap_multimodal`` as is (the mixing parts of the
    placement preset use it; "none" means the preset without mixing). The placements of SAM2's
    Hiera and the timm ViTs are mmpeft's presets for their detected family.
    """
    encoder, report, channels = _base_encoder(config)
    options = {k: getattr(config, k) for k in ("rank", "alpha", "ratio", "lambda_init", "fusion")}
    if config.mmpeft_preset == "frozen":  # no layer: the options would change nothing (an error in mmpeft)
        options = {}
    extra: dict[str, Any] = {} if config.backbone_kind.kind == "sam" else {"probe": (64, 64)}  # a cheap dry run
    wrapped = wrap_multimodal(
        encoder,
        config.modalities,
        preset=config.mmpeft_preset,
        stems=dict(config.stems),
        efficient_attention=config.efficient_attention,
        base_dtype=config.base_dtype,
        **extra,
        **{k: v for k, v in options.items() if v is not None},
    )
    if config.wavelengths:  # TerraTorch's wavelength-generated embeddings: each modality embedded from its own
        set_wavelengths(wrapped, config.wavelengths, config.backbone)
    if config.grad_checkpointing:
        wrapped.set_grad_checkpointing(True)
    return wrapped, report, channels


def pyramid_factory(config: MFNetConfig, base: nn.Module, channels: int) -> Callable[[str], nn.Module] | None:
    """The DFM's per-modality pyramid of the encoder ``base`` (None: SAM's one-map :class:`SimplePyramid`)."""
    if config.backbone_kind.kind == "sam":
        return None
    ins = tuple(base.out_channels)  # type: ignore[arg-type]
    if isinstance(base, HieraFeatures) or getattr(base, "layout", None) == "stages":  # Hiera, a TerraTorch Swin
        return lambda norm: MultiScaleProjection(ins, channels)
    return lambda norm: BlockPyramid(ins[0], len(ins), channels, norm)  # type: ignore[arg-type]


def _cast(x: Any, dtype: torch.dtype) -> Any:
    """A map, or a list of maps, in ``dtype``."""
    return x.to(dtype) if isinstance(x, torch.Tensor) else [t.to(dtype) for t in x]


def _masked_sum(maps: list[Any], mask: torch.Tensor | None) -> Any:
    """Sum over modalities of their maps (or, level by level, of their lists of maps); absent samples count 0."""

    def one(i: int, m: torch.Tensor) -> torch.Tensor:
        return m if mask is None else m * mask[i].view(-1, 1, 1, 1)

    if isinstance(maps[0], torch.Tensor):
        return sum(one(i, m) for i, m in enumerate(maps))
    return [sum(one(i, m[j]) for i, m in enumerate(maps)) for j in range(len(maps[0]))]


class MFNet(nn.Module):
    """Multimodal fine-tuning network: wrapped encoder (SAM, SAM2, timm ViT) -> DFM -> UNetFormer decoder.

    ``forward({"optical": (B,3,H,W), "dsm": (B,1,H,W)}) -> logits (B, num_classes, H, W)``.
    """

    def __init__(self, config: MFNetConfig) -> None:
        super().__init__()
        self.config = config
        self.modalities = tuple(config.modalities)
        self.encoder, self.load_report, c = build_encoder(config)
        make = pyramid_factory(config, self.encoder.base_model, c)
        if config.dfm:
            self.dfm: nn.Module = DeepFusionModule(c, len(self.modalities), norms=config.dfm_norms, pyramid=make)  # type: ignore[arg-type]
        else:  # Table V "without DFM": sum the encoder outputs, one simple pyramid
            self.dfm = SimplePyramid(c, norm="layernorm") if make is None else make("layernorm")
        self.decoder = UNetFormerDecoder(
            (c, c, c, c),
            config.decode_channels,
            config.decoder_dropout,
            config.window_size,
            config.decoder_heads,
            config.num_classes,
        )

    def forward(self, inputs: Mapping[str, torch.Tensor], presence: Presence | None = None) -> torch.Tensor:
        """inputs: {modality: (B, c_m, H, W)} with (H, W) = config size -> logits (B, K, H, W).

        Any non-empty subset of the modalities may be given: only those run, and the DFM fuses the
        present branches. ``presence``: optional per-sample mask {modality: (B,) bool} (modality
        dropout; docs/missing_modalities.md).
        """
        inputs = inputs if isinstance(inputs, Mapping) else dict(zip(self.modalities, inputs))
        enc_inputs = {m: inputs[m] for m in self.modalities if inputs.get(m) is not None}
        first = next(iter(enc_inputs.values()), None)
        if first is not None and tuple(first.shape[-2:]) != self.config.size:
            check_input_size(first.shape[-2:])
            raise ValueError(
                f"this MFNet was built for {self.config.size[0]}x{self.config.size[1]} inputs "
                f"(position embeddings are resized once, at build time); got {tuple(first.shape[-2:])}. "
                "Build it with img_size set to your crop size."
            )
        names = list(enc_inputs)
        # the one place the (S, B) presence mask is computed (presence + the encoder's NaN / inf check);
        # the encoder and the DFM both use it, and the encoder does not check the inputs again
        mask = self.encoder.presence_mask(enc_inputs, presence) if enc_inputs else None
        if self.config.execution == "per_modality" and (mask is not None or len(names) < len(self.modalities)):
            raise ValueError("execution 'per_modality' needs every modality; use 'batched' for missing modalities")
        if self.config.execution == "per_modality":
            feats = self._per_modality(enc_inputs)
        else:
            feats = self.encoder(enc_inputs, presence=mask, finite_checked=True)
        # each (B, 256, H/16, W/16) (SAM) or a list of maps (SAM2, ViT), in the trainable DFM's dtype
        # (float32 when the frozen base runs in bf16)
        dtype = next(self.dfm.parameters()).dtype
        maps = [_cast(feats[m], dtype) for m in names]
        if self.config.dfm:
            levels = self.dfm(maps, [self.modalities.index(m) for m in names], mask)
        else:
            levels = self.dfm(_masked_sum(maps, mask))
        return self.decoder(levels, self.config.size)

    def _per_modality(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The reference per-modality execution, without checking the inputs for NaN / inf again
        (:meth:`forward` did, through ``presence_mask``); SAM2 / ViT encoders through mmpeft's
        ``reference_forward`` (each modality through the encoder's own forward)."""
        if self.config.backbone_kind.kind != "sam":
            return reference_forward(self.encoder, inputs)
        return per_modality_forward(self.encoder, inputs, finite_checked=True)

    def compile_mode(self, device: torch.device) -> str:
        """``config.compile`` resolved for a run on ``device`` ("auto": "blocks" on CUDA, else "none")."""
        how = self.config.compile
        return ("blocks" if device.type == "cuda" else "none") if how == "auto" else how

    def compile_for(self, device: torch.device) -> list[str]:
        """Compile the encoder blocks in place when ``compile_mode(device)`` is "blocks"; returns
        their names. The whole-model modes are applied by the caller to what it runs
        (``torch.compile(net)``, see :meth:`compiled`)."""
        return self.encoder.compile_blocks() if self.compile_mode(device) == "blocks" else []

    def compiled(self, net: nn.Module, device: torch.device) -> nn.Module:
        """``net`` (this model, or its DDP wrapper) compiled whole when ``compile_mode(device)`` is
        "model" or "model-ro"; else ``net`` itself."""
        mode = self.compile_mode(device)
        if mode not in ("model", "model-ro"):
            return net
        return torch.compile(net, mode="reduce-overhead" if mode == "model-ro" else None)  # type: ignore[return-value]

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


def build_mfnet(config: MFNetConfig | Mapping[str, Any] | None = None, **overrides: Any) -> MFNet:
    """Build an MFNet from a config (or a dict, or keyword overrides of the defaults)."""
    if config is None:
        config = MFNetConfig(**overrides)
    elif isinstance(config, Mapping):
        config = MFNetConfig.from_dict({**config, **overrides})
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    return MFNet(config)
