"""Run a trained MFNet on tiles of any size and write index and colour maps.

Inputs are optical images and DSMs (files or folders, paired by name); outputs per tile:

- ``<stem>_pred.png``: the class index map (uint8; 0..K-1), or ``<stem>_pred.tif`` when the
  optical input is a GeoTIFF (written on the same grid: georeferencing tags copied);
- ``<stem>_colour.png``: the prediction drawn with the data set's palette (ISPRS colours for
  ISPRS models), plus ``<stem>_colour.tif`` (georeferenced) for GeoTIFF inputs.

The optical image is scaled by its dtype's maximum (uint8 / 255) and the DSM min-max scaled per
tile, as in training (the DSM rule stored with the weights is used).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from .config import ConfigError, ExperimentConfig, config_from_dict
from .data import (
    ISPRS, MMHUNAN, DataError, DatasetInfo, DsmNormalisation, index_to_colour, normalise_dsm,
    read_geotags, read_image, valid_range, write_tiff,
)
from .data.layouts import IMAGE_SUFFIXES
from .inference import sliding_window_predict
from .model import MFNet, load_mfnet

__all__ = [
    "load_trained", "read_weights_metadata", "autocast", "model_fn", "write_prediction",
    "pair_inputs", "predict_files", "PredictOptions", "dataset_info",
]  # fmt: skip


# --------------------------------------------------------------------------- model
def read_weights_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a ``best.safetensors`` written by training."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_trained(path: str | Path, device: torch.device | str = "cpu", checkpoint: str | None = None) -> tuple[MFNet, ExperimentConfig | None]:
    """Rebuild a trained MFNet (and the experiment it came from) from its safetensors file.

    The frozen encoder comes from the SAM checkpoint named in the weights (or ``checkpoint``).
    Without one it was random at training time; it is rebuilt from the stored ``init_seed``,
    so the same frozen weights come back (same torch build).
    """
    meta = read_weights_metadata(path)
    seed = meta.get("init_seed")
    if seed is not None:
        torch.manual_seed(int(seed))
    model = load_mfnet(path, checkpoint=checkpoint)
    experiment = config_from_dict(json.loads(meta["experiment"])) if "experiment" in meta else None
    return model.to(device).eval(), experiment


def autocast(amp: str, device: torch.device) -> ContextManager[Any]:
    """``torch.autocast`` for ``"bf16"``/``"fp16"``; a null context for ``"none"``."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("amp: fp16 needs a CUDA device; use bf16 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def model_fn(model: torch.nn.Module, device: torch.device, amp: str = "none") -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """``{name: (B, C, h, w)} -> (B, K, h, w)`` float32 logits, no grad, under autocast."""

    def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad(), autocast(amp, device):
            return model(batch).float()

    return run


def dataset_info(model: MFNet, experiment: ExperimentConfig | None) -> DatasetInfo:
    """Class names and palette of the model's data set (ISPRS, or MMHunan for 7 classes)."""
    if experiment is not None and (experiment.data.dataset == "mmhunan" or experiment.data.generic.classes == "mmhunan"):
        return MMHUNAN
    return MMHUNAN if model.config.num_classes == 7 else ISPRS


# --------------------------------------------------------------------------- outputs
def write_prediction(
    pred: np.ndarray, out_dir: str | Path, stem: str, info: DatasetInfo, georef_from: str | Path | None = None
) -> list[Path]:
    """Write ``pred`` (H, W) class indices as index map and colour map; returns the paths.

    With ``georef_from`` (a GeoTIFF of the same size) the index map is a GeoTIFF on its grid
    and a georeferenced colour GeoTIFF is written beside the colour PNG.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = np.asarray(pred).astype(np.uint8)
    colour = index_to_colour(index, info)
    paths = []
    if georef_from is not None:
        paths.append(write_tiff(out / f"{stem}_pred.tif", index, georef_from=georef_from))
        paths.append(write_tiff(out / f"{stem}_colour.tif", colour, georef_from=georef_from))
    else:
        Image.fromarray(index, mode="L").save(out / f"{stem}_pred.png")
        paths.append(out / f"{stem}_pred.png")
    Image.fromarray(colour, mode="RGB").save(out / f"{stem}_colour.png")
    paths.append(out / f"{stem}_colour.png")
    return paths


# --------------------------------------------------------------------------- inputs
def _list_images(items: Sequence[str | Path], what: str) -> list[Path]:
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"--{what}: no images ({', '.join(IMAGE_SUFFIXES)}) in folder {p}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"--{what}: {p} not found")
    return files


def _tile_key(stem: str) -> str:
    """The tile id in a file name: the last number group (``area5`` -> 5, ``potsdam_2_10_...`` -> 2_10)."""
    groups = re.findall(r"\d+(?:_\d+)*", stem)
    return groups[-1] if groups else stem


def pair_inputs(optical: Sequence[str | Path], dsm: Sequence[str | Path]) -> list[tuple[Path, Path | None]]:
    """Pair optical and DSM files: same file name stem, else the same tile number.

    Explicit file lists of equal length are paired in order when no name matches.
    Raises FileNotFoundError naming the unpaired files.
    """
    opt = _list_images(optical, "optical")
    if not dsm:
        return [(o, None) for o in opt]
    dem = _list_images(dsm, "dsm")
    for key in (lambda p: p.stem, lambda p: _tile_key(p.stem)):
        table = {key(d): d for d in dem}
        if len(table) == len(dem) and all(key(o) in table for o in opt):
            return [(o, table[key(o)]) for o in opt]
    if len(opt) == len(dem) and all(Path(x).is_file() for x in (*optical, *dsm)):
        return list(zip(opt, dem))
    raise FileNotFoundError(
        "cannot pair optical and DSM files by name or tile number: optical "
        f"{[o.name for o in opt][:8]}, dsm {[d.name for d in dem][:8]}; give files in matching order"
    )


def _optical_tensor(path: Path, bands: Sequence[int] | None) -> torch.Tensor:
    arr = read_image(path)
    arr = arr[..., None] if arr.ndim == 2 else arr
    if bands is not None:
        if max(bands) >= arr.shape[-1]:
            raise DataError(f"{path}: has {arr.shape[-1]} band(s), --bands asks for {list(bands)}")
        arr = arr[..., list(bands)]
    elif arr.shape[-1] != 3:
        raise DataError(f"{path}: optical must have 3 bands, has {arr.shape[-1]}; choose them with --bands (e.g. 0,1,2)")
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(arr, -1, 0)))
    if np.issubdtype(arr.dtype, np.integer):
        return t.float().div_(float(np.iinfo(arr.dtype).max))
    return t.float()


def _dsm_tensor(path: Path, rule: DsmNormalisation) -> torch.Tensor:
    arr = read_image(path)
    if arr.ndim == 3:
        arr = arr[..., 0]
    scaled = normalise_dsm(arr, rule, valid_range(arr, rule, str(path)))
    return torch.from_numpy(np.ascontiguousarray(scaled, dtype=np.float32))[None]


def _is_geotiff(path: Path) -> bool:
    return path.suffix.lower() in (".tif", ".tiff") and bool(read_geotags(path))


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


def _dsm_rule(experiment: ExperimentConfig | None) -> DsmNormalisation:
    if experiment is None:
        return DsmNormalisation()
    d = experiment.data
    return DsmNormalisation(d.dsm_scaling, d.dsm_min, d.dsm_max, d.dsm_nodata, d.dsm_fill)


def predict_files(
    weights: str | Path, optical: Sequence[str | Path], dsm: Sequence[str | Path], out_dir: str | Path,
    options: PredictOptions | None = None, device: torch.device | str = "cpu", log: Callable[[str], None] = print,
) -> list[Path]:
    """Predict every optical (+ DSM) tile and write its maps into ``out_dir``; returns the files."""
    opts = options or PredictOptions()
    device = torch.device(device)
    model, experiment = load_trained(weights, device)
    needs_dsm = len(model.modalities) > 1
    if needs_dsm and not dsm:
        raise ConfigError(f"this model uses {list(model.modalities)}: give --dsm as well")
    pairs = pair_inputs(optical, dsm if needs_dsm else [])
    bands = opts.bands
    if bands is None and experiment is not None and experiment.data.dataset == "potsdam":
        bands = (0, 1, 2) if experiment.data.potsdam_bands == "rgb" else (3, 0, 1)
    info, rule, size = dataset_info(model, experiment), _dsm_rule(experiment), model.config.size[0]
    run = model_fn(model, device, opts.amp)
    written: list[Path] = []
    for opt_path, dsm_path in pairs:
        inputs = {model.modalities[0]: _optical_tensor(opt_path, bands)}
        if dsm_path is not None:
            inputs[model.modalities[1]] = _dsm_tensor(dsm_path, rule)
        shapes = {tuple(t.shape[-2:]) for t in inputs.values()}
        if len(shapes) != 1:
            raise DataError(f"{opt_path} and {dsm_path}: sizes differ {sorted(shapes)}")
        scores = sliding_window_predict(
            run, inputs, model.config.num_classes, window=size, stride=min(opts.stride, size),
            batch_size=opts.batch_size, mode=opts.mode, tta_flip=opts.tta_flip, device=device,  # type: ignore[arg-type]
            progress=opts.progress,
        )  # fmt: skip
        pred = scores.argmax(0).numpy()
        geo = opt_path if _is_geotiff(opt_path) else None
        written += write_prediction(pred, out_dir, opt_path.stem, info, georef_from=geo)
        log(f"{opt_path.name}: {pred.shape[0]}x{pred.shape[1]} -> {written[-1].parent}")
    return written

