"""The evaluation step: sliding-window scores of a model on whole tiles, one confusion matrix.

Evaluation follows the paper's protocol: every tile of the split is predicted with sliding
windows (:func:`~mmpeft_isprs.inference.sliding_window_predict`), all pixels go into one
confusion matrix (summed over ranks under torchrun), and OA (all classes), per-class F1/IoU and
mF1/mIoU (ISPRS: the 5 classes without clutter; MMHunan: all 7) are computed from it. ISPRS
tiles are scored on the eroded ("noBoundary") labels.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, ExperimentConfig
from ..data import TileSet, write_prediction
from ..distributed import DistInfo, shard
from ..inference import model_fn, sliding_window_predict, window_starts
from ..metrics import ConfusionMatrix, compute_metrics, format_table
from ..model import MFNet

__all__ = ["EvalResult", "evaluate_tileset", "eval_windows"]


@dataclass
class EvalResult:
    """Metrics (see :func:`~mmpeft_isprs.metrics.compute_metrics`), the matrix, and the table.

    ``subsets``: with ``eval --subsets``, the result of every modality subset ({"optical+dsm": ...,
    "optical": ..., "dsm": ...}; this result is the first, all modalities)."""

    metrics: dict[str, Any]
    confusion: ConfusionMatrix
    table: str
    seconds: float
    subsets: dict[str, EvalResult] | None = None


def eval_windows(tiles: TileSet, window: int, stride: int, info: DistInfo | None = None) -> int:
    """The sliding windows :func:`evaluate_tileset` scores on this rank (its shard of the tiles)."""
    info = info or DistInfo()
    shapes = [tiles.shape(i) for i in shard(range(len(tiles)), info.rank, info.world_size)]
    return sum(len(window_starts(h, window, stride)) * len(window_starts(w, window, stride)) for h, w in shapes)


def evaluate_tileset(
    model: MFNet,
    tiles: TileSet,
    cfg: ExperimentConfig,
    *,
    stride: int | None = None,
    info: DistInfo | None = None,
    out_dir: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Score ``model`` on every tile of ``tiles`` (sharded over ranks; one summed matrix).

    Args:
        model: the MFNet (not the DDP wrapper); put in eval mode here.
        tiles: a labelled TileSet (eroded labels for the ISPRS protocol).
        cfg: window (``model.img_size``), stride, mode, TTA, batch size and autocast.
        stride: overrides ``cfg.eval.stride`` (validation uses ``eval.val_stride``).
        info: rank and device (single CPU process when None).
        out_dir: also write each tile's index and colour maps there (each rank its own tiles).
        progress: called with the number of windows of every scored batch (progress lines,
            :class:`~mmpeft_isprs.runner.progress.EvalProgress`; :func:`eval_windows` is the total).
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
            run,
            tiles.window_reader(i),
            k,
            window=model.config.size[0],
            stride=stride or e.stride,
            batch_size=e.batch_size,
            mode=e.mode,
            tta_flip=e.tta_flip,
            device=info.device,
            on_batch=progress,
        )
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
