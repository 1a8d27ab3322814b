"""MFNet files: only what trains (adapters, lambdas, stems, DFM, decoder) plus the config, as safetensors."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmpeft import atomic_write

from .mfnet import MFNet, build_mfnet

__all__ = ["save_mfnet", "load_mfnet", "read_mfnet", "MFNetFile"]


def save_mfnet(model: MFNet, path: str | os.PathLike, extra: Mapping[str, str] | None = None) -> None:
    """Write the trainable part of ``model`` and its config to one safetensors file (atomically)."""
    tensors = {k: v.contiguous().cpu() for k, v in model.trainable_state_dict().items()}
    meta = {"format": "mfnet", "config": json.dumps(model.config.to_dict()), **(extra or {})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: save_file(tensors, p, metadata=meta))


@dataclass(frozen=True)
class MFNetFile:
    """One read of an MFNet safetensors file: its string metadata and its tensors (the file is
    opened once; everything that needs either takes this)."""

    path: Path
    metadata: dict[str, str]
    tensors: dict[str, torch.Tensor]


def read_mfnet(path: str | os.PathLike) -> MFNetFile:
    """Open ``path`` once: metadata and tensors."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"MFNet checkpoint {path} not found")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return MFNetFile(Path(path), meta, tensors)


def load_mfnet(path: str | os.PathLike | MFNetFile, checkpoint: str | None = None, **overrides: Any) -> MFNet:
    """Rebuild the MFNet saved at ``path`` (or already read by :func:`read_mfnet`) and load its trained tensors.

    Args:
        checkpoint: the SAM file the model was trained from (default: the path in its config).
        overrides: config fields to change (e.g. ``grad_checkpointing``); shapes must still match.
    """
    stored = path if isinstance(path, MFNetFile) else read_mfnet(path)
    if stored.metadata.get("format") != "mfnet":
        raise ValueError(f"{stored.path} is not an MFNet checkpoint written by save_mfnet")
    cfg = json.loads(stored.metadata["config"])
    if checkpoint is not None:
        cfg["checkpoint"] = checkpoint
    model = build_mfnet(cfg, **overrides)
    model.load_trainable_state_dict(stored.tensors)
    return model
