"""What the wrap-time dry run feeds the model: its input size and its input channels.

The size, in this order: a size the model declares (the first module's ``img_size`` in
registration order, as timm's ``patch_embed.img_size``, CoaT's ``patch_embed1``, TNT's
``pixel_embed``; the model's ``img_size`` / ``image_size``; transformers' ``config.image_size``; a
token grid times its patch stride; a module's ``image_size``: torchgeo's CROMA inside a wrapper);
else the first of these candidates that a shape-only run
(:func:`mmpeft.targeting.shapes.meta_forward`) accepts: timm's ``pretrained_cfg["input_size"]``,
a fixed-size table times a usual stride (a position table ``(1, h, w, C)`` / ``(1, N, C)``, a
stage's ``feat_size`` / ``grid_size``, an attention's ``resolution``: VOLO, GCViT, torchvision
MaxViT built for 64 px), 224.

The channels: those of the first convolution or linear layer the forward calls (its pre-hook
stops the run there): a convolution's ``in_channels``; for a linear patch embedding (NaFlexViT)
the channels its patches hold. A depthwise convolution registered before the stem (DaViT's
``cpe.proj``) is not mistaken for it. Without a run, the first non-grouped convolution; without
one, the number of bands the model was built for (a patch embedding generated from wavelengths:
DOFA, Clay; :mod:`mmpeft.targeting.geo`). A model with a time axis (Prithvi-EO with ``num_frames``)
is run on ``(1, C, T, H, W)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..tuners import MultimodalLayer
from .geo import band_channels, input_shape
from .shapes import meta_forward

__all__ = ["declared_size", "size_candidates", "choose_size", "infer_in_channels", "FALLBACK_SIZE"]

FALLBACK_SIZE = 224
# the strides a fixed grid is tried at, most usual first: a position table's (a ViT's patches), a
# first stage's grid (a hierarchical model's stem), an attention's resolution (LeViT: 16)
_STRIDES = {
    "pos": (16, 14, 8, 32, 4, 2, 1),
    "feat_size": (4, 8, 2, 16, 32, 1),
    "grid_size": (4, 8, 2, 16, 32, 1),
    "resolution": (16, 8, 32, 4, 14, 2, 1),
}
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _pair(v: Any) -> tuple[int, int] | None:
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v, v
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(s, int) and s > 0 for s in v):
        return int(v[0]), int(v[1])
    return None


def _token_grid_size(model: nn.Module) -> Any:
    """(H, W) from a token grid and its patch stride: timm's Hiera (``tokens_spatial_shape`` x
    ``patch_stride``), timm's MViTv2 (``stages[0].feat_size`` x ``patch_embed.proj.stride``)."""
    grid, stride = getattr(model, "tokens_spatial_shape", None), getattr(model, "patch_stride", None)
    if grid is None:
        stages = getattr(model, "stages", None)
        first = stages[0] if isinstance(stages, (nn.Sequential, nn.ModuleList)) and len(stages) else None
        grid = getattr(first, "feat_size", None)
        stride = getattr(getattr(getattr(model, "patch_embed", None), "proj", None), "stride", None)
    if isinstance(grid, (tuple, list)) and isinstance(stride, (tuple, list)) and len(grid) == len(stride) >= 2:
        return tuple(int(g) * int(s) for g, s in zip(grid[-2:], stride[-2:]))
    return None


def declared_size(model: nn.Module) -> tuple[int, int] | None:
    """The (H, W) ``model`` says it takes (see the module's doc), or None."""
    first = next((m.img_size for m in model.modules() if _pair(getattr(m, "img_size", None))), None)
    config = getattr(model, "config", None)
    for v in (first, getattr(model, "image_size", None), getattr(config, "image_size", None), _token_grid_size(model)):
        if _pair(v) is not None:
            return _pair(v)
    # a model inside the one given (a user's wrapper around torchgeo's CROMA, built for 120 px): its image_size
    return next((_pair(m.image_size) for m in model.modules() if _pair(getattr(m, "image_size", None))), None)


def _tables(model: nn.Module) -> Iterator[tuple[str, tuple[int, int]]]:
    """(kind, grid) of fixed-size tables: position embeddings, a stage's ``feat_size``, ``resolution``."""
    for name, p in model.named_parameters():
        if "pos" not in name.rsplit(".", 1)[-1] or p.dim() < 3 or p.shape[0] != 1:
            continue
        if p.dim() == 4:  # (1, h, w, C) or (1, C, h, w)
            yield (
                "pos",
                (
                    (int(p.shape[1]), int(p.shape[2]))
                    if p.shape[3] >= p.shape[1]
                    else (int(p.shape[2]), int(p.shape[3]))
                ),
            )
        for n in (p.shape[1], p.shape[1] - 1) if p.dim() == 3 else ():  # (1, N, C), a class token or not
            if math.isqrt(n) ** 2 == n and n > 0:
                yield "pos", (math.isqrt(n), math.isqrt(n))
    for attr in ("feat_size", "grid_size", "resolution"):
        found = next((_pair(getattr(m, attr)) for m in model.modules() if _pair(getattr(m, attr, None))), None)
        if found is not None:
            yield attr, found


def size_candidates(model: nn.Module) -> list[tuple[int, int]]:
    """The sizes :func:`choose_size` tries when the model declares none, in order."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    out = [s for s in [_pair(tuple(cfg.get("input_size", ())[-2:]))] if s is not None]
    for kind, (h, w) in _tables(model):
        out += [(h * s, w * s) for s in _STRIDES[kind]]
    out.append((FALLBACK_SIZE, FALLBACK_SIZE))
    return list(dict.fromkeys(out))


def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def choose_size(model: nn.Module, in_channels: int) -> tuple[int, int]:
    """The dry run's (H, W): the declared size, else the first candidate a shape-only run of
    ``model`` accepts, else the first candidate."""
    declared = declared_size(model)
    if declared is not None:
        return declared
    candidates = size_candidates(model)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for h, w in candidates:
            try:
                # (1, C, T, H, W) for a model with a time axis (mmpeft.targeting.geo)
                meta_forward(model, [input_shape(model, 1, in_channels, (h, w))], _dtype(model))
                return h, w
            except Exception:
                continue
    finally:
        for m, training in modes:
            m.training = training
    return candidates[0]


class _Stop(Exception):
    """Raised by the pre-hook on the first layer called: the run has seen what it needs."""


def _first_layers(model: nn.Module) -> list[nn.Module]:
    """The convolutions, linears and multimodal layers (not what is inside one) of ``model``."""
    out, inside = [], set()
    for m in model.modules():
        if id(m) in inside:
            continue
        if isinstance(m, MultimodalLayer):
            inside.update(id(x) for x in m.modules())
        if isinstance(m, (*_CONVS, nn.Linear, MultimodalLayer)):
            out.append(m)
    return out


def _channels_of(module: nn.Module, shape: tuple[int, ...], guess: int, size: tuple[int, int]) -> int | None:
    """The model's input channels, given the first layer called and its input's shape."""
    base = module.base_layer if isinstance(module, MultimodalLayer) else module
    if isinstance(base, _CONVS):
        return int(base.in_channels) if len(shape) > 1 and shape[1] == guess else None
    if isinstance(base, nn.Linear) and shape and math.prod(shape) == shape[0] * guess * size[0] * size[1]:
        c, rest = divmod(base.in_features * guess, shape[-1])  # patches of p*p*guess values: p*p*c wanted
        return c if rest == 0 and c > 0 else None
    return None


def _first_call(model: nn.Module, guess: int, size: tuple[int, int], meta: bool) -> int | None:
    return _first_seen(model, guess, size, meta)[1]


def declared_channels(model: nn.Module) -> int | None:
    """The channels ``model`` says it takes: timm's ``pretrained_cfg["input_size"][0]``,
    transformers' ``config.num_channels``; None when it says nothing."""
    cfg = getattr(model, "pretrained_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if isinstance(size, (tuple, list)) and len(size) == 3 and isinstance(size[0], int):
        return size[0]
    c = getattr(getattr(model, "config", None), "num_channels", None)
    return c if isinstance(c, int) and not isinstance(c, bool) and c > 0 else None


def _first_seen(model: nn.Module, guess: int, size: tuple[int, int], meta: bool) -> tuple[bool, int | None]:
    """(whether the forward on ``guess`` channels reached a layer, the channels that layer tells)."""
    seen: list[int | None] = []

    def stop(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        seen.append(_channels_of(module, tuple(x.shape), guess, size) if x is not None else None)
        raise _Stop

    handles = [m.register_forward_pre_hook(stop) for m in _first_layers(model)]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        if meta:
            meta_forward(model, [input_shape(model, 1, guess, size)], _dtype(model))  # a time axis: 5-D
        else:
            with torch.no_grad():
                p = next(iter(model.parameters()), None)
                shape = input_shape(model, 1, guess, size)  # (1, C, T, H, W) with a time axis (geo)
                model(torch.zeros(shape, dtype=_dtype(model), device=p.device if p is not None else None))
    except _Stop:
        pass
    except Exception:
        pass
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return bool(seen), (seen[0] if seen else None)


def _static_channels(model: nn.Module) -> int | None:
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, _CONVS) and m.groups == 1]
    named = [m for n, m in convs if any(t in n for t in ("patch_embed", "stem", "embed"))]
    first = named[:1] or [m for _, m in convs[:1]]
    return int(first[0].in_channels) if first else None


def infer_in_channels(model: nn.Module, size: tuple[int, int] | None = None) -> int | None:
    """The input channels of ``model``: read off the first layer its forward calls (a forward on
    zeros stopped there, or a shape-only one where that cannot run), else its first non-grouped
    convolution's; None when neither tells (a model with neither convolution nor linear)."""
    static = _static_channels(model)
    guess = static or 3
    size = size or declared_size(model) or (FALLBACK_SIZE, FALLBACK_SIZE)
    found = _first_call(model, guess, size, meta=False)  # stopped before the first layer computes: cheap
    if found is None:
        found = _first_call(model, guess, size, meta=True)
    declared = declared_channels(model)
    if found is None and declared is not None and declared != guess:
        # the first convolution does not see the input (CSATv2's DCT stem: 3 colour channels, then 64
        # frequencies per plane): the channels the model declares, when its forward takes them
        if any(_first_seen(model, declared, size, meta)[0] for meta in (False, True)):
            return declared
    if found is None and static is None:  # a patch embedding generated from wavelengths (DOFA, Clay):
        return band_channels(model)  # as many channels as the bands the model was built for (geo)
    return found if found is not None else static
