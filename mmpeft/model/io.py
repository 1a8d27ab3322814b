"""The adapter file format only: ``adapter_model.safetensors`` (tensors) and
``mmpeft_config.json`` (metadata with the config). Knows no model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import MmpeftFileNotFoundError, MmpeftValueError
from ..utils import atomic_write

__all__ = ["WEIGHTS_NAME", "CONFIG_NAME", "write_adapter", "read_adapter"]

WEIGHTS_NAME = "adapter_model.safetensors"  # peft's file name
CONFIG_NAME = "mmpeft_config.json"


def write_adapter(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``tensors`` and ``meta`` (JSON-serialisable) into ``directory``, each file atomically."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(d / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(d / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps({"format": "mmpeft", **meta}, indent=2)))


def read_adapter(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a directory written by :func:`write_adapter`; clear errors naming
    the file when one is missing or is not mmpeft's."""
    d = Path(directory)
    for f in (CONFIG_NAME, WEIGHTS_NAME):
        if not (d / f).is_file():
            sets = sorted(p.parent.name for p in d.glob(f"*/{CONFIG_NAME}")) if d.is_dir() else []
            held = (
                (
                    f"; it holds the adapter sets {sets} in folders of their own: load one with "
                    f"load_multimodal(base, {str(d / sets[0])!r}) or wrapped.load_adapter({str(d)!r}, {sets[0]!r})"
                )
                if sets
                else ""
            )
            if not sets and (d / "model.safetensors").is_file():  # the stock Hugging Face Trainer's whole state dict
                held = (
                    "; it holds model.safetensors, the whole state dict the stock transformers.Trainer writes for a "
                    "model of its own (no config): train with mmpeft.interop.trainer.MultimodalTrainer, whose "
                    "checkpoints and save_model write these files, or call wrapped.save_pretrained(directory)"
                )
            raise MmpeftFileNotFoundError(
                f"{d / f} not found: not a directory written by save_pretrained / save_multimodal{held}"
            )
    try:
        meta = json.loads((d / CONFIG_NAME).read_text())
    except json.JSONDecodeError as err:
        raise MmpeftValueError(f"{d / CONFIG_NAME} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != "mmpeft":
        raise MmpeftValueError(f"{d / CONFIG_NAME} is not an mmpeft config")
    with safe_open(str(d / WEIGHTS_NAME), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, meta
