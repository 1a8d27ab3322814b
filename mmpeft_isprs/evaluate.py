"""Data sets from an experiment config, and sliding-window evaluation of whole tiles.

Evaluation follows the paper's protocol: every tile of the split is predicted with sliding
windows (:func:`~mmpeft_isprs.inference.sliding_window_predict`), all pixels go into one
confusion matrix (summed over ranks under torchrun), and OA (all classes), per-class F1/IoU and
mF1/mIoU (ISPRS: the 5 classes without clutter; MMHunan: all 7) are computed from it. ISPRS
tiles are scored on the eroded ("noBoundary") labels.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .config import ConfigError, DataConfig, ExperimentConfig
from .data import (
    ISPRS, MMHUNAN, DataError, DsmNormalisation, GenericLayout, Layout, MMHunanLayout, ModalitySpec,
    PotsdamLayout, SplitSpec, TileSet, VaihingenLayout, generate_synthetic_vaihingen,
    synthetic_layout,
)
from .distributed import DistInfo, barrier, shard
from .inference import sliding_window_predict
from .metrics import ConfusionMatrix, compute_metrics, format_table
from .model import MFNet
from .predict import load_trained, model_fn, write_prediction

__all__ = ["make_layout", "make_tileset", "split_ids", "dsm_rule", "prepare_data_root", "evaluate_tileset", "evaluate", "EvalResult"]


# --------------------------------------------------------------------------- data from config
def dsm_rule(data: DataConfig) -> DsmNormalisation:
    """The DSM scaling of ``data`` (per tile min-max by default)."""
    return DsmNormalisation(data.dsm_scaling, data.dsm_min, data.dsm_max, data.dsm_nodata, data.dsm_fill)


def prepare_data_root(data: DataConfig, info: DistInfo | None = None) -> None:
    """Generate the synthetic data set if it is missing (rank 0; the others wait)."""
    if data.dataset != "synthetic":
        return
    if info is None or info.is_main:
        s = data.synthetic
        generate_synthetic_vaihingen(data.root, num_tiles=s.num_tiles, tile_size=s.tile_size, seed=s.seed)
    barrier()


def make_layout(data: DataConfig) -> Layout:
    """The file layout and splits of ``data`` (validation hold-out included)."""
    split = SplitSpec(data.split, tuple(data.val_ids), data.val_fraction, data.val_seed)
    if data.dataset == "vaihingen":
        return VaihingenLayout(split=split)
    if data.dataset == "potsdam":
        return PotsdamLayout(split=split, bands=data.potsdam_bands)
    if data.dataset == "mmhunan":
        return MMHunanLayout(split=split)
    if data.dataset == "synthetic":
        return synthetic_layout(data.root, split=split)
    g = data.generic
    return GenericLayout(
        modalities=tuple(ModalitySpec(n, k) for n, k in g.modalities.items()),  # type: ignore[arg-type]
        info=MMHUNAN if g.classes == "mmhunan" else ISPRS, label_format=g.label_format,
        label_dir=g.label_dir, eval_label_dir=g.eval_label_dir, folders=dict(g.folders), split=split,
    )  # fmt: skip


def split_ids(data: DataConfig, split: str) -> list[str]:
    """Tile ids of ``split`` ([] for an empty validation split)."""
    try:
        return make_layout(data).split_ids(split, data.root)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"data ({data.dataset} in {data.root}): {exc}") from None


def make_tileset(data: DataConfig, split: str, labels: str = "full") -> TileSet:
    """The validated tiles of ``split`` (raises DataError listing every problem found)."""
    root = Path(data.root)
    if not root.is_dir():
        raise ConfigError(
            f"data.root: folder {root} not found (dataset {data.dataset}); see docs/isprs.md for the "
            "expected layout, or set data.root=/path/to/data"
        )
    try:
        layout = make_layout(data)
        return TileSet(layout, root, split, labels=labels, dsm=dsm_rule(data), cache=data.cache)  # type: ignore[arg-type]
    except DataError:
        raise
    except (ValueError, FileNotFoundError) as exc:  # unknown split, empty split, val tiles in the test set
        raise ConfigError(f"data ({data.dataset} in {root}): {exc}") from exc


# --------------------------------------------------------------------------- evaluation
@dataclass
class EvalResult:
    """Metrics (see :func:`~mmpeft_isprs.metrics.compute_metrics`), the matrix, and the table."""

    metrics: dict[str, Any]
    confusion: ConfusionMatrix
    table: str
    seconds: float


def evaluate_tileset(
    model: MFNet, tiles: TileSet, cfg: ExperimentConfig, *, stride: int | None = None,
    info: DistInfo | None = None, out_dir: str | Path | None = None, progress: bool = False,
) -> EvalResult:
    """Score ``model`` on every tile of ``tiles`` (sharded over ranks; one summed matrix).

    Args:
        model: the MFNet (not the DDP wrapper); put in eval mode here.
        tiles: a labelled TileSet (eroded labels for the ISPRS protocol).
        cfg: window (``model.img_size``), stride, mode, TTA, batch size and autocast.
        stride: overrides ``cfg.eval.stride`` (validation uses ``eval.val_stride``).
        info: rank and device (single CPU process when None).
        out_dir: also write each tile's index and colour maps there (each rank its own tiles).
    """
    info = info or DistInfo()
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    e, k = cfg.eval, model.config.num_classes
    names = list(tiles.layout.info.class_names)
    if len(names) != k:
        raise ConfigError(f"model.num_classes: the model predicts {k} classes, the data set has {len(names)}")
    run = model_fn(model, info.device, e.amp)
    cm = ConfusionMatrix(k, device="cpu")
    for i in shard(range(len(tiles)), info.rank, info.world_size):
        scores = sliding_window_predict(
            run, tiles.window_reader(i), k, window=model.config.size[0], stride=stride or e.stride,
            batch_size=e.batch_size, mode=e.mode, tta_flip=e.tta_flip, device=info.device,
            progress=progress,
        )  # fmt: skip
        pred = scores.argmax(0)
        cm.update(pred, tiles.load(i)[tiles.label_key])  # type: ignore[arg-type]
        if out_dir is not None:
            f = tiles.files(i)
            first = f.inputs[tiles.modality_names[0]]
            geo = first if first.suffix.lower() in (".tif", ".tiff") else None
            write_prediction(pred.numpy(), out_dir, f.tile_id.replace("/", "_"), tiles.layout.info, georef_from=geo)
    cm.all_reduce()
    model.train(was_training)
    metrics = compute_metrics(cm, names, tiles.layout.info.eval_classes)
    return EvalResult(metrics, cm, format_table(metrics, names), time.perf_counter() - t0)


def evaluate(
    cfg: ExperimentConfig, weights: str | Path, *, info: DistInfo | None = None, out_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> EvalResult:
    """The ``eval`` command: load ``weights``, score ``cfg.eval.split``, write JSON (rank 0).

    The model is the one stored in ``weights`` (its own MFNet config); ``model.checkpoint`` of
    ``cfg`` replaces the SAM path saved with it when set (e.g. the file moved).
    Outputs in ``out_dir`` (default ``<run_dir>/eval_<split>``): ``metrics.json`` and, with
    ``eval.save_predictions``, ``predictions/<tile>_pred.*`` and ``<tile>_colour.png``.
    """
    info = info or DistInfo()
    model, _ = load_trained(weights, info.device, checkpoint=cfg.model.checkpoint)
    if list(model.modalities) != list(cfg.model.modalities) and info.is_main:
        log(f"note: the weights use modalities {list(model.modalities)} (config: {cfg.model.modalities})")
    labels = cfg.eval.labels
    prepare_data_root(cfg.data, info)
    tiles = make_tileset(cfg.data, cfg.eval.split, labels=labels)
    out = Path(out_dir) if out_dir is not None else Path(cfg.train.run_dir) / f"eval_{cfg.eval.split}"
    preds = out / "predictions" if cfg.eval.save_predictions else None
    result = evaluate_tileset(model, tiles, cfg, info=info, out_dir=preds, progress=info.is_main and cfg.train.progress and sys.stderr.isatty())
    if info.is_main:
        protocol = {
            "split": cfg.eval.split, "tiles": tiles.ids, "labels": labels, "window": model.config.size[0],
            "stride": cfg.eval.stride, "mode": cfg.eval.mode, "tta_flip": cfg.eval.tta_flip,
            "world_size": info.world_size,
        }  # fmt: skip
        payload = {"weights": str(weights), "protocol": protocol, "seconds": result.seconds, **result.metrics}
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(payload, indent=1))
        log(f"{cfg.name}: {cfg.eval.split} split, {len(tiles)} tiles, stride {cfg.eval.stride}, {labels} labels")
        log(result.table)
        log(f"metrics written to {out / 'metrics.json'}")
    barrier()
    return result

