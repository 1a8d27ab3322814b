"""The ``eval`` command: sliding-window evaluation of trained weights on whole tiles.

Evaluation follows the paper's protocol (:mod:`mmpeft_isprs.task.evaluation`): every tile of
the split predicted with sliding windows, one confusion matrix summed over ranks, OA, per-class
F1/IoU and mF1/mIoU; ISPRS tiles scored on the eroded ("noBoundary") labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .config import ExperimentConfig
from .distributed import DistInfo
from .runner import score_weights
from .task import EvalResult

__all__ = ["evaluate"]


def evaluate(
    cfg: ExperimentConfig, weights: str | Path, *, info: DistInfo | None = None, out_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> EvalResult:
    """Load ``weights``, score ``cfg.eval.split``, write JSON (rank 0); see :func:`~mmpeft_isprs.runner.score_weights`.

    ``info``: the process group (default: one process on the CPU; the CLI joins torchrun's).
    """
    return score_weights(cfg, weights, info=info, out_dir=out_dir, log=log)
