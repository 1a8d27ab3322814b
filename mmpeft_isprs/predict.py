"""Run a trained MFNet on tiles of any size and write index and colour maps.

Inputs are optical images and DSMs (files or folders, paired by name); outputs per tile:

- ``<stem>_pred.png``: the class index map (uint8; 0..K-1), or ``<stem>_pred.tif`` when the
  optical input is a GeoTIFF (written on the same grid: georeferencing tags copied);
- ``<stem>_colour.png``: the prediction drawn with the data set's palette (ISPRS colours for
  ISPRS models), plus ``<stem>_colour.tif`` (georeferenced) for GeoTIFF inputs.

The optical image is scaled by its dtype's maximum (uint8 / 255) and the DSM min-max scaled per
tile, as in training (the DSM rule stored with the weights is used). The model is the one
recorded in the weights; ``--checkpoint`` is needed only when its SAM file moved. Optical and
DSM files pair by name or tile id (zero padding ignored); an unpaired file is named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .config import ConfigError, ExperimentConfig
from .data import (
    ISPRS, MMHUNAN, DatasetInfo, check_sizes, dsm_tensor, is_geotiff, optical_tensor, pair_inputs,
    write_prediction,
)
from .data.patterns import tile_key_of_name
from .datamodule import dsm_rule
from .inference import model_fn, sliding_window_predict
from .model import MFNet
from .task import load_trained

__all__ = ["predict_files", "PredictOptions", "dataset_info"]


def dataset_info(model: MFNet, experiment: ExperimentConfig | None) -> DatasetInfo:
    """Class names and palette of the model's data set (ISPRS, or MMHunan for 7 classes)."""
    if experiment is not None and (experiment.data.dataset == "mmhunan" or experiment.data.generic.classes == "mmhunan"):
        return MMHUNAN
    return MMHUNAN if model.config.num_classes == 7 else ISPRS


@dataclass
class PredictOptions:
    """Sliding-window settings of ``predict`` (see :class:`~mmpeft_isprs.config.EvalConfig`)."""

    stride: int = 128
    batch_size: int = 8
    mode: str = "average"
    tta_flip: bool = False
    amp: str = "none"
    bands: tuple[int, ...] | None = None
    progress: bool = False
    checkpoint: str | None = None
    cog: bool = False


def predict_files(
    weights: str | Path, optical: Sequence[str | Path], dsm: Sequence[str | Path], out_dir: str | Path,
    options: PredictOptions | None = None, device: torch.device | str = "cpu", log: Callable[[str], None] = print,
) -> list[Path]:
    """Predict every optical (+ DSM) tile and write its maps into ``out_dir``; returns the files."""
    opts = options or PredictOptions()
    device = torch.device(device)
    model, experiment = load_trained(weights, device, checkpoint=opts.checkpoint, key="--checkpoint")
    needs_dsm = len(model.modalities) > 1
    if needs_dsm and not dsm:
        raise ConfigError(f"this model uses {list(model.modalities)}: give --dsm as well")
    pairs = pair_inputs(optical, dsm if needs_dsm else [])
    bands = opts.bands
    if bands is None and experiment is not None and experiment.data.dataset == "potsdam":
        bands = (0, 1, 2) if experiment.data.potsdam_bands == "rgb" else (3, 0, 1)
    info, size = dataset_info(model, experiment), model.config.size[0]
    rule = dsm_rule(experiment.data if experiment is not None else None)
    run = model_fn(model, device, opts.amp)
    written: list[Path] = []
    for opt_path, dsm_path in pairs:
        inputs = {model.modalities[0]: optical_tensor(opt_path, bands)}
        if dsm_path is not None:
            inputs[model.modalities[1]] = dsm_tensor(dsm_path, rule)
        check_sizes(tile_key_of_name(opt_path.stem), list(zip((opt_path, dsm_path), inputs.values())))
        scores = sliding_window_predict(
            run, inputs, model.config.num_classes, window=size, stride=min(opts.stride, size),
            batch_size=opts.batch_size, mode=opts.mode, tta_flip=opts.tta_flip, device=device,  # type: ignore[arg-type]
            progress=opts.progress,
        )  # fmt: skip
        pred = scores.argmax(0).numpy()
        geo = opt_path if is_geotiff(opt_path) else None
        written += write_prediction(pred, out_dir, opt_path.stem, info, georef_from=geo, cog=opts.cog)
        log(f"{opt_path.name}: {pred.shape[0]}x{pred.shape[1]} -> {written[-1].parent}")
    return written

