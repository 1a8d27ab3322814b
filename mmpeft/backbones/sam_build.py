"""SAM (Segment Anything) image encoders: size table and builders for two implementations.

Two interchangeable implementations of the same network are offered:

- ``impl="timm"``: :class:`TimmSamEncoder`, a thin subclass of timm's
  ``VisionTransformerSAM`` whose ``forward`` returns the neck features and never resizes the
  position embedding on the fly (it is stored at the token grid, see
  :func:`mmpeft.backbones.load_sam_checkpoint`). Supports ``set_grad_checkpointing``.
- ``impl="segment_anything"``: segment-anything's own ``ImageEncoderViT``, extended after
  construction to rectangular token grids.

Both map ``(B, 3, H, W)`` images to ``(B, out_chans, H/16, W/16)`` neck features and share
module names (``patch_embed.proj``, ``pos_embed``, ``blocks.{i}.norm1``,
``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``, ``blocks.{i}.attn.rel_pos_h``/``_w``,
``blocks.{i}.norm2``, ``neck.{0..3}``) except the MLP: ``mlp.fc1``/``mlp.fc2`` (timm) versus
``mlp.lin1``/``mlp.lin2`` (segment-anything).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn as nn
from segment_anything.modeling import ImageEncoderViT
from timm.models import checkpoint_seq
from timm.models.vision_transformer_sam import VisionTransformerSAM

from ..errors import MmpeftTypeError, MmpeftValueError

__all__ = [
    "SAM_SPECS",
    "SamImpl",
    "SamSpec",
    "TimmSamEncoder",
    "build_sam_encoder",
    "replace_spec",
    "resolve_sam_spec",
    "sam_encoder_grid",
    "sam_encoder_impl",
]

SamImpl = Literal["timm", "segment_anything"]
_IMPLS: tuple[str, ...] = ("timm", "segment_anything")


@dataclass(frozen=True)
class SamSpec:
    """Architecture of a SAM image encoder (a plain ViT with windowed attention and a neck).

    Attributes:
        embed_dim: token width C.
        depth: number of transformer blocks.
        num_heads: attention heads per block (``embed_dim % num_heads == 0``).
        global_attn_indexes: blocks that attend over the whole token grid; the others attend
            inside ``window_size x window_size`` windows.
        window_size: window side in tokens (0 disables windowing everywhere).
        patch_size: patch side in pixels; the token grid is ``(H / patch_size, W / patch_size)``.
        mlp_ratio: MLP hidden width is ``int(embed_dim * mlp_ratio)``.
        out_chans: channels of the neck output.
    """

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    patch_size: int = 16
    mlp_ratio: float = 4.0
    out_chans: int = 256

    def __post_init__(self) -> None:
        indexes = tuple(int(i) for i in self.global_attn_indexes)
        object.__setattr__(self, "global_attn_indexes", indexes)
        for name in ("embed_dim", "depth", "num_heads", "patch_size", "out_chans"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise MmpeftValueError(f"SamSpec.{name} must be a positive int, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise MmpeftValueError(f"SamSpec.embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        if self.window_size < 0:
            raise MmpeftValueError(f"SamSpec.window_size must be >= 0, got {self.window_size}")
        if self.mlp_ratio <= 0:
            raise MmpeftValueError(f"SamSpec.mlp_ratio must be > 0, got {self.mlp_ratio}")
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.depth]
        if bad:
            raise MmpeftValueError(f"SamSpec.global_attn_indexes {bad} out of range for depth {self.depth}")

    @property
    def head_dim(self) -> int:
        """Per-head channel count ``embed_dim // num_heads``."""
        return self.embed_dim // self.num_heads


SAM_SPECS: dict[str, SamSpec] = {
    "vit_b": SamSpec(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": SamSpec(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": SamSpec(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    # Not a released SAM: a small stand-in for tests and CPU demos (no official weights).
    "vit_tiny": SamSpec(embed_dim=96, depth=4, num_heads=3, global_attn_indexes=(1, 3)),
}


def resolve_sam_spec(spec: str | SamSpec) -> SamSpec:
    """Return ``spec`` itself or the :data:`SAM_SPECS` entry named by it."""
    if isinstance(spec, SamSpec):
        return spec
    try:
        return SAM_SPECS[spec]
    except KeyError:
        raise MmpeftValueError(f"unknown SAM spec {spec!r}; known: {sorted(SAM_SPECS)}") from None


def _image_hw(img_size: int | tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Validate ``img_size`` (int or (H, W)) and return ``(H, W)`` in pixels."""
    hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(hw) != 2 or not all(isinstance(s, int) and s > 0 and s % patch_size == 0 for s in hw):
        raise MmpeftValueError(
            f"img_size {img_size!r} must be a positive multiple of the patch size {patch_size} "
            "per side (an int or an (H, W) pair)"
        )
    return hw[0], hw[1]


class TimmSamEncoder(VisionTransformerSAM):
    """timm ``VisionTransformerSAM`` returning neck features from ``forward``.

    The absolute position embedding is used as stored (``(1, h, w, C)`` at the token grid);
    unlike the parent class nothing is resampled per call. An input whose token grid differs
    raises ``ValueError``. Build it with :func:`build_sam_encoder`.
    """

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_chans, H, W) -> neck features (B, out_chans, H/16, W/16)."""
        x = self.patch_embed(x)  # (B, h, w, C)
        if self.pos_embed is not None:
            if x.shape[1:3] != self.pos_embed.shape[1:3]:
                raise MmpeftValueError(
                    f"input gives a {tuple(x.shape[1:3])} token grid but the encoder was built "
                    f"for {tuple(self.pos_embed.shape[1:3])} (img_size "
                    f"{tuple(self.patch_embed.img_size)}); rebuild it for this size"
                )
            x = x + self.pos_embed  # (B, h, w, C)
        x = self.norm_pre(self.patch_drop(self.pos_drop(x)))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)  # (B, h, w, C)
        return self.neck(x.permute(0, 3, 1, 2))  # (B, out_chans, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_chans, H, W) -> neck features (B, out_chans, H/16, W/16)."""
        return self.forward_features(x)


def _build_timm(spec: SamSpec, hw: tuple[int, int], use_rel_pos: bool) -> TimmSamEncoder:
    return TimmSamEncoder(
        img_size=hw,
        patch_size=spec.patch_size,
        in_chans=3,
        num_classes=0,
        global_pool="",
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        qkv_bias=True,
        # timm's own default is nn.LayerNorm (eps 1e-5); SAM uses 1e-6.
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        act_layer=nn.GELU,
        use_abs_pos=True,
        use_rel_pos=use_rel_pos,
        window_size=spec.window_size,
        global_attn_indexes=spec.global_attn_indexes,
        neck_chans=spec.out_chans,
    )


def _build_segment_anything(spec: SamSpec, hw: tuple[int, int], use_rel_pos: bool) -> ImageEncoderViT:
    encoder = ImageEncoderViT(
        img_size=hw[0],
        patch_size=spec.patch_size,
        in_chans=3,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        out_chans=spec.out_chans,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        act_layer=nn.GELU,
        use_abs_pos=True,
        use_rel_pos=use_rel_pos,
        window_size=spec.window_size,
        global_attn_indexes=spec.global_attn_indexes,
    )
    if hw[0] != hw[1]:
        # ImageEncoderViT is square-only: re-create the grid-sized tensors for (gh, gw).
        gh, gw = hw[0] // spec.patch_size, hw[1] // spec.patch_size
        encoder.pos_embed = nn.Parameter(torch.zeros(1, gh, gw, spec.embed_dim))
        for block in encoder.blocks:
            if block.window_size == 0 and use_rel_pos:
                block.attn.rel_pos_w = nn.Parameter(torch.zeros(2 * gw - 1, spec.head_dim))
        encoder.img_size = hw
    return encoder


def build_sam_encoder(
    spec: str | SamSpec = "vit_b",
    *,
    impl: SamImpl = "timm",
    img_size: int | tuple[int, int] = 256,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    use_rel_pos: bool = True,
) -> nn.Module:
    """Build a randomly initialised SAM image encoder for a fixed input size.

    Args:
        spec: a :data:`SAM_SPECS` name (``"vit_b"``, ``"vit_l"``, ``"vit_h"``, ``"vit_tiny"``)
            or a :class:`SamSpec`.
        impl: ``"timm"`` (:class:`TimmSamEncoder`) or ``"segment_anything"``
            (``ImageEncoderViT``).
        img_size: input size in pixels, ``S`` or ``(H, W)``; each side a positive multiple of
            ``spec.patch_size``. The position embedding ``(1, H/16, W/16, C)`` and the relative
            tables of the global blocks (``2*H/16-1`` and ``2*W/16-1`` rows) are sized for it.
        device: where to create parameters; ``"meta"`` builds without memory (for counting).
        dtype: parameter dtype (default: torch's default dtype).
        use_rel_pos: add decomposed relative position tables to the attention (SAM: True).

    Returns:
        A module mapping ``(B, 3, H, W)`` to ``(B, spec.out_chans, H/16, W/16)``.
    """
    spec = resolve_sam_spec(spec)
    if impl not in _IMPLS:
        raise MmpeftValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    hw = _image_hw(img_size, spec.patch_size)
    builder = _build_timm if impl == "timm" else _build_segment_anything
    ctx = torch.device(device) if device is not None else contextlib.nullcontext()
    with ctx:
        encoder = builder(spec, hw, use_rel_pos)
    if dtype is not None:
        encoder = encoder.to(dtype=dtype)
    return encoder


def sam_encoder_impl(encoder: nn.Module) -> SamImpl:
    """Tell which implementation ``encoder`` is: by type, else by its MLP parameter names."""
    if isinstance(encoder, VisionTransformerSAM):
        return "timm"
    if isinstance(encoder, ImageEncoderViT):
        return "segment_anything"
    names = [n for n, _ in encoder.named_parameters()]
    if any(".mlp.fc1." in n for n in names):
        return "timm"
    if any(".mlp.lin1." in n for n in names):
        return "segment_anything"
    raise MmpeftTypeError(
        f"{type(encoder).__name__} is not a SAM image encoder (neither timm VisionTransformerSAM "
        "nor segment_anything ImageEncoderViT, and no blocks.*.mlp.fc1/lin1 parameters)"
    )


def sam_encoder_grid(encoder: nn.Module) -> tuple[int, int]:
    """Token grid ``(h, w)`` an encoder was built for, read from its ``pos_embed`` (1, h, w, C)."""
    pos_embed = getattr(encoder, "pos_embed", None)
    if pos_embed is None:
        raise MmpeftValueError(f"{type(encoder).__name__} has no absolute position embedding")
    return int(pos_embed.shape[1]), int(pos_embed.shape[2])


def replace_spec(spec: str | SamSpec, **changes: object) -> SamSpec:
    """``dataclasses.replace`` on a spec or a spec name.

    Example: ``replace_spec("vit_tiny", out_chans=64)``.
    """
    return dataclasses.replace(resolve_sam_spec(spec), **changes)  # type: ignore[arg-type]
