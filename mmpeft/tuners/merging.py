"""Merging for the layers whose update has a weight form (the LoRA layers): per-modality copies
of the frozen weight (and bias) that follow every change torch tracks, and are otherwise a
snapshot that ``merge_adapters()`` refreshes (an edit through ``param.data``), see :class:`WeightMerging`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import MmpeftStateError
from .base import MergeError, _exporting

__all__ = ["WeightMerging"]


class WeightMerging:
    """Merging for layers whose update has a weight form (mixed into the LoRA layers).

    ``merge`` keeps one copy ``W + get_delta_weight(m)`` per modality in the non-persistent buffer
    ``merged_weight`` ((M, *W.shape) in W's dtype: M times the layer's weight memory), and one bias
    per modality in ``merged_bias`` when the update has one (``lora_bias``), and never writes the
    frozen ``W`` or ``b``, so ``unmerge`` restores them exactly. A merged layer refuses to train
    (its LoRA weights would get no gradient)."""

    merged_weight: torch.Tensor | None
    merged_bias: torch.Tensor | None
    modalities: tuple[str, ...]
    base_layer: nn.Module
    training: bool

    def _init_merging(self) -> None:
        """Declare the merged state (called by the layer's ``__init__``): ``merged_weight``, the
        stamp of the tensors it was computed from, and the re-merge after ``load_state_dict``."""
        #: (M, *W.shape) per-modality merged weights while merged (:meth:`merge`), else None
        self.register_buffer("merged_weight", None, persistent=False)  # type: ignore[attr-defined]
        #: (M, out) per-modality merged biases while merged, for layers whose update has a bias
        self.register_buffer("merged_bias", None, persistent=False)  # type: ignore[attr-defined]
        self._merge_stamp: tuple[tuple[int, int], ...] | None = None
        self._merge_sources: list[torch.Tensor] = []  # what the merge read (:meth:`_stamp`)
        self.register_load_state_dict_post_hook(_merge_again)  # type: ignore[attr-defined]

    @property
    def merged(self) -> bool:
        return self.merged_weight is not None

    @torch.no_grad()
    def merge(self) -> None:
        """Fold each modality's update into its own copy of the frozen weight."""
        reason = self.cannot_merge()  # type: ignore[attr-defined]  # the layer's (MultimodalLayer contract)
        if reason is not None:
            raise MergeError(f"cannot merge: {reason}")
        w = self.base_layer.weight
        deltas = torch.stack([self.get_delta_weight(m) for m in self.modalities])  # type: ignore[attr-defined]
        self.merged_weight = (w.float() + deltas.to(w.device)).to(w.dtype)
        self.merged_bias = self._merged_biases()
        self._merge_sources = self._sources()
        self._merge_stamp = self._stamp()

    def _merged_biases(self) -> torch.Tensor | None:
        """(M, out): the frozen bias (0 where there is none) plus each modality's
        :meth:`get_delta_bias`, in W's dtype; None when the update has no bias."""
        biases = [self.get_delta_bias(m) for m in self.modalities]
        if biases[0] is None:
            return None
        w, b = self.base_layer.weight, getattr(self.base_layer, "bias", None)
        frozen = 0.0 if b is None else b.float()
        return torch.stack([frozen + d.to(w.device) for d in biases]).to(w.dtype)  # type: ignore[union-attr]

    def get_delta_bias(self, modality: str) -> torch.Tensor | None:
        """The bias update of ``modality`` ((out,) float32), None when the update has none."""
        return None

    def unmerge(self) -> None:
        self.merged_weight = None
        self.merged_bias = None
        self._merge_stamp = None
        self._merge_sources = []

    def _sources(self) -> list[torch.Tensor]:
        """Every tensor the merged weights are computed from (the layer's but its merged copies)."""
        merged = (self.merged_weight, self.merged_bias)
        buffers = [b for b in self.buffers() if all(b is not t for t in merged)]  # type: ignore[attr-defined]
        return [*self.parameters(), *buffers]  # type: ignore[attr-defined]

    def _stamp(self) -> tuple[tuple[int, int], ...]:
        """(version counter, storage address) of the tensors the merge read: an in-place edit (an
        EMA step, ``load_state_dict``) or a dtype / device move changes it. Host-side counters,
        no device sync (run every merged forward). A parameter replaced by another object through
        ``load_state_dict(assign=True)`` is seen by the load hook, which merges again."""
        return tuple((t._version, t.data_ptr()) for t in self._merge_sources)

    def _merged_current(self) -> None:
        """Before a merged forward (:meth:`mmpeft.tuners.base.MultimodalLayer.forward`): refuse
        training through the merged weights, and merge again when a tensor changed since the
        merge as torch tracks it (version counters: an edit through ``.data`` moves none, so it waits
        for the next ``merge()``; docs/concepts.md, "Merging")."""
        self._check_merged_inference()
        if not torch.compiler.is_compiling() and not _exporting() and self._stamp() != self._merge_stamp:
            self.merge()

    def _check_merged_inference(self) -> None:
        """A merged layer has no gradient path to its LoRA weights: training through it would
        leave them unchanged without a word, so it is an error."""
        trainable = any(p.requires_grad for p in self.lora_A.parameters())  # type: ignore[attr-defined]
        if self.training and torch.is_grad_enabled() and trainable:
            raise MmpeftStateError(
                "this LoRA layer is merged (merge_adapters), so its LoRA weights get no gradient; call "
                "unmerge_adapters() before training, or run the merged model in eval mode / under torch.no_grad()"
            )


def _merge_again(layer: nn.Module, incompatible: Any) -> None:
    """``load_state_dict`` post-hook of a merging layer: merged weights follow the loaded tensors."""
    if getattr(layer, "merged", False):
        layer.merge()  # type: ignore[operator]
