"""Missing modalities in the ISPRS pipeline (docs/missing_modalities.md).

- :class:`TrainingPresence`: the per-sample presence mask of a training batch: modality dropout
  (``train.modality_dropout``: one rate or ``{modality: rate}``) and the non-finite check of the
  CPU batch, naming the tiles (``train.nonfinite``: ``"error"`` or ``"absent"``).
- :func:`evaluate_subsets`: one trained model scored on every non-empty subset of its
  modalities (all 2^M - 1: optical + DSM, optical alone, DSM alone for two), or on the full set only: the evaluation
  step of ``mmpeft-isprs eval`` (:func:`mmpeft_isprs.runner.score_weights`), ``--subsets`` or not;
  :func:`format_subsets` reports the subsets side by side.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmpeft import NonFiniteInputError, check_finite, dropout_rates, modality_dropout

from ..config import ConfigError, ExperimentConfig
from ..data import TileSet
from ..distributed import DistInfo
from ..model import MFNet
from .evaluation import EvalResult, evaluate_tileset

__all__ = [
    "TrainingPresence",
    "SubsetModel",
    "modality_subsets",
    "evaluate_subsets",
    "format_subsets",
]


class TrainingPresence:
    """Presence masks for training batches: modality dropout plus the non-finite check.

    The check runs on the CPU batch (before the copy to the device), so the error names the
    tiles; the model's own check is then switched off (no host sync in the device step).
    """

    def __init__(self, cfg: ExperimentConfig, model: MFNet, rank: int = 0) -> None:
        t = cfg.train
        self.modalities = tuple(model.modalities)
        try:
            self.rates = dropout_rates(t.modality_dropout, self.modalities)
        except ValueError as exc:
            raise ConfigError(f"train.modality_dropout: {exc}") from exc
        self.nonfinite = t.nonfinite
        self.generator = torch.Generator().manual_seed(int(t.seed) * 1000 + 17 + rank)
        model.encoder.set_nonfinite("off")  # checked here, on the CPU batch

    @property
    def dropout(self) -> bool:
        """True when some modality is dropped with a positive rate."""
        return any(p > 0 for p in self.rates.values())

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
        """{modality: (B,) bool} for ``batch`` (CPU tensors), or None when all is present."""
        inputs = {m: batch[m] for m in self.modalities}
        names = batch.get("name")
        tiles = [str(n) for n in names] if isinstance(names, (list, tuple)) else None
        finite = check_finite(inputs, tiles, self.nonfinite)
        size = next(iter(inputs.values())).shape[0]
        if self.dropout:  # drops among the finite modalities, keeping one per sample
            return modality_dropout(self.rates, self.modalities, size, self.generator, available=finite)
        if finite is None:
            return None
        return {m: finite.get(m, torch.ones(size, dtype=torch.bool)) for m in self.modalities}


class SubsetModel(nn.Module):
    """``model`` run on the modalities ``subset`` only (the others are left out of its input)."""

    def __init__(self, model: MFNet, subset: Sequence[str]) -> None:
        super().__init__()
        self.model, self.subset = model, tuple(subset)

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.subset

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """{modality: (B, c, H, W)} (extra modalities ignored) -> logits (B, K, H, W)."""
        return self.model({m: inputs[m] for m in self.subset})


def modality_subsets(modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset, the full set first, then by decreasing size (model order)."""
    mods = tuple(modalities)
    return [c for k in range(len(mods), 0, -1) for c in itertools.combinations(mods, k)]


def evaluate_subsets(
    model: MFNet,
    tiles: TileSet,
    cfg: ExperimentConfig,
    *,
    info: DistInfo | None = None,
    subsets: Sequence[Sequence[str]] | None = None,
    out_dir: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, EvalResult]:
    """Score ``model`` on ``tiles`` once per modality subset; {"optical+dsm": result, ...}.

    ``subsets``: default every subset (:func:`modality_subsets`); the full set runs ``model``
    itself. ``out_dir`` (predictions) applies to the first subset only; ``progress`` as in
    :func:`evaluate_tileset`; ``log``: one mIoU line per subset (rank 0), none when None.
    """
    out: dict[str, EvalResult] = {}
    for i, subset in enumerate(subsets or modality_subsets(model.modalities)):
        key = "+".join(subset)
        net = model if tuple(subset) == tuple(model.modalities) else SubsetModel(model, subset)
        try:
            out[key] = evaluate_tileset(
                net,
                tiles,
                cfg,
                info=info,
                out_dir=out_dir if i == 0 else None,
                progress=progress,  # type: ignore[arg-type]
            )
        except NonFiniteInputError as exc:
            raise NonFiniteInputError(f"evaluating {key} on {tiles.ids}: {exc}") from exc
        if log is not None and (info is None or info.is_main):
            log(f"{key}: mIoU {100 * float(out[key].metrics['mIoU']):.2f}  ({out[key].seconds:.1f} s)")
    return out


def format_subsets(results: Mapping[str, EvalResult], metric: str = "IoU") -> str:
    """Per-class ``metric`` and OA / mF1 / mIoU (in %) of every subset side by side: one column
    per subset for up to three (two modalities), one row per subset beyond (seven for three)."""
    keys = list(results)
    classes = list(results[keys[0]].metrics[metric])
    cells = {
        k: [results[k].metrics[metric][c] for c in classes]
        + [float(results[k].metrics[n]) for n in ("OA", "mF1", "mIoU")]
        for k in keys
    }
    names = [*classes, "OA", "mF1", "mIoU"]
    if len(keys) > 3:
        label = max(12, *(len(k) + 2 for k in keys))
        widths = [max(8, len(n) + 2) for n in names]
        rows = [f"{metric + ' (%)':<{label}}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths))]
        rows += [f"{k:<{label}}" + "".join(f"{100 * v:>{w}.2f}" for v, w in zip(cells[k], widths)) for k in keys]
        return "\n".join(rows)
    width, label = max(12, *(len(k) + 2 for k in keys)), max(10, *(len(c) + 2 for c in classes))
    rows = [f"{metric + ' (%)':<{label}}" + "".join(f"{k:>{width}}" for k in keys)]
    rows += [f"{n:<{label}}" + "".join(f"{100 * cells[k][i]:>{width}.2f}" for k in keys) for i, n in enumerate(names)]
    return "\n".join(rows)
