"""The ``train`` command: train an MFNet from an :class:`~mmpeft_isprs.config.ExperimentConfig`.

The published protocol by default: every step draws random 256x256 crops of random training
tiles (:mod:`mmpeft_isprs.datamodule`), joint flips, plain cross-entropy ignoring label 255,
SGD (lr 0.01, momentum 0.9, weight decay 5e-4) with the LR x0.1 at epochs 25, 35 and 45
(:mod:`mmpeft_isprs.task`); the loop, checkpoints and logs are :mod:`mmpeft_isprs.runner`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .config import ExperimentConfig
from .distributed import DistInfo, init_distributed
from .runner import CHECKPOINT, TrainResult, fit
from .runner.checkpoint import recorded_threads
from .threads import current_policy

__all__ = ["train"]


def train(
    cfg: ExperimentConfig,
    *,
    max_steps: int | None = None,
    info: DistInfo | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``cfg`` (continuing ``run_dir/last.pt`` when ``cfg.train.resume``).

    Args:
        max_steps: stop after this many optimiser steps in total (a checkpoint is written),
            e.g. to split a run into jobs; resume later to finish.
        info: the process group (default: :func:`~mmpeft_isprs.distributed.init_distributed`).
        log: where messages go (rank 0 only).

    Raises:
        ConfigError / DataError: before anything is built when the config, the data or the
            resume checkpoint is wrong.
    """
    t = cfg.train
    recorded = recorded_threads(Path(t.run_dir)) if t.resume else None
    if info is None:
        info = init_distributed(
            t.device, t.threads, (recorded, str(Path(t.run_dir) / CHECKPOINT)) if recorded else None
        )
    used = current_policy().threads
    notes = []  # printed by fit, so that train.log holds them too
    if recorded and used != recorded and info.is_main:
        notes.append(
            f"note: resuming with {used} torch thread(s), the run used {recorded}: the result is not bit-exact "
            "(leave train.threads and OMP_NUM_THREADS unset to reuse the run's count)"
        )
    return fit(cfg, info, max_steps=max_steps, log=log, notes=notes)
