"""MFNet's geospatial encoders: TerraTorch's backbone registry (Prithvi-EO, Clay, DOFA, Prithvi Swin, ...).

``model.backbone`` takes a registry name (``terratorch_prithvi_eo_v2_tiny_tl``, ``timm_clay_v1_base``:
the ``terratorch_`` / ``timm_`` prefix names the registry's source) or a timm name TerraTorch
registers (``clay_v1_base``, ``prithvi_swin_B``, ``prithvi_swin_L``). TerraTorch is the optional
extra ``geo-fm``; without it such a name is refused at config time, naming the extra.

:class:`GeoFeatures` holds the registry's model as ``trunk``; its ``forward`` returns a list of NCHW
maps, read off what the model's own forward returns (TerraTorch encoders have no
``forward_intermediates``; they return one output per block, or per stage):

- **per block** (a ViT: Prithvi-EO, Clay, DOFA): ``(B, N, D)`` tokens per block; the chosen blocks'
  tokens, prefix (class) tokens dropped, become ``(B, D, H/16, W/16)`` maps, fed to the DFM as a timm
  ViT's are (:class:`~.pyramid.BlockPyramid`). A model whose patch is not 16 (Clay's 8) is built for
  ``(H/16 * patch, W/16 * patch)`` and its input resized to it, as the timm ViT kind does. ``depth``
  keeps the first blocks only (the others are removed: tests), and blocks after the last one taken
  are removed too;
- **per stage** (a Swin: four outputs of growing widths, ``out_channels``): four maps at strides 4,
  8, 16, 32 (NHWC outputs turned NCHW), each projected as SAM2's Hiera's
  (:class:`~.pyramid.MultiScaleProjection`).

What is read from the model: its ``out_channels`` (TerraTorch's convention), its image size
(``img_size``: built for the crop, or the patch grid), its patch, its repeated blocks. Its bands and
time axis are read by ``mmpeft.wrap_multimodal`` (the channels of a wavelength-generated embedding,
a ``BandMeaningWarning`` when a stem tiles a modality into bands of another meaning).
``model.wavelengths`` gives a modality its own wavelengths where the model generates its patch
embedding from them (DOFA, Clay): :func:`set_wavelengths`, through ``mmpeft.set_modality_arguments``.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GEO_EXTRA",
    "TERRATORCH_TIMM_NAMES",
    "is_geo_name",
    "registry_name",
    "import_terratorch",
    "check_geo_name",
    "GeoFeatures",
    "build_geo_encoder",
    "wavelength_embedding",
    "set_wavelengths",
]

#: how the optional extra is installed
GEO_EXTRA = "pip install 'mmpeft[geo-fm]'"
#: the timm names TerraTorch 1.2 registers (timm knows them once terratorch is imported)
TERRATORCH_TIMM_NAMES = ("clay_v1_base", "prithvi_swin_B", "prithvi_swin_L")
#: the registry's source prefixes
PREFIXES = ("terratorch_", "timm_")
#: the stride of the token grid every per-block encoder is brought to (SAM's: input / 16)
GRID_STRIDE = 16


def _registered_by_terratorch(name: str) -> bool:
    """A timm name registered by TerraTorch (known only once terratorch is imported)."""
    if "terratorch" not in sys.modules:
        return False
    import timm.models._registry as reg

    entry = reg._model_entrypoints.get(name)
    return entry is not None and getattr(entry, "__module__", "").startswith("terratorch")


def is_geo_name(name: str) -> bool:
    """Whether ``model.backbone`` ``name`` is for TerraTorch's registry (decided without importing it)."""
    return isinstance(name, str) and (
        name.startswith(PREFIXES) or name in TERRATORCH_TIMM_NAMES or _registered_by_terratorch(name)
    )


def registry_name(name: str) -> str:
    """The registry's name of ``name``: a timm name TerraTorch registers gets the ``timm_`` prefix."""
    return name if name.startswith(PREFIXES) else f"timm_{name}"


def import_terratorch() -> Any:
    """``terratorch``, imported with float32 matmul precision left as it was (its import sets
    "medium"); a ValueError naming the extra when it is not installed, before any work."""
    if "terratorch" not in sys.modules and importlib.util.find_spec("terratorch") is None:
        raise ValueError(
            "model.backbone: TerraTorch's encoders need the optional extra geo-fm, which is not installed: "
            f"{GEO_EXTRA} (or, in a source checkout: pip install -e '.[geo-fm]')"
        )
    precision = torch.get_float32_matmul_precision()
    import terratorch

    torch.set_float32_matmul_precision(precision)
    return terratorch


def _choices() -> list[str]:
    from terratorch.registry import BACKBONE_REGISTRY

    own = sorted(f"terratorch_{n}" for n in BACKBONE_REGISTRY._sources["terratorch"])
    return own + [f"timm_{n}" for n in TERRATORCH_TIMM_NAMES]


def check_geo_name(name: str) -> str:
    """The registry name of ``name`` after checking the registry holds it; a ValueError listing
    TerraTorch's own names (and the extra to install when terratorch is missing)."""
    import_terratorch()
    from terratorch.registry import BACKBONE_REGISTRY

    full = registry_name(name)
    if full not in BACKBONE_REGISTRY:
        raise ValueError(
            f"unknown backbone {name!r} (model.backbone): TerraTorch's registry has no {full!r}; its encoders: "
            f"{_choices()} (or timm_<any timm name>)"
        )
    return full


def _int_pair(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) >= 2 and all(isinstance(v, int) for v in value):
        return (int(value[-2]), int(value[-1]))  # Prithvi's (T, H, W) patch: the spatial part
    return None


def _first_pair(model: nn.Module, attr: str) -> tuple[int, int] | None:
    """The first module's (registration order) ``attr`` as an (h, w) pair."""
    return next((p for p in (_int_pair(getattr(m, attr, None)) for m in model.modules()) if p), None)


def _block_list(model: nn.Module) -> nn.Module:
    """The longest list (ModuleList / Sequential) of modules of one class: the model's blocks."""
    lists = [
        m
        for m in model.modules()
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) and len({type(k) for k in m}) == 1
    ]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of repeated blocks: MFNet cannot take its block outputs")
    return max(lists, key=len)


def _keep_blocks(model: nn.Module, blocks: nn.Module, k: int) -> None:
    """Keep the first ``k`` blocks, and have the model return one output per kept block (its
    ``out_indices``, where it holds them: Clay's, DOFA's)."""
    del blocks[k:]  # type: ignore[operator]
    owner = getattr(model.forward, "__self__", model)  # TerraTorch's timm wrapper calls the timm model's forward
    for holder in {id(model): model, id(owner): owner}.values():
        indices = getattr(holder, "out_indices", None)
        if isinstance(indices, list):  # in place: Prithvi's forward holds this list in a closure
            indices[:] = range(k)
        elif indices is not None:
            holder.out_indices = tuple(range(k))


def _layout(out_channels: Sequence[int], name: str) -> str:
    """ "blocks" (one output per block, one width) or "stages" (four outputs of growing widths)."""
    chans = [int(c) for c in out_channels]
    if chans and len(set(chans)) == 1:
        return "blocks"
    if len(chans) == 4 and chans == sorted(chans):
        return "stages"
    raise ValueError(
        f"model.backbone {name}: its outputs (out_channels {chans}) are neither one per block of one width (a ViT) "
        "nor four stages (a Swin); MFNet takes those two kinds"
    )


class GeoFeatures(nn.Module):
    """A TerraTorch encoder returning NCHW maps: the chosen blocks' token maps, or its four stages.

    Args:
        trunk: the registry's model (its forward returns a list: one output per block or per stage).
        layout: "blocks" or "stages" (:func:`build_geo_encoder` reads it off ``out_channels``).
        out_channels: the width of each map returned.
        input_size: the (H, W) the trunk runs at (inputs of another size are resized to it).
        patch: the trunk's patch (h, w) ("blocks": the token grid is ``input_size / patch``).
        blocks: the block outputs taken ("blocks"), in increasing order.
    """

    def __init__(
        self,
        trunk: nn.Module,
        layout: str,
        out_channels: Sequence[int],
        input_size: tuple[int, int],
        patch: tuple[int, int] | None = None,
        blocks: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.layout = layout
        self.out_channels: tuple[int, ...] = tuple(int(c) for c in out_channels)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.patch = patch
        self.blocks_taken: list[int] = [int(b) for b in blocks]
        self.argument_tensors: list[torch.Tensor] = []  # per-modality wavelengths: follow the input's device

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: (B, C, H, W) -> "blocks": [(B, D, H/16, W/16)] per block taken; "stages":
        [(B, C_i, H/s, W/s)], s = 4, 8, 16, 32."""
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False, antialias=True)
        for t in self.argument_tensors:
            if t.device != x.device:
                t.data = t.data.to(x.device)
        outs = list(self.trunk(x))
        if self.layout == "stages":
            return self._stages(outs)
        return self._blocks(outs)

    def _blocks(self, outs: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(outs) <= self.blocks_taken[-1]:
            raise ValueError(
                f"{type(self.trunk).__name__} returned {len(outs)} outputs; blocks {self.blocks_taken} were asked for"
            )
        assert self.patch is not None
        h, w = self.input_size[0] // self.patch[0], self.input_size[1] // self.patch[1]
        maps = []
        for i in self.blocks_taken:
            t = outs[i]
            if t.dim() == 3:  # (B, prefix + h*w, D): drop the class / prompt tokens in front
                if t.shape[1] < h * w:
                    raise ValueError(f"block {i} returned {t.shape[1]} tokens for a {h}x{w} grid")
                t = t[:, t.shape[1] - h * w :].transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)
            maps.append(t)  # (B, D, h, w)
        return maps

    def _stages(self, outs: list[torch.Tensor]) -> list[torch.Tensor]:
        maps = []
        for t, c in zip(outs, self.out_channels):
            if t.dim() == 4 and t.shape[1] != c and t.shape[-1] == c:
                t = t.permute(0, 3, 1, 2)  # NHWC (Swin) -> NCHW
            maps.append(t)
        h, w = self.input_size
        want = [(h // s, w // s) for s in (4, 8, 16, 32)]
        got = [tuple(m.shape[-2:]) for m in maps]
        if len(maps) != 4 or got != want:
            raise ValueError(
                f"{type(self.trunk).__name__} returned maps of grids {got} for a {h}x{w} input; "
                f"MFNet takes four stages at strides 4, 8, 16, 32 ({want})"
            )
        return maps


def _build(full: str, kwargs: dict[str, Any], checkpoint: str | None) -> nn.Module:
    from terratorch.registry import BACKBONE_REGISTRY

    weights: dict[str, Any] = {"pretrained": False}
    if checkpoint:  # the registry's own loader (its key conversion): TerraTorch's ckpt_path, timm's file overlay;
        extra = (
            {"ckpt_path": checkpoint}
            if full.startswith("terratorch_")
            else {"pretrained_cfg_overlay": {"file": checkpoint}}
        )
        weights = {"pretrained": True, **extra}
    heard = _Heard()
    logger = logging.getLogger("terratorch")
    logger.addHandler(heard)
    try:
        model = BACKBONE_REGISTRY.build(full, **weights, **kwargs)
    finally:
        logger.removeHandler(heard)
    if checkpoint and heard.problems:  # TerraTorch's loaders load non-strictly and only log what did not fit
        raise ValueError(
            f"model.checkpoint {checkpoint} does not fit model.backbone {full}: " + " | ".join(heard.problems)[:2000]
        )
    return model


class _Heard(logging.Handler):
    """The keys a TerraTorch loader logs as missing or unexpected (it loads with ``strict=False``)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.problems: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "issing keys" in message or "nexpected keys" in message:
            self.problems.append(message)


def _trunk(full: str, size: tuple[int, int], kwargs: dict[str, Any], checkpoint: str | None) -> nn.Module:
    """The registry's model built for ``size`` (its ``img_size``), rebuilt for the stride-16 grid
    when its patch is not 16 (``img_size`` given in ``kwargs``: as given)."""
    if "img_size" in kwargs:
        return _build(full, kwargs, checkpoint)
    try:
        trunk = _build(full, {**kwargs, "img_size": size if size[0] != size[1] else size[0]}, checkpoint)
    except TypeError as err:  # a builder without img_size (Prithvi Swin: any size that its windows divide)
        if "img_size" not in str(err):
            raise
        return _build(full, kwargs, checkpoint)
    patch = _first_pair(trunk, "patch_size")
    per_block = len(set(getattr(trunk, "out_channels", None) or [0, 1])) == 1
    if patch is not None and patch != (GRID_STRIDE, GRID_STRIDE) and per_block:
        grid = (size[0] // GRID_STRIDE * patch[0], size[1] // GRID_STRIDE * patch[1])
        trunk = _build(full, {**kwargs, "img_size": grid if grid[0] != grid[1] else grid[0]}, checkpoint)
    return trunk


def _taken(depth: int, pyramid_blocks: Sequence[int] | None) -> list[int]:
    from .encoders import default_pyramid_blocks

    blocks = list(pyramid_blocks) if pyramid_blocks else default_pyramid_blocks(depth)
    inside = all(-depth <= int(b) < depth for b in blocks)
    taken = [int(b) % depth for b in blocks] if inside else []
    if not taken or taken != sorted(set(taken)):
        raise ValueError(f"model.pyramid_blocks {blocks} must be increasing block indices of 0..{depth - 1}")
    return taken


def build_geo_encoder(
    name: str,
    size: tuple[int, int],
    kwargs: Mapping[str, Any] | None = None,
    depth: int | None = None,
    pyramid_blocks: Sequence[int] | None = None,
    checkpoint: str | None = None,
) -> GeoFeatures:
    """The unwrapped :class:`GeoFeatures` of registry name ``name`` for inputs of ``size``: random
    weights (``pretrained=False``) unless ``checkpoint`` (a local file, loaded by the registry's own
    builder); ``kwargs`` go to the builder (``bands``, ``embed_dim``, ``num_heads``, ...); ``depth``
    keeps the first blocks; ``pyramid_blocks`` the blocks taken (per-block encoders)."""
    full = check_geo_name(name)
    trunk = _trunk(full, size, dict(kwargs or {}), checkpoint)
    out_channels = getattr(trunk, "out_channels", None)
    if not out_channels:
        raise ValueError(f"model.backbone {name}: {type(trunk).__name__} declares no out_channels (TerraTorch's)")
    layout = _layout(out_channels, name)
    width = (kwargs or {}).get("embed_dim")
    if width is not None and layout == "blocks" and int(out_channels[0]) != int(width):
        raise ValueError(
            f"model.embed_dim={width}: the builder of {name} ignores embed_dim (its width is {out_channels[0]}); "
            "leave it unset (model.embed_dim=null)"
        )
    declared = _first_pair(trunk, "img_size") or size
    if layout == "stages":
        if depth or pyramid_blocks:
            raise ValueError(
                f"model.depth / model.pyramid_blocks apply to per-block encoders; {name} returns four stages "
                "(set its depths in model.encoder_kwargs)"
            )
        if declared != size:
            raise ValueError(f"model.backbone {name} was built for {declared}, not the {size} inputs (img_size)")
        return GeoFeatures(trunk, layout, out_channels, declared)
    blocks = _block_list(trunk)
    if depth:
        if not 1 <= depth <= len(blocks):
            raise ValueError(f"model.depth {depth}: {name} has {len(blocks)} blocks")
        _keep_blocks(trunk, blocks, depth)
    taken = _taken(len(blocks), pyramid_blocks)
    _keep_blocks(trunk, blocks, taken[-1] + 1)  # the blocks after the last one taken do no work
    patch = _first_pair(trunk, "patch_size") or (GRID_STRIDE, GRID_STRIDE)
    grid = (declared[0] // patch[0], declared[1] // patch[1])
    if grid != (size[0] // GRID_STRIDE, size[1] // GRID_STRIDE):
        raise ValueError(
            f"model.backbone {name} runs at {declared} with patch {patch}: a {grid} token grid, not the stride-16 "
            f"grid of {size} inputs; build it for {(size[0] // GRID_STRIDE * patch[0], size[1] // GRID_STRIDE * patch[1])}"
        )
    return GeoFeatures(trunk, layout, [int(out_channels[0])] * len(taken), declared, patch, taken)  # one width


#: the names a patch embedding generated from wavelengths takes them by (DOFA's, Clay's)
WAVELENGTH_ARGUMENTS = ("wavelengths", "waves")


def wavelength_embedding(model: nn.Module) -> tuple[str, str] | None:
    """(qualified name, argument) of the patch embedding of ``model`` generated from wavelengths:
    the one module whose name says ``embed`` and whose forward takes ``wavelengths`` / ``waves``
    (DOFA's ``patch_embed``, Clay's ``patch_embedding``); None when there is not exactly one."""
    found = []
    for qual, module in model.named_modules():
        if "embed" not in qual.rsplit(".", 1)[-1]:
            continue
        try:
            params = inspect.signature(module.forward).parameters
        except (TypeError, ValueError):
            continue
        arg = next((a for a in WAVELENGTH_ARGUMENTS if a in params), None)
        if arg is not None:
            found.append((qual, arg))
    return found[0] if len(found) == 1 else None


def set_wavelengths(wrapped: Any, wavelengths: Mapping[str, Sequence[float]], name: str) -> None:
    """Give each modality of ``wavelengths`` its own wavelengths (the model's units: micrometres for
    DOFA and Clay) in the patch embedding the model generates from them, through
    ``mmpeft.set_modality_arguments``; a ValueError when the model has no such embedding."""
    from mmpeft import set_modality_arguments

    base = wrapped.base_model
    found = wavelength_embedding(base)
    if found is None:
        raise ValueError(
            f"model.wavelengths applies to encoders whose patch embedding is generated from wavelengths (DOFA, Clay); "
            f"{name} has none: remove it (a modality of other bands takes a learnable stem, model.stems.<m>=[conv1x1, c])"
        )
    module, arg = found
    tensors = {m: torch.tensor([float(w) for w in waves]) for m, waves in wavelengths.items()}
    set_modality_arguments(wrapped, module, {m: {arg: t} for m, t in tensors.items()})
    base.argument_tensors.extend(tensors.values())
