"""Trained weights as files: the MFNet's trainable tensors plus the experiment they came from.

``best.safetensors`` / ``last.safetensors`` hold the tensors and config of
:func:`~mmpeft_isprs.model.save_mfnet` plus string metadata: ``experiment`` (the resolved
experiment config as JSON), ``init_seed`` (rebuilds a random frozen encoder), ``epoch``,
``val_mIoU`` and ``encoder_sha256`` (the SHA-256 of the encoder file it was trained from, empty
without one): loading compares it with the file given (:func:`encoder_file`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmpeft.backbones import resolve_weights

from ..config import ExperimentConfig, config_from_dict, upgrade_stored
from ..model import MFNet, MFNetFile, load_mfnet, read_mfnet, save_mfnet
from ..model.fingerprint import file_sha256, short_hash

__all__ = ["save_trained", "load_trained", "read_weights", "encoder_file", "EncoderFile"]


def save_trained(
    model: MFNet, path: Path, cfg: ExperimentConfig, epoch: int, metrics: Mapping[str, Any] | None
) -> None:
    """Write ``model``'s trainable tensors with the experiment, seed, epoch and validation mIoU."""
    sam = _loaded_file(model) or cfg.model.checkpoint
    extra = {
        "experiment": json.dumps(cfg.to_dict()),
        "init_seed": str(cfg.train.seed),
        "epoch": str(epoch),
        "val_mIoU": "" if metrics is None else f"{metrics['mIoU']:.6f}",
        "encoder_sha256": file_sha256(sam) if sam and Path(sam).is_file() else "",
    }
    save_mfnet(model, path, extra=extra)


def _loaded_file(model: MFNet) -> str | None:
    """The file the model's encoder was loaded from (a ``model.checkpoint`` name resolved to its file)."""
    source = getattr(model.load_report, "source", None)
    return str(source) if source and Path(str(source)).is_file() else None


def _local_file(sam: str) -> str | None:
    """``sam`` as a local file: a path that exists, or the cached file of a ``model.checkpoint`` name
    (fetched as when training, if it is not cached); None when it is neither."""
    if Path(sam).is_file():
        return sam
    try:
        return resolve_weights(sam)
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class EncoderFile:
    """The encoder file trained weights will load: ``path`` (None: a random encoder from the seed),
    its ``sha256`` now, the one ``trained`` recorded in the weights (None: not recorded) and the
    path recorded with it."""

    weights: Path
    path: str | None
    sha256: str | None
    trained: str | None
    trained_path: str | None

    @property
    def differs(self) -> bool:
        """True when the file's content is not the one the weights were trained with."""
        return self.sha256 is not None and self.trained is not None and self.sha256 != self.trained

    def warning(self) -> str | None:
        """The line that says so (None when it is the same file, or nothing can be compared)."""
        if not self.differs:
            return None
        name = Path(str(self.trained_path)).name
        return (
            f"warning: {self.path} (sha256 {short_hash(self.sha256)}) is not the encoder file {name} that "
            f"{self.weights} was trained with (sha256 {short_hash(self.trained)}): the frozen encoder differs, so do "
            "its outputs; the results are kept apart from those of the training's file"
        )


def encoder_file(weights: MFNetFile, checkpoint: str | None = None) -> EncoderFile:
    """Which encoder file ``weights`` will load (``checkpoint`` when given, else the recorded path)
    and its hashes (now and at training)."""
    meta = weights.metadata
    needed = json.loads(meta["config"]).get("checkpoint") if "config" in meta else None
    sam = (checkpoint or needed) if needed else None
    local = _local_file(sam) if sam else None
    digest = file_sha256(local) if local else None
    return EncoderFile(weights.path, sam, digest, meta.get("encoder_sha256") or None, needed)


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
    log: Callable[[str], None] | None = None,
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
        log: where the warning goes when the encoder file's content (SHA-256) is not the one
            the weights were trained with (:class:`EncoderFile`).

    Raises:
        FileNotFoundError: the weights need a SAM checkpoint and it is not found.
    """
    stored = weights if isinstance(weights, MFNetFile) else read_weights(weights)
    meta, path = stored.metadata, stored.path
    needed = json.loads(meta["config"]).get("checkpoint") if "config" in meta else None
    sam = (checkpoint or needed) if needed else None
    if sam and _local_file(sam) is None:
        raise FileNotFoundError(
            f"SAM checkpoint {sam} not found: {path} was trained from {Path(str(needed)).name} (its frozen encoder is "
            f"not stored in the weights); set {key}=/path/to/{Path(str(needed)).name}"
        )
    mismatch = encoder_file(stored, checkpoint).warning() if sam else None
    if mismatch and log is not None:
        log(mismatch)
    seed = meta.get("init_seed")
    if seed is not None:
        torch.manual_seed(int(seed))
    model = load_mfnet(stored, checkpoint=sam)
    experiment = config_from_dict(upgrade_stored(json.loads(meta["experiment"]))) if "experiment" in meta else None
    return model.to(device).eval(), experiment
