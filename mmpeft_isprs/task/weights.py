"""Trained weights as files: the MFNet's trainable tensors plus the experiment they came from.

``best.safetensors`` / ``last.safetensors`` hold the tensors and config of
:func:`~mmpeft_isprs.model.save_mfnet` plus string metadata: ``experiment`` (the resolved
experiment config as JSON), ``init_seed`` (rebuilds a random frozen encoder), ``epoch`` and
``val_mIoU``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import ExperimentConfig, config_from_dict, upgrade_stored
from ..model import MFNet, MFNetFile, load_mfnet, read_mfnet, save_mfnet

__all__ = ["save_trained", "load_trained", "read_weights"]


def save_trained(
    model: MFNet, path: Path, cfg: ExperimentConfig, epoch: int, metrics: Mapping[str, Any] | None
) -> None:
    """Write ``model``'s trainable tensors with the experiment, seed, epoch and validation mIoU."""
    extra = {
        "experiment": json.dumps(cfg.to_dict()),
        "init_seed": str(cfg.train.seed),
        "epoch": str(epoch),
        "val_mIoU": "" if metrics is None else f"{metrics['mIoU']:.6f}",
    }
    save_mfnet(model, path, extra=extra)


def read_weights(path: str | Path) -> MFNetFile:
    """A ``best.safetensors`` written by training, read once (metadata and tensors): pass it to
    :func:`load_trained` and to whatever reads its metadata, so the file is opened once."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    return read_mfnet(path)


def load_trained(
    weights: str | Path | MFNetFile,
    device: torch.device | str = "cpu",
    checkpoint: str | None = None,
    key: str = "model.checkpoint",
) -> tuple[MFNet, ExperimentConfig | None]:
    """Rebuild a trained MFNet (and the experiment it came from) from its safetensors file
    (a path, or the file already read by :func:`read_weights`).

    The model is the one recorded in the weights. Its frozen encoder comes from the SAM
    checkpoint it was trained from: the path recorded in the weights, or ``checkpoint`` when
    given (the file moved); a path is needed only then. Weights trained on a random encoder
    ignore ``checkpoint`` and rebuild that encoder from the stored ``init_seed`` (same torch build).

    Args:
        key: how the user sets the SAM path (``model.checkpoint`` for ``eval``, ``--checkpoint``
            for ``predict``), named in the error when the file is missing.

    Raises:
        FileNotFoundError: the weights need a SAM checkpoint and it is not found.
    """
    stored = weights if isinstance(weights, MFNetFile) else read_weights(weights)
    meta, path = stored.metadata, stored.path
    needed = json.loads(meta["config"]).get("checkpoint") if "config" in meta else None
    sam = (checkpoint or needed) if needed else None
    if sam and not Path(sam).is_file():
        raise FileNotFoundError(
            f"SAM checkpoint {sam} not found: {path} was trained from {Path(str(needed)).name} (its frozen encoder is "
            f"not stored in the weights); set {key}=/path/to/{Path(str(needed)).name}"
        )
    seed = meta.get("init_seed")
    if seed is not None:
        torch.manual_seed(int(seed))
    model = load_mfnet(stored, checkpoint=sam)
    experiment = config_from_dict(upgrade_stored(json.loads(meta["experiment"]))) if "experiment" in meta else None
    return model.to(device).eval(), experiment
