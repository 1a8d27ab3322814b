"""Load official SAM checkpoints into the encoders of :mod:`mmpeft.backbones.sam_build`.

Official files (``sam_vit_b_01ec64.pth``, ``sam_vit_l_0b3195.pth``, ``sam_vit_h_4b8939.pth``)
are flat dicts with ``image_encoder.*``, ``prompt_encoder.*`` and ``mask_decoder.*`` keys. The
image-encoder keys are mapped explicitly onto the target implementation (the only renaming is
``mlp.lin1/lin2`` <-> ``mlp.fc1/fc2`` for timm), grid-dependent tensors are resized once here,
and every key is accounted for in a :class:`SamLoadReport`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import MmpeftFileNotFoundError, MmpeftValueError
from ..utils import listing
from .sam_build import SamImpl, sam_encoder_impl

__all__ = [
    "SamCheckpointError",
    "SamLoadReport",
    "load_sam_checkpoint",
    "read_sam_state_dict",
    "resize_pos_embed",
    "resize_rel_pos",
]

logger = logging.getLogger(__name__)

_ENCODER_PREFIX = "image_encoder."
_DROPPED_PREFIXES = ("prompt_encoder.", "mask_decoder.")
_ANCHOR_KEY = "patch_embed.proj.weight"
_MLP_RE = re.compile(r"\.mlp\.(?:lin|fc)([12])\.")
_REL_POS_RE = re.compile(r"^blocks\.(\d+)\.attn\.rel_pos_[hw]$")

CheckpointSource = Union[str, "os.PathLike[str]", Mapping[str, torch.Tensor]]
Shape = tuple[int, ...]


class SamCheckpointError(MmpeftValueError):
    """A checkpoint that is not a SAM image encoder, or does not fit the given encoder."""


@dataclass
class SamLoadReport:
    """What :func:`load_sam_checkpoint` did, key by key.

    Attributes:
        impl: implementation loaded into (``"timm"`` or ``"segment_anything"``).
        source: the file path, or ``"<mapping>"`` for an in-memory state dict.
        loaded: encoder keys (encoder naming) that received checkpoint values.
        missing: encoder keys the checkpoint did not provide (left as they were).
        unexpected: checkpoint keys (checkpoint naming, ``image_encoder.`` prefix kept) that
            fit no encoder key.
        dropped: ``prompt_encoder.*`` / ``mask_decoder.*`` keys, ignored on purpose.
        resized: encoder key -> (checkpoint shape, encoder shape) for tensors resized to the
            encoder's token grid (``pos_embed``, global blocks' ``rel_pos_h``/``rel_pos_w``).
        zeroed: relative-position tables set to zero (``zero_rel_pos=True``).
    """

    impl: SamImpl
    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    resized: dict[str, tuple[Shape, Shape]] = field(default_factory=dict)
    zeroed: list[str] = field(default_factory=list)


def read_sam_state_dict(checkpoint: CheckpointSource) -> tuple[dict[str, torch.Tensor], str]:
    """Read a checkpoint into a flat ``{key: tensor}`` dict on the CPU.

    Accepts a path to a ``.pth``/``.pt`` file (``torch.load(weights_only=True)``), a path to
    a ``.safetensors`` file, or a mapping. A ``{"model": ...}`` / ``{"state_dict": ...}``
    wrapper is unwrapped. Returns the dict and a source description for messages.
    """
    if isinstance(checkpoint, Mapping):
        raw: object = checkpoint
        source = "<mapping>"
    else:
        source = os.fspath(checkpoint)
        if not os.path.isfile(source):
            raise MmpeftFileNotFoundError(f"SAM checkpoint not found: {source}")
        try:
            if source.endswith(".safetensors"):
                from safetensors.torch import load_file

                raw = load_file(source, device="cpu")
            else:
                raw = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as err:  # unreadable / not a torch or safetensors file
            raise SamCheckpointError(f"could not read {source} as a checkpoint: {err}") from err
    for wrapper in ("model", "state_dict"):
        if isinstance(raw, Mapping) and isinstance(raw.get(wrapper), Mapping):
            raw = raw[wrapper]
    if not isinstance(raw, Mapping):
        raise SamCheckpointError(f"{source} holds a {type(raw).__name__}, not a state dict")
    not_tensors = [str(k) for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise SamCheckpointError(f"{source} is not a SAM checkpoint: non-tensor entries {listing(not_tensors)}")
    return {str(k): v for k, v in raw.items()}, source


def _split_encoder_keys(
    state: dict[str, torch.Tensor], source: str
) -> tuple[dict[str, tuple[str, torch.Tensor]], list[str], list[str]]:
    """Split a flat dict into encoder entries, dropped keys and foreign keys.

    Returns ``({official encoder key: (checkpoint key, tensor)}, dropped, foreign)``; official
    naming = no ``image_encoder.`` prefix, ``mlp.lin1/lin2``.
    """
    prefixed = any(k.startswith(_ENCODER_PREFIX) for k in state)
    encoder: dict[str, tuple[str, torch.Tensor]] = {}
    dropped: list[str] = []
    foreign: list[str] = []
    for key, value in state.items():
        if key.startswith(_DROPPED_PREFIXES):
            dropped.append(key)
        elif prefixed and not key.startswith(_ENCODER_PREFIX):
            foreign.append(key)
        else:
            name = key[len(_ENCODER_PREFIX) :] if prefixed else key
            encoder[_MLP_RE.sub(r".mlp.lin\1.", name)] = (key, value)
    if _ANCHOR_KEY not in encoder:
        keys = list(state)
        raise SamCheckpointError(
            f"{source} is not a SAM checkpoint: no '{_ENCODER_PREFIX}{_ANCHOR_KEY}' or "
            f"'{_ANCHOR_KEY}' among its {len(keys)} keys (found: {listing(keys)})"
        )
    return encoder, dropped, foreign


def _to_impl_key(official_key: str, impl: SamImpl) -> str:
    """Official (segment-anything) encoder key -> key of the given implementation."""
    if impl == "timm":
        return _MLP_RE.sub(r".mlp.fc\1.", official_key)
    return official_key


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], *, antialias: bool = False) -> torch.Tensor:
    """Bicubic resize of an absolute position embedding, computed in float32.

    pos_embed: (1, h0, w0, C) -> (1, grid[0], grid[1], C). ``antialias=False`` is plain
    ``F.interpolate(mode="bicubic", align_corners=False)`` (what the MFNet authors run on
    every forward); ``antialias=True`` matches timm's ``resample_abs_pos_embed_nhwc``.
    """
    x = pos_embed.float().permute(0, 3, 1, 2)  # (1, C, h0, w0)
    x = F.interpolate(x, size=grid, mode="bicubic", align_corners=False, antialias=antialias)
    return x.permute(0, 2, 3, 1).contiguous()  # (1, gh, gw, C)


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Linear resize of a relative position table, exactly as segment-anything's ``get_rel_pos``.

    rel_pos: (L, head_dim) -> (length, head_dim), float32.
    """
    x = rel_pos.float().reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1)  # (1, head_dim, L)
    x = F.interpolate(x, size=length, mode="linear")  # (1, head_dim, length)
    return x.reshape(-1, length).permute(1, 0).contiguous()  # (length, head_dim)


def _is_global_block(encoder: nn.Module, index: int) -> bool:
    try:
        block = encoder.get_submodule(f"blocks.{index}")
    except AttributeError:
        return False
    return getattr(block, "window_size", 0) == 0


def _fit_tensor(
    encoder: nn.Module, key: str, value: torch.Tensor, target: Shape, antialias: bool
) -> torch.Tensor | None:
    """Return ``value`` resized to ``target`` if the key is grid-dependent, else None."""
    if key == "pos_embed" and value.dim() == 4 and len(target) == 4:
        if value.shape[0] == target[0] and value.shape[3] == target[3]:
            return resize_pos_embed(value, (target[1], target[2]), antialias=antialias)
    match = _REL_POS_RE.match(key)
    if match and value.dim() == 2 and len(target) == 2 and value.shape[1] == target[1]:
        if _is_global_block(encoder, int(match.group(1))):
            return resize_rel_pos(value, target[0])
    return None


def _describe_size(shapes: Mapping[str, Shape]) -> str:
    """'embed_dim 768, depth 12' from a name -> shape mapping (official or impl naming)."""
    embed = shapes.get(_ANCHOR_KEY, (None,))[0]
    blocks = {int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")}
    return f"embed_dim {embed}, depth {max(blocks) + 1 if blocks else 0}"


def _check_shapes(
    mismatched: list[tuple[str, Shape, Shape]], ckpt: Mapping[str, Shape], model: Mapping[str, Shape], source: str
) -> None:
    if not mismatched:
        return
    lines = listing((f"  {k}: checkpoint {c} vs model {m}" for k, c, m in mismatched), sep="\n")
    raise SamCheckpointError(
        f"{source} does not fit the encoder (wrong model size or window/global layout?): "
        f"checkpoint has "
        f"{_describe_size(ckpt)}, encoder has {_describe_size(model)}; "
        f"{len(mismatched)} tensors differ in shape:\n" + lines
    )


def _check_keys(report: SamLoadReport, strict: bool) -> None:
    problems = []
    if report.missing:
        problems.append(f"missing from the checkpoint: {listing(report.missing)}")
    if report.unexpected:
        problems.append(f"unexpected in the checkpoint: {listing(report.unexpected)}")
    if not problems:
        return
    message = f"loading {report.source} into the {report.impl} encoder: " + "; ".join(problems)
    if strict:
        raise SamCheckpointError(message + " (pass strict=False to load anyway)")
    logger.warning(message)


def load_sam_checkpoint(
    encoder: nn.Module,
    checkpoint: CheckpointSource,
    *,
    strict: bool = True,
    zero_rel_pos: bool = False,
    pos_embed_interp: Literal["bicubic", "antialias"] = "bicubic",
) -> SamLoadReport:
    """Load SAM image-encoder weights into ``encoder`` in place.

    Args:
        encoder: a timm or segment-anything SAM encoder (see ``build_sam_encoder``), on a real
            device (not ``meta``).
        checkpoint: an official SAM file (``image_encoder.*`` + ``prompt_encoder.*`` +
            ``mask_decoder.*``), a bare encoder state dict (either implementation's naming),
            a ``.safetensors`` file, or such a mapping.
        strict: raise :class:`SamCheckpointError` on missing or unexpected encoder keys;
            with False they are logged as a warning and returned in the report. Shape
            mismatches always raise.
        zero_rel_pos: zero every ``rel_pos_h``/``rel_pos_w`` after loading (reproduces the
            published MFNet runs, whose loader silently skipped these tables).
        pos_embed_interp: ``"bicubic"`` (plain, as the MFNet authors) or ``"antialias"``
            (bicubic with antialiasing, as timm) for resizing the position embedding
            ``(1, 64, 64, C)`` -> ``(1, H/16, W/16, C)``.

    Returns:
        A :class:`SamLoadReport`. Global blocks' relative tables are linearly resized to
        ``2*H/16-1`` / ``2*W/16-1`` rows, so forward never resizes anything.
    """
    _check_load_arguments(encoder, pos_embed_interp)
    impl = sam_encoder_impl(encoder)
    state, source = read_sam_state_dict(checkpoint)
    official, dropped, foreign = _split_encoder_keys(state, source)
    report = SamLoadReport(impl=impl, source=source, dropped=dropped, unexpected=list(foreign))

    model_state = encoder.state_dict()
    to_load = _fit_to_encoder(encoder, official, report, pos_embed_interp == "antialias")
    report.missing = [k for k in model_state if k not in to_load]
    _check_keys(report, strict)

    with torch.no_grad():
        for key, value in to_load.items():
            model_state[key].copy_(value)
    report.loaded = [k for k in model_state if k in to_load]
    if zero_rel_pos:
        report.zeroed = _zero_tables(encoder)  # (the argument zero_rel_pos shadows the function)
    if report.resized:
        resized = ", ".join(f"{k} {a}->{b}" for k, (a, b) in report.resized.items())
        logger.info("resized %s", resized)
    return report


def _check_load_arguments(encoder: nn.Module, pos_embed_interp: str) -> None:
    if pos_embed_interp not in ("bicubic", "antialias"):
        raise MmpeftValueError(f"pos_embed_interp must be 'bicubic' or 'antialias', got {pos_embed_interp!r}")
    if any(t.is_meta for t in encoder.state_dict().values()):
        raise MmpeftValueError(
            "encoder is on the meta device; materialise it first, e.g. encoder.to_empty(device='cpu')"
        )


def _fit_to_encoder(
    encoder: nn.Module,
    official: dict[str, tuple[str, torch.Tensor]],
    report: SamLoadReport,
    antialias: bool,
) -> dict[str, torch.Tensor]:
    """{encoder key: tensor to copy}: the checkpoint's encoder tensors renamed to ``report.impl``'s
    keys and resized where the encoder's grid differs (recorded in ``report.resized``); keys the
    encoder lacks go to ``report.unexpected``; shapes that cannot be fitted raise."""
    model_shapes = {k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    to_load: dict[str, torch.Tensor] = {}
    mismatched: list[tuple[str, Shape, Shape]] = []
    for name, (ckpt_key, value) in official.items():
        key = _to_impl_key(name, report.impl)
        if key not in model_shapes:
            report.unexpected.append(ckpt_key)
            continue
        target = model_shapes[key]
        if tuple(value.shape) != target:
            resized = _fit_tensor(encoder, key, value, target, antialias)
            if resized is None:
                mismatched.append((key, tuple(value.shape), target))
                continue
            report.resized[key] = (tuple(value.shape), target)
            value = resized
        to_load[key] = value
    ckpt_shapes = {name: tuple(v.shape) for name, (_, v) in official.items()}
    _check_shapes(mismatched, ckpt_shapes, model_shapes, report.source)
    return to_load


def zero_rel_pos(encoder: nn.Module) -> list[str]:
    """Zero every relative-position table (``rel_pos_h`` / ``rel_pos_w``) of ``encoder`` in place,
    as the MFNet authors' published runs did; returns the names of the zeroed tensors."""
    return _zero_tables(encoder)


def _zero_tables(encoder: nn.Module) -> list[str]:
    zeroed = []
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if name.endswith(("rel_pos_h", "rel_pos_w")):
                param.zero_()
                zeroed.append(name)
    return zeroed
