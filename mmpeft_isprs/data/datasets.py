"""Torch datasets over a :class:`TileSet`: random training crops.

``RandomCropDataset`` follows the published runs: each item is a random tile and a random
crop (256x256, 1000 batches per epoch in the paper). Item ``index`` of epoch ``epoch`` draws
from a generator seeded by ``(seed, epoch, index)`` only, so it is the same crop and the same
augmentation whichever rank or DataLoader worker loads it, and training can resume mid-run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .palette import IGNORE_INDEX
from .tiles import TileSet
from .transforms import Transform


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of item ``index`` in ``epoch``: a pure function of its three arguments."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, index])))


class RandomCropDataset(Dataset):
    """Random crops of random tiles.

    Args:
        tileset: the training tiles (``labels="full"`` as the authors).
        crop_size: side of the square crop; tiles smaller than it are padded (inputs with 0,
            mask with 255 = ignore).
        samples_per_epoch: ``len(dataset)``, e.g. 1000 batches x batch size.
        seed: base seed; item ``i`` of epoch ``e`` uses ``item_rng(seed, e, i)``.
        transforms: joint augmentation ``(sample, rng) -> sample``, e.g. ``JointFlipRotate()``.
        tile_weights: ``"uniform"`` (the authors: every tile equally likely) or ``"area"``
            (proportional to tile area, i.e. uniform over pixels).

    Items: ``{modality: (C, s, s) float32, label_key: (s, s) int64, "name": str}``.

    Indices are ``(epoch, index)`` pairs (what :class:`~mmpeft_isprs.datamodule.EpochBatchSampler`
    yields): the dataset holds no epoch state, so every DataLoader worker, persistent or not,
    returns the same crop for the same pair. A plain ``index`` means ``(0, index)``.
    """

    def __init__(
        self,
        tileset: TileSet,
        crop_size: int = 256,
        samples_per_epoch: int = 10000,
        seed: int = 0,
        transforms: Transform | None = None,
        tile_weights: str = "uniform",
    ) -> None:
        if crop_size <= 0 or samples_per_epoch <= 0:
            raise ValueError("RandomCropDataset: crop_size and samples_per_epoch must be > 0")
        if tile_weights not in ("uniform", "area"):
            raise ValueError(f"RandomCropDataset: tile_weights must be uniform or area, got {tile_weights!r}")
        self.tileset, self.crop_size = tileset, int(crop_size)
        self.samples_per_epoch, self.seed, self.transforms = int(samples_per_epoch), int(seed), transforms
        areas = np.array([h * w for h, w in (tileset.shape(i) for i in range(len(tileset)))], float)
        self._p = areas / areas.sum() if tile_weights == "area" else None

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = index if isinstance(index, tuple) else (0, index)
        if not 0 <= index < self.samples_per_epoch:
            raise IndexError(f"RandomCropDataset: index {index} out of range {self.samples_per_epoch}")
        rng = item_rng(self.seed, epoch, index)
        tile = int(rng.choice(len(self.tileset), p=self._p))
        H, W = self.tileset.shape(tile)
        h, w = min(self.crop_size, H), min(self.crop_size, W)
        y0 = int(rng.integers(H - h + 1))
        x0 = int(rng.integers(W - w + 1))
        sample = self.tileset.read_window(tile, y0, x0, h, w)
        sample = pad_sample(sample, self.crop_size, self.tileset.label_key)
        if self.transforms is not None:
            sample = self.transforms(sample, rng)
        return sample


def pad_sample(sample: dict[str, Any], size: int, label_key: str = "mask") -> dict[str, Any]:
    """Pad (..., h, w) tensors at the bottom/right to (..., size, size); mask with 255."""
    out = dict(sample)
    for key, value in sample.items():
        if not isinstance(value, torch.Tensor) or value.ndim < 2:
            continue
        ph, pw = size - value.shape[-2], size - value.shape[-1]
        if ph <= 0 and pw <= 0:
            continue
        fill = IGNORE_INDEX if key == label_key else 0
        out[key] = F.pad(value, (0, max(pw, 0), 0, max(ph, 0)), value=fill)
    return out


__all__ = ["RandomCropDataset", "item_rng", "pad_sample"]
