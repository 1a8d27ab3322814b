"""A tiny experiment on synthetic data, shared by the application's run tests (the ``data_root``
fixture that generates the data lives in ``tests/isprs/conftest.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmpeft_isprs.config import ExperimentConfig, load_config

TINY_MODEL = {
    "backbone": "vit_tiny",
    "embed_dim": 32,
    "num_heads": 2,
    "decode_channels": 16,
    "window_size": 4,
    "decoder_heads": 2,
    "img_size": 64,
}


def tiny_config(data_root: Path, run_dir: Path, *overrides: str, **train: Any) -> ExperimentConfig:
    """Synthetic data (3 tiles of 96 px), a toy MFNet with 64x64 crops, 2 epochs x 3 steps of 2."""
    values = {
        "name": "tiny",
        "data": {"dataset": "synthetic", "root": str(data_root), "synthetic": {"num_tiles": 3, "tile_size": 96}},
        "model": dict(TINY_MODEL),
        "train": {
            "run_dir": str(run_dir),
            "epochs": 2,
            "batches_per_epoch": 3,
            "batch_size": 2,
            "num_workers": 0,
            "progress": False,
            "tensorboard": False,
            **train,
        },
        "eval": {"stride": 32, "val_stride": 64},
    }
    return load_config(values, overrides)


def quiet(_: str) -> None:
    return None
