"""Local weights of MFNet's timm encoders: reading a file, naming what it holds, the load report,
and timm ViT / DINOv2 checkpoints (SAM2's official layout: :mod:`.sam2_weights`).

Nothing is downloaded. A ViT file in timm's layout or in DINOv2's official one
(``dinov2_vits14_pretrain.pth``: ``mask_token``, ``register_tokens``) goes through timm's own
``checkpoint_filter_fn`` of the model's module (the position embedding resampled to the model's
grid, DINOv2's names converted), then loads key by key: every missing or unexpected key is named.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "EncoderCheckpointError",
    "EncoderLoadReport",
    "read_state_dict",
    "describe_checkpoint",
    "load_checked",
    "load_vit_checkpoint",
]

_LISTED = 8
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_HEAD = ("head.", "fc_norm.", "head_drop.")


class EncoderCheckpointError(ValueError):
    """A checkpoint that cannot be read, is of another encoder, or does not fit the model."""


@dataclass
class EncoderLoadReport:
    """What a load did, key by key (model naming unless said).

    Attributes:
        source: the file path.
        backbone: the ``model.backbone`` loaded into.
        loaded: model keys that received checkpoint values.
        missing: model keys the checkpoint did not provide.
        unexpected: checkpoint keys (after the key map) that fit no model key.
        dropped: checkpoint keys ignored on purpose (checkpoint naming): SAM2's neck, memory and
            mask decoder; a ViT's classifier head. (A ViT's blocks after the last one MFNet takes
            are loaded, then removed with the blocks.)
    """

    source: str
    backbone: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def listing(items: list[str], limit: int = _LISTED) -> str:
    """'a, b, c' or 'a, ..., h (and 5 more)'."""
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A flat ``{key: tensor}`` from a ``.pt`` / ``.pth`` (``weights_only``) or ``.safetensors`` file;
    a ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper (SAM2's files) is unwrapped."""
    source = os.fspath(path)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"model.checkpoint {source} not found")
    try:
        if source.endswith(".safetensors"):
            from safetensors.torch import load_file

            raw: object = load_file(source, device="cpu")
        else:
            raw = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch / safetensors file
        raise EncoderCheckpointError(f"could not read model.checkpoint {source}: {err}") from err
    for wrapper in ("model", "state_dict"):
        if isinstance(raw, Mapping) and isinstance(raw.get(wrapper), Mapping):
            raw = raw[wrapper]
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise EncoderCheckpointError(f"model.checkpoint {source} does not hold a state dict of tensors")
    return {str(k): v for k, v in raw.items()}


def _blocks(keys: list[str], prefix: str = "") -> int:
    found = {int(m.group(1)) for k in keys if k.startswith(prefix) for m in [_BLOCK.search(k[len(prefix) :])] if m}
    return max(found) + 1 if found else 0


def describe_checkpoint(state: Mapping[str, torch.Tensor]) -> str:
    """What ``state`` looks like: 'a SAM2 checkpoint (image_encoder.trunk.*: width 96, 12 blocks)', ..."""
    keys = list(state)
    if any(k.startswith("image_encoder.trunk.") for k in keys):
        w = state.get("image_encoder.trunk.patch_embed.proj.weight")
        width = None if w is None else w.shape[0]
        return (
            f"a SAM2 checkpoint (image_encoder.trunk.*: width {width}, {_blocks(keys, 'image_encoder.trunk.')} blocks)"
        )
    if any(k.startswith("image_encoder.") for k in keys):
        w = state.get("image_encoder.patch_embed.proj.weight")
        width = None if w is None else w.shape[0]
        return f"a SAM (v1) ViT checkpoint (image_encoder.*: width {width}, {_blocks(keys, 'image_encoder.')} blocks)"
    w = state.get("patch_embed.proj.weight")
    if w is not None and "cls_token" in state:
        kind = "an official DINOv2 checkpoint" if "mask_token" in state else "a timm ViT checkpoint"
        return f"{kind} (width {w.shape[0]}, {_blocks(keys)} blocks, patch {tuple(w.shape[-2:])})"
    return f"a checkpoint of unknown layout ({len(keys)} keys: {listing(keys, 5)})"


def load_checked(
    module: nn.Module, mapped: Mapping[str, torch.Tensor], report: EncoderLoadReport, strict: bool, what: str
) -> EncoderLoadReport:
    """Load ``mapped`` (model naming) into ``module`` key by key; shapes must agree. Fills and returns
    ``report``; with ``strict`` any missing or unexpected key is an error naming them."""
    own = module.state_dict()
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in mapped.items()
        if k in own and v.shape != own[k].shape
    ]
    if wrong:
        raise EncoderCheckpointError(
            f"{report.source} does not fit {report.backbone} ({what}); {len(wrong)} tensors differ in shape: "
            + listing(wrong)
        )
    report.missing = sorted(set(own) - set(mapped))
    report.unexpected = sorted(set(mapped) - set(own))
    problems = [
        f"{name}: {listing(keys)}"
        for name, keys in (("missing from the checkpoint", report.missing), ("unexpected in it", report.unexpected))
        if keys
    ]
    if problems and strict:
        raise EncoderCheckpointError(f"loading {report.source} into {report.backbone} ({what}): " + "; ".join(problems))
    module.load_state_dict({k: v for k, v in mapped.items() if k in own}, strict=False)
    report.loaded = sorted(set(mapped) & set(own))
    return report


def load_vit_checkpoint(
    trunk: nn.Module, path: str | os.PathLike, backbone: str, strict: bool = True
) -> EncoderLoadReport:
    """Load a timm ViT / official DINOv2 file into ``trunk`` (built for MFNet's grid, not pruned yet).

    timm's ``checkpoint_filter_fn`` of the model's module maps the keys and resamples the position
    embedding (and a patch embedding of another size); the classifier head is dropped (MFNet has
    none). A SAM / SAM2 file, or a ViT of another width or depth, is an error naming what it is.
    """
    state = read_state_dict(path)
    report = EncoderLoadReport(os.fspath(path), backbone)
    kind = describe_checkpoint(state)
    depth, width = len(trunk.blocks), int(trunk.embed_dim)  # type: ignore[arg-type]
    w = state.get("patch_embed.proj.weight")
    if w is None or _blocks(list(state)) != depth or w.shape[0] != width:
        raise EncoderCheckpointError(
            f"model.checkpoint {report.source} is {kind}; model.backbone {backbone} is a ViT of width {width} "
            f"with {depth} blocks: give that encoder's checkpoint (or the backbone the file is for)"
        )
    module = importlib.import_module(type(trunk).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    mapped = dict(filter_fn(dict(state), trunk)) if filter_fn is not None else dict(state)
    report.dropped = sorted(k for k in mapped if k.startswith(_HEAD))
    mapped = {k: v for k, v in mapped.items() if not k.startswith(_HEAD)}
    return load_checked(trunk, mapped, report, strict, f"{type(trunk).__name__}, timm's key map")
