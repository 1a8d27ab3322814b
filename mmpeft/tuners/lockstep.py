"""Lockstep: the state of the per-modality reference execution (:func:`mmpeft.reference_forward`).

The reference runs the host model's own forward on **one modality at a time**. A layer that does
not mix computes that modality's update alone. A mixing layer needs the other modalities' updates
at the same place, computed from *their* inputs there: it takes them from the previous pass
(every layer call's input is recorded per modality). Pass p is exact up to the p-th mixing call,
so L mixing calls need at most L + 1 passes; the reference stops as soon as a pass records
exactly the inputs of the one before (then every later pass would repeat it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .outputs import first_output, with_first

__all__ = ["Lockstep"]

Key = tuple[int, str, int]  # (id of the layer, method, call index within one forward)


class Lockstep:
    """Recorded inputs of every layer call, per modality, for the current and the previous pass."""

    def __init__(self, num_modalities: int) -> None:
        self.num_modalities = num_modalities
        self.modality = 0
        self.previous: dict[tuple[Key, int], torch.Tensor] = {}
        self.current: dict[tuple[Key, int], torch.Tensor] = {}
        self.counts: dict[tuple[int, str], int] = {}
        self.mixing_calls = 0

    def begin(self, modality: int) -> None:
        """Start one modality's forward of the current pass."""
        self.modality, self.counts = modality, {}

    def end_pass(self) -> bool:
        """Close a pass; True when it recorded exactly what the previous one did (converged)."""
        same = set(self.current) == set(self.previous) and all(
            torch.equal(v, self.previous[k]) for k, v in self.current.items()
        )
        self.previous, self.current = self.current, {}
        return same

    def _key(self, layer: nn.Module, method: str) -> Key:
        n = self.counts.get((id(layer), method), 0)
        self.counts[(id(layer), method)] = n + 1
        return (id(layer), method, n)

    def call(self, layer: Any, method: str, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``layer.<method>(x, ...)`` for the current modality's input ``x`` (one modality's batch)."""
        key = self._key(layer, method)
        self.current[(key, self.modality)] = x.detach()
        fn = getattr(layer, method)
        layer.reference = None
        try:
            if not layer._fusion().mixes:
                layer.single = self.modality
                try:
                    return fn(x, *args, **kwargs)
                finally:
                    layer.single = None
            self.mixing_calls += 1
            return self._mixed(layer, fn, x, args, kwargs, key)
        finally:
            layer.reference = self

    def _mixed(
        self, layer: Any, fn: Any, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any], key: Key
    ) -> Any:
        """The current modality's row of the layer run on every modality (the others' inputs from
        the previous pass; its own input where none is recorded yet), in loop execution."""
        m = self.num_modalities
        xs = [x if k == self.modality else self.previous.get((key, k), x) for k in range(m)]
        big = torch.cat(xs, 0)  # (M*B', ...) modality-major
        args = tuple(big if a is x else a for a in args)
        kwargs = {k: big if v is x else v for k, v in kwargs.items()}
        execution, layer.execution = layer.execution, "loop"
        try:
            out = fn(big, *args, **kwargs)
        finally:
            layer.execution = execution
        first, rest = first_output(out)
        mine = first.chunk(m, 0)[self.modality]
        if rest is not None:
            rest = tuple(r.chunk(m, 0)[self.modality] if _stacked(r, big) else r for r in rest)
        return with_first(mine, rest)


def _stacked(r: Any, big: torch.Tensor) -> bool:
    return isinstance(r, torch.Tensor) and r.dim() > 0 and r.shape[0] == big.shape[0]
