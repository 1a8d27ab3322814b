"""Joint geometric augmentations: the same flip/rotation for every modality and the mask.

A transform is a callable ``(sample, rng) -> sample`` where ``sample`` is a dict of tensors
whose last two axes are (H, W) -- modalities (C, H, W), mask (H, W) -- and ``rng`` is a
``torch.Generator`` or ``numpy.random.Generator``. Randomness comes only from ``rng``, so a
dataset that derives ``rng`` from (seed, epoch, index) gets reproducible augmentations.
Non-tensor entries (e.g. ``"name"``) pass through untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

Sample = dict[str, Any]
Rng = torch.Generator | np.random.Generator
Transform = Callable[[Sample, Rng], Sample]


def _uniform(rng: Rng) -> float:
    if isinstance(rng, np.random.Generator):
        return float(rng.random())
    return float(torch.rand((), generator=rng).item())


def _randint(rng: Rng, high: int) -> int:
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(high))
    return int(torch.randint(high, (), generator=rng).item())


def _spatial(sample: Mapping[str, Any]) -> list[str]:
    return [k for k, v in sample.items() if isinstance(v, torch.Tensor) and v.ndim >= 2]


@dataclass(frozen=True)
class JointFlipRotate:
    """Random flips and (optionally) 90-degree rotations applied identically to all tensors.

    The authors trained with random vertical and horizontal flips only (``rot90=False``, the
    default), although the paper mentions rotation.

    Attributes:
        hflip: flip left-right with probability ``p``.
        vflip: flip up-down with probability ``p``.
        rot90: rotate by k * 90 degrees, k uniform in {0, 1, 2, 3} (swaps H and W when k is
            odd; crops are square in training).
        p: flip probability.
    """

    hflip: bool = True
    vflip: bool = True
    rot90: bool = False
    p: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"JointFlipRotate: p must be in [0, 1], got {self.p}")

    def __call__(self, sample: Sample, rng: Rng) -> Sample:
        """sample: dict of (..., H, W) tensors -> new dict, same keys, flipped/rotated."""
        # Draw every decision first, in a fixed order, so the stream does not depend on keys.
        do_h = self.hflip and _uniform(rng) < self.p
        do_v = self.vflip and _uniform(rng) < self.p
        k = _randint(rng, 4) if self.rot90 else 0
        out = dict(sample)
        for key in _spatial(sample):
            x = sample[key]
            if do_h:
                x = torch.flip(x, dims=(-1,))
            if do_v:
                x = torch.flip(x, dims=(-2,))
            if k:
                x = torch.rot90(x, k, dims=(-2, -1))
            out[key] = x.contiguous()
        return out


__all__ = ["JointFlipRotate", "Transform", "Sample"]
