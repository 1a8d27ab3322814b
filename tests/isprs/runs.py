"""A tiny experiment on synthetic data, shared by the application's run tests (the ``data_root``
fixture that generates the data lives in ``tests/isprs/conftest.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from mmpeft_isprs.cli import main
from mmpeft_isprs.config import ExperimentConfig, load_config
from mmpeft_isprs.model import build_mfnet

TINY_MODEL = {
    "backbone": "vit_tiny",
    "embed_dim": 32,
    "num_heads": 2,
    "decode_channels": 16,
    "window_size": 4,
    "decoder_heads": 2,
    "img_size": 64,
}
TINY_MFNET = {**TINY_MODEL, "depth": 2}  # build_mfnet's keywords of the toy model with two blocks
TINY_SYNTHETIC = [
    "model.backbone=vit_tiny",
    "model.embed_dim=32",
    "model.num_heads=2",
    "model.decode_channels=16",
    "model.window_size=4",
    "model.decoder_heads=2",
    "model.img_size=64",
    "train.epochs=1",
    "train.batches_per_epoch=2",
    "train.batch_size=2",
    "train.num_workers=0",
    "train.progress=false",
    "eval.stride=32",
    "eval.val_stride=64",
]
"""The command-line overrides of a one-epoch run of two steps on 64 px crops (the synthetic data)."""


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


def synthetic_config_file(folder: Path) -> Path:
    """``folder/data``: synthetic data written by the command line (3 tiles of 96 px), and
    ``folder/tiny.yaml``: an experiment on it; returns the YAML file's path."""
    assert main(["generate-synthetic", str(folder / "data"), "--num-tiles", "3", "--tile-size", "96"]) == 0
    cfg = folder / "tiny.yaml"
    synthetic = {"dataset": "synthetic", "root": str(folder / "data"), "synthetic": {"num_tiles": 3, "tile_size": 96}}
    cfg.write_text(yaml.safe_dump({"name": "tiny", "data": synthetic}))
    return cfg


def quiet(_: str) -> None:
    return None


def mixing_mfnet() -> torch.nn.Module:
    """The two-block toy MFNet (adapter, scalar fusion), seeded, in eval mode, with non-zero adapters
    and lambdas: the DSM really mixes into the optical branch."""
    torch.manual_seed(0)
    model = build_mfnet(**TINY_MFNET, method="adapter", fusion="scalar").eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.encoder.named_parameters():
            if p.requires_grad and "stem" not in n:
                p.copy_(
                    torch.rand(p.shape, generator=g) * 0.6 + 0.2
                    if "lam" in n
                    else torch.randn(p.shape, generator=g) * 0.05
                )
    return model
