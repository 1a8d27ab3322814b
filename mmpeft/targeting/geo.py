"""What geospatial foundation models tell about their input, for the wrap-time dry run.

Remote-sensing encoders (TerraTorch's backbone registry: Prithvi-EO, DOFA, Clay, ...) take inputs a
plain ViT does not, and say so in attributes rather than in a first convolution:

- **a time axis**: Prithvi-EO built with ``num_frames=T > 1`` embeds ``(B, C, T, H, W)`` with a
  ``Conv3d``; a 4-D dry-run input fails in its patch embedding. :func:`time_frames` reads ``T`` off
  the model (a module's ``num_frames``, or a patch embedding's ``input_size = (T, H, W)``, beside a
  ``Conv3d``), and :func:`input_shape` gives the dry run its ``(b, C, T, H, W)`` shape.
- **bands named, not counted by a convolution**: DOFA and Clay generate their patch embedding's
  weights from the bands' wavelengths, so no layer's ``in_channels`` tells the channels. The model
  holds the list (DOFA's ``wavelengths``, Clay's ``bands``, TerraTorch's ``model_bands``):
  :func:`band_channels` is its length, and :func:`band_names` the names where they are names.
- **one encoder per modality**: torchgeo's CROMA takes ``forward(x_sar=None, x_optical=None)``,
  each through its own encoder: no frozen network is shared, so :func:`refuse_separate_encoders`
  refuses it at wrap time with that reason and the fix (wrap one encoder).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from ..errors import MmpeftValueError

__all__ = [
    "time_frames",
    "input_shape",
    "band_channels",
    "band_names",
    "BAND_ATTRIBUTES",
    "separate_encoders",
    "refuse_separate_encoders",
]

#: the attributes a model names (or gives the wavelengths of) its bands in, looked up in this order
BAND_ATTRIBUTES = ("wavelengths", "model_bands", "bands")


def _frames_of(module: nn.Module) -> int | None:
    frames = getattr(module, "num_frames", None)
    if isinstance(frames, int) and not isinstance(frames, bool):
        return frames
    size = getattr(module, "input_size", None)  # Prithvi's PatchEmbed: (T, H, W)
    if isinstance(size, (tuple, list)) and len(size) == 3 and all(isinstance(s, int) for s in size):
        return int(size[0])
    return None


def time_frames(model: nn.Module) -> int | None:
    """T when ``model`` takes ``(B, C, T, H, W)`` inputs with T > 1 frames (a ``Conv3d`` patch
    embedding and a module declaring ``num_frames`` / a ``(T, H, W)`` ``input_size``), else None.
    A model with one frame (Prithvi adds the axis to a 4-D input itself) takes ``(B, C, H, W)``."""
    if not any(isinstance(m, nn.Conv3d) for m in model.modules()):
        return None
    frames = next((f for f in map(_frames_of, model.modules()) if f is not None), None)
    return frames if frames is not None and frames > 1 else None


def input_shape(model: nn.Module, batch: int, channels: int, size: tuple[int, int]) -> tuple[int, ...]:
    """The shape of a dry-run input of ``batch`` samples: ``(batch, C, H, W)``, or
    ``(batch, C, T, H, W)`` for a model with a time axis (:func:`time_frames`)."""
    frames = time_frames(model)
    return (batch, channels, *size) if frames is None else (batch, channels, frames, *size)


def _band_list(module: nn.Module) -> Sequence[Any] | None:
    for attr in BAND_ATTRIBUTES:
        value = getattr(module, attr, None)
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, int, float)) for v in value):
            return value
        if isinstance(value, dict):  # TerraMind: {modality: [bands]}; not one input's channels
            return None
    return None


def declared_bands(model: nn.Module) -> list[Any] | None:
    """The bands ``model`` was built for: the first module's (registration order) list among
    :data:`BAND_ATTRIBUTES` (names, or DOFA's wavelengths in micrometres); None when none."""
    bands = next((b for b in map(_band_list, model.modules()) if b is not None), None)
    return list(bands) if bands is not None else None


def band_channels(model: nn.Module) -> int | None:
    """The number of bands ``model`` declares (the first module, in registration order, holding
    one of :data:`BAND_ATTRIBUTES` as a list), or None: the channels of a model whose patch
    embedding is generated from its bands' wavelengths (DOFA, Clay)."""
    bands = declared_bands(model)
    return len(bands) if bands is not None else None


def band_names(model: nn.Module) -> list[str] | None:
    """The names of the bands ``model`` was built for (TerraTorch's ``model_bands`` / ``bands``:
    Prithvi's HLS bands, Clay's), as strings; None when it names none (wavelengths only, or nothing)."""
    for module in model.modules():
        for attr in ("model_bands", "bands"):
            value = getattr(module, attr, None)
            if isinstance(value, (list, tuple)) and value and not all(isinstance(v, (int, float)) for v in value):
                return [str(getattr(v, "value", v)) for v in value]
    return None


def separate_encoders(model: nn.Module) -> list[str]:
    """The image parameters of ``model.forward`` when it takes one image per modality, each optional
    (torchgeo's CROMA: ``forward(x_sar=None, x_optical=None)``, each through its own encoder); else []."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    images = [p.name for p in params if p.name.startswith("x_") and p.default is None]
    return images if len(images) >= 2 else []


def refuse_separate_encoders(model: nn.Module) -> None:
    """Refuse, before anything changes, a model built from separate per-modality encoders (CROMA's
    pair): mmpeft runs one frozen network on every modality stacked on the batch axis, and such a
    model has none that all modalities share. The message names its image arguments and the fix."""
    images = separate_encoders(model)
    if images:
        name = type(model).__name__
        raise MmpeftValueError(
            f"{name}.forward takes one image per modality ({', '.join(images)}), each through its own encoder: "
            "mmpeft runs one frozen network on all modalities stacked on the batch axis, and this model has none "
            f"that its modalities share. Wrap one encoder: a module whose forward(x) calls {name}({images[-1]}=x) "
            "(its modalities then share that encoder), or pass targets= to choose modules yourself"
        )
