"""The ``train`` section: optimisation, schedule, checkpoints and logging."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpoints and logging (defaults = the published runs).

    Attributes:
        run_dir: folder of this run (config, logs, ``last.pt``, ``best.safetensors``).
        epochs: number of epochs (50).
        batches_per_epoch: optimiser steps per epoch (1000).
        batch_size: images per step over all processes (10; 4 for vit_h); divided among ranks.
        optimizer: ``"sgd"`` (the paper) or ``"adamw"``.
        lr, momentum, weight_decay: SGD 0.01 / 0.9 / 5e-4 on every trainable tensor.
        milestones, gamma: LR x ``gamma`` at these epochs (25, 35, 45; 0.1).
        seed: seeds the model init, the crops (with epoch and index) and dropout.
        num_workers: DataLoader worker processes per rank.
        amp: mixed precision: ``"none"``, ``"bf16"`` (CPU or GPU) or ``"fp16"`` (GPU, GradScaler).
        flips: random horizontal and vertical flips (the authors).
        rotations: also random 90-degree rotations (the paper's text; not the authors' code).
        checkpoint_every: also write ``last.pt`` every N steps (0: at epoch ends only).
        val_every: validate every N epochs (and always after the last one).
        resume: continue from ``run_dir/last.pt`` (what ``--resume`` sets).
        overwrite: replace an earlier run in ``run_dir`` (``--overwrite``); without it, or
            ``resume``, a run folder already used is an error.
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"``.
        threads: torch CPU threads per process (0: the cores free for this process, divided
            among local ranks; see :mod:`mmpeft_isprs.threads`).
        log_every: a progress line (step, loss, lr, images/s, data wait, ETA) every N steps,
            and at least every 30 s of training, to any output (files too).
        tensorboard: also log to TensorBoard when it is installed.
        progress: show a progress bar (rank 0).
        modality_dropout: train with missing modalities: each modality of each sample is absent
            with this probability (one rate, or ``{modality: rate}``; a sample keeps at least one).
        nonfinite: NaN / inf in an input: ``"error"`` (names modality, tile, pixels) or
            ``"absent"`` (that sample's modality is treated as missing).
    """

    run_dir: str = "runs/default"
    epochs: int = 50
    batches_per_epoch: int = 1000
    batch_size: int = 10
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: list[int] = field(default_factory=lambda: [25, 35, 45])
    gamma: float = 0.1
    seed: int = 0
    num_workers: int = 2
    amp: Literal["none", "bf16", "fp16"] = "none"
    flips: bool = True
    rotations: bool = False
    checkpoint_every: int = 0
    val_every: int = 1
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    threads: int = 0
    log_every: int = 50
    tensorboard: bool = True
    progress: bool = True
    modality_dropout: float | dict[str, float] = 0.0
    nonfinite: Literal["error", "absent"] = "error"
