"""Common machinery of the multimodal wrapper layers.

A multimodal layer holds the original frozen module as ``base_layer`` and sees its input with the
modality axis riding in the batch: ``x: (M*B', ...)`` modality-major, i.e. ``x.view(M, -1, ...)``
gives one chunk per modality. ``B'`` may be the batch or, deep inside SAM, the batch times the
number of attention windows: window partition keeps the order batch-major, so the chunks stay aligned.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal, Sequence

import torch
from einops import rearrange
from torch import nn

from ..fusion import Fusion, apply_mixing
from ..verify import check_modalities

__all__ = [
    "by_modality", "MultimodalLayer", "Execution", "set_execution", "only_modality", "multimodal_layers", "present_modalities",
]

Execution = Literal["batched", "loop"]


class MultimodalLayer(nn.Module):
    """Base class of ``MultimodalLoRA`` and ``MultimodalAdapter``.

    Attributes:
        base_layer: the wrapped frozen module (its parameters are never trained).
        modalities: modality names, in the order of the stacked batch.
        execution: ``"batched"`` (default: one frozen pass over the stacked batch, per-modality
            products as one batched matmul) or ``"loop"`` (the same maths, the base layer and every
            per-modality module run on one modality at a time: a reference path and the authors'
            execution scheme).
    """

    #: prefix carried by every trainable tensor of the subclass (``lora_``, ``adapter_``).
    prefix: str = ""

    def __init__(self, base_layer: nn.Module, modalities: Sequence[str]) -> None:
        super().__init__()
        if isinstance(base_layer, MultimodalLayer):
            raise ValueError("the module is already a multimodal layer; wrapping it twice is not supported")
        self.base_layer = base_layer
        self.modalities: tuple[str, ...] = tuple(check_modalities(modalities))  # distinct names, not a str
        self.execution: Execution = "batched"
        self.enabled = True
        self._single: int | None = None  # index of the only modality present (see only_modality)
        self._present: tuple[int, ...] | None = None  # indices of the modalities in the batch (None: all)
        self._presence: torch.Tensor | None = None  # (S, B) per-sample presence (None: every sample)

    @property
    def num_modalities(self) -> int:
        return len(self.modalities)

    def _active(self) -> tuple[str, ...]:
        """The modalities stacked in the current batch, in order (all of them by default)."""
        if self._present is None:
            return self.modalities
        return tuple(self.modalities[i] for i in self._present)

    def _mixing(self) -> torch.Tensor | None:
        """None when every modality and sample is present (the rule's own path), else the
        weights of :meth:`Fusion.present_weights`: (S, S), or (B, S, S) with a presence mask."""
        if self._present is None and self._presence is None:
            return None
        return self._fusion().present_weights(self._present, self._presence)

    def _mix(self, d: torch.Tensor) -> torch.Tensor:
        """d: (S, B', ...) stacked per-modality updates of the present modalities -> mixed."""
        w = self._mixing()
        return self._fusion()(d) if w is None else apply_mixing(w, d)

    def _fused_weights(self) -> tuple[bool, torch.Tensor | None]:
        """Whether the fused nodes of :mod:`mmpeft.lowrank` apply, and their (M, M) mixing weights
        (None: the identity). They do for a linear rule mixing the whole batch alike; a
        non-linear rule or per-sample presence takes the general path."""
        fusion = self._fusion()
        w = self._mixing()
        if not fusion.linear or (w is not None and w.dim() != 2):
            return False, None
        if w is None and fusion.mixes:
            w = fusion.mixing_matrix()
        return True, w  # None: the identity rule over the whole batch

    def _fusion(self) -> Fusion:
        raise NotImplementedError

    def _check_stack(self, x: torch.Tensor) -> int:
        """Return B' = x.shape[0] // M, raising a clear error when the batch is not stacked."""
        mods = self._active()
        m = len(mods)
        if x.shape[0] % m != 0:
            raise ValueError(
                f"{type(self).__name__} expects the {m} modalities {mods} stacked on dim 0 "
                f"(M*B, ...), got shape {tuple(x.shape)}; call the model returned by wrap_multimodal"
            )
        return x.shape[0] // m

    def _check_single(self) -> int:
        idx = self._single
        assert idx is not None
        if self._fusion().mixes:
            raise RuntimeError(
                f"{type(self).__name__} mixes modalities ({type(self._fusion()).__name__}); "
                "it cannot run on one modality alone"
            )
        return idx

    def extra_repr(self) -> str:
        return f"modalities={self.modalities}, execution={self.execution!r}"


def multimodal_layers(model: nn.Module) -> Iterator[tuple[str, MultimodalLayer]]:
    """All (qualified name, layer) pairs of multimodal layers inside ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, MultimodalLayer):
            yield name, module


def set_execution(model: nn.Module, execution: Execution) -> None:
    """Switch every multimodal layer of ``model`` to ``"batched"`` or ``"loop"`` execution."""
    if execution not in ("batched", "loop"):
        raise ValueError(f"execution must be 'batched' or 'loop', got {execution!r}")
    for _, layer in multimodal_layers(model):
        layer.execution = execution


@contextlib.contextmanager
def only_modality(model: nn.Module, modality: str) -> Iterator[None]:
    """Within the block, layers see a batch of the single ``modality`` (not the stacked batch).

    Only layers whose fusion rule does not mix may run this way; a mixing layer raises.
    """
    layers = [layer for _, layer in multimodal_layers(model)]
    for layer in layers:
        if modality not in layer.modalities:
            raise KeyError(f"unknown modality {modality!r}; known: {layer.modalities}")
        layer._single = layer.modalities.index(modality)
    try:
        yield
    finally:
        for layer in layers:
            layer._single = None


@contextlib.contextmanager
def present_modalities(
    model: nn.Module, present: Sequence[int] | None, presence: torch.Tensor | None = None
) -> Iterator[None]:
    """Within the block, layers see a batch of the modalities ``present`` (indices into their
    modalities, stacked in that order; None: all) with the optional per-sample ``presence``
    (S, B) bool mask. Fusion rules mix as :meth:`mmpeft.fusion.Fusion.present_weights` defines."""
    layers = [layer for _, layer in multimodal_layers(model)]
    for layer in layers:
        layer._present = None if present is None else tuple(present)
        layer._presence = presence
    try:
        yield
    finally:
        for layer in layers:
            layer._present, layer._presence = None, None


def by_modality(x: torch.Tensor, m: int) -> torch.Tensor:
    """The stacked (M*B', ..., C) tensor as (M, T, C): one row block per modality, every token of
    it (T = B' times the inner sizes) in a row. A view when ``x`` is contiguous."""
    return rearrange(x, "(m n) ... c -> m (n ...) c", m=m)
