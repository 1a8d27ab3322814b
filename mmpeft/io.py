"""Persistence: only what trains (safetensors) plus the config (JSON)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .config import MultimodalConfig
from .wrap import MultimodalModel, wrap_multimodal

__all__ = ["save_multimodal", "load_multimodal", "WEIGHTS_NAME", "CONFIG_NAME", "atomic_write"]

WEIGHTS_NAME = "adapter_model.safetensors"  # peft's file name
CONFIG_NAME = "mmpeft_config.json"


def _fingerprint(wrapped: MultimodalModel) -> dict[str, list[int]]:
    """Shapes of the frozen weights of every wrapped module (checked again on load)."""
    fp: dict[str, list[int]] = {}
    for name, layer in wrapped.layers():
        for pname, p in layer.base_layer.named_parameters():
            fp[f"{name}.base_layer.{pname}"] = list(p.shape)
    return fp


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Any) -> None:
    """Call ``write(tmp_path)`` and rename the result onto ``path`` (never a half-written file).

    The file gets the permissions of a plainly created one (``0o666 & ~umask``, 0644 under the
    usual umask), whatever mode the writer gave the temporary file (safetensors uses 0600).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_multimodal(wrapped: MultimodalModel, directory: str | os.PathLike) -> None:
    """Write ``adapter_model.safetensors`` (trainable tensors) and ``mmpeft_config.json``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in wrapped.trainable_state_dict().items()}
    meta = {
        "format": "mmpeft", "version": __version__, "config": wrapped.config.to_dict(),
        "in_channels": wrapped.in_channels, "base_fingerprint": _fingerprint(wrapped),
    }  # fmt: skip
    atomic_write(d / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(d / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2)))


def load_multimodal(base_model: nn.Module, directory: str | os.PathLike, strict: bool = True) -> MultimodalModel:
    """Wrap a freshly built ``base_model`` as saved in ``directory`` and load the tensors.

    Raises ValueError naming the keys when the base model's size differs from the saved one or
    when tensors are missing, unexpected or of the wrong shape.
    """
    d = Path(directory)
    for f in (CONFIG_NAME, WEIGHTS_NAME):
        if not (d / f).is_file():
            raise FileNotFoundError(f"{d / f} not found: not a directory written by save_multimodal")
    meta = json.loads((d / CONFIG_NAME).read_text())
    if meta.get("format") != "mmpeft":
        raise ValueError(f"{d / CONFIG_NAME} is not an mmpeft config")
    config = MultimodalConfig.from_dict(meta["config"])
    wrapped = wrap_multimodal(base_model, config=config)
    found = _fingerprint(wrapped)
    saved = meta.get("base_fingerprint", {})
    bad = [k for k in saved if k in found and found[k] != saved[k]]
    if bad:
        raise ValueError(
            "the base model differs from the one the adapters were trained on: "
            + "; ".join(f"{k}: saved {tuple(saved[k])} vs model {tuple(found[k])}" for k in bad[:10])
        )
    gone = sorted(set(saved) ^ set(found))
    if gone and strict:
        raise ValueError(f"the wrapped modules differ from the saved ones, e.g. {gone[:5]}")
    wrapped.load_trainable_state_dict(load_file(str(d / WEIGHTS_NAME)), strict=strict)
    return wrapped
