"""The ``eval`` command: sliding-window evaluation of trained weights on whole tiles.

Evaluation follows the paper's protocol (:mod:`mmpeft_isprs.task.evaluation`): every tile of
the split predicted with sliding windows, one confusion matrix summed over ranks, OA, per-class
F1/IoU and mF1/mIoU; ISPRS tiles scored on the eroded ("noBoundary") labels.

The experiment is the one saved with the weights (:func:`eval_config`): a run trained with
overrides is evaluated with no override repeated; the command line changes only what it names.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .config import ConfigError, ExperimentConfig, load_config, upgrade_stored
from .distributed import DistInfo
from .model import MFNetFile
from .runner import score_weights
from .task import EvalResult, read_weights

__all__ = ["evaluate", "eval_config"]


def eval_config(
    config: str | Path | None,
    weights: str | Path | MFNetFile,
    overrides: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> ExperimentConfig:
    """The experiment to evaluate ``weights`` with: the one saved in them plus ``overrides``.

    ``weights``: a path, or the file already read (:func:`~mmpeft_isprs.task.read_weights`; the
    command reads it once for this and for :func:`evaluate`). ``config`` (a YAML file or bundled
    name) is used only for weights that hold no experiment (written by an early version). The
    stored ``model_preset`` is not applied again: the saved ``model`` section already holds the
    merged values, training overrides included.
    """
    stored = weights if isinstance(weights, MFNetFile) else read_weights(weights)
    meta, path = stored.metadata, stored.path
    if "experiment" not in meta:
        if config is None:
            raise ConfigError(f"--weights {path} holds no experiment config: give the CONFIG it was trained with")
        return load_config(config, overrides)
    values = upgrade_stored(json.loads(meta["experiment"]))
    preset = values.pop("model_preset", None)
    cfg = load_config(values, overrides)
    if config is not None and os.environ.get("RANK", "0") == "0":  # before the process group: once, on rank 0
        log(
            f"note: using the experiment saved with {path} ({cfg.name}); {config} is not read, key=value overrides apply"
        )
    return cfg if cfg.model_preset is not None else dataclasses.replace(cfg, model_preset=preset)


def evaluate(
    cfg: ExperimentConfig,
    weights: str | Path | MFNetFile,
    *,
    subsets: bool = False,
    info: DistInfo | None = None,
    out_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    notes: Sequence[str] = (),
) -> EvalResult:
    """Load ``weights``, score ``cfg.eval.split`` (with ``subsets``: also every modality subset,
    in ``result.subsets``), write JSON (rank 0); see :func:`~mmpeft_isprs.runner.score_weights`.

    ``info``: the process group (default: one process on the CPU; the CLI joins torchrun's).
    ``notes``: lines printed first and kept in ``eval.log`` (e.g. :func:`eval_config`'s).
    """
    return score_weights(cfg, weights, subsets=subsets, info=info, out_dir=out_dir, log=log, notes=notes)
