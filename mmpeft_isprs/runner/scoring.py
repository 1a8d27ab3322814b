"""Scoring trained weights on a split of an experiment's data, with the results as files: the one
evaluation path of ``mmpeft-isprs eval`` (``--subsets`` included) and of the demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import ExperimentConfig
from ..data import TileSet, read_image
from ..datamodule import ISPRSDataModule
from ..distributed import DistInfo, barrier
from ..model import MFNetFile
from ..task import EvalResult, load_trained, read_weights
from ..task.evaluation import eval_windows
from ..task.subsets import evaluate_subsets, modality_subsets
from .progress import EvalProgress
from .subsets import report_subsets

__all__ = ["score_weights"]


def score_weights(
    cfg: ExperimentConfig, weights: str | Path | MFNetFile, *, subsets: bool = False, info: DistInfo | None = None,
    out_dir: str | Path | None = None, log: Callable[[str], None] = print,
) -> EvalResult:
    """Load ``weights``, score ``cfg.eval.split``, write ``metrics.json`` (rank 0).

    ``weights``: a path, or the file already read (:func:`~mmpeft_isprs.task.read_weights`): it is
    opened once. The model is the one stored in ``weights`` (its own MFNet config);
    ``model.checkpoint`` of ``cfg`` replaces the SAM path saved with it when set (e.g. the file
    moved). ``subsets``: also score every non-empty subset of the model's modalities, print them
    side by side and write ``subsets.json`` (the result's ``subsets``). Progress lines (windows
    done / total, elapsed, ETA) go to ``log`` while it runs.
    Outputs in ``out_dir`` (default ``<run_dir>/eval_<split>``): ``metrics.json`` and, with
    ``eval.save_predictions``, ``predictions/<tile>_pred.*`` and ``<tile>_colour.png``.
    """
    info = info or DistInfo()
    stored = weights if isinstance(weights, MFNetFile) else read_weights(weights)
    model, _ = load_trained(stored, info.device, checkpoint=cfg.model.checkpoint)
    if list(model.modalities) != list(cfg.model.modalities) and info.is_main:
        log(f"note: the weights use modalities {list(model.modalities)} (config: {cfg.model.modalities})")
    e = cfg.eval
    tiles = ISPRSDataModule(cfg, info, log).tiles(e.split, labels=e.labels)
    out = Path(out_dir) if out_dir is not None else Path(cfg.train.run_dir) / f"eval_{e.split}"
    preds = out / "predictions" if e.save_predictions else None
    runs = modality_subsets(model.modalities) if subsets else [tuple(model.modalities)]
    progress = None
    if info.is_main:
        windows = eval_windows(tiles, model.config.size[0], e.stride, info) * len(runs)
        log(f"{cfg.name}: scoring {e.split} split, {len(tiles)} tiles, {windows} windows"
            + (f" ({len(runs)} modality subsets)" if subsets else ""))  # fmt: skip
        progress = EvalProgress(log, windows)
    results = evaluate_subsets(model, tiles, cfg, info=info, subsets=runs, out_dir=preds, progress=progress,
                               log=log if subsets else None)  # fmt: skip
    result = next(iter(results.values()))
    if info.is_main:
        _write_metrics(out, cfg, str(stored.path), tiles, model.config.size[0], result, info, log)
        figures = draw_figures(out / "figures", tiles, preds, result, cfg.name)
        if figures:
            log(f"figures ({len(figures)}) in {out / 'figures'}: " + ", ".join(p.name for p in figures))
        if subsets:
            report_subsets(out, cfg, str(stored.path), len(tiles), results, log)
    barrier()
    if subsets:
        result.subsets = results
    return result


def _write_metrics(out: Path, cfg: ExperimentConfig, weights: str, tiles: TileSet, window: int, result: EvalResult,
                   info: DistInfo, log: Callable[[str], None]) -> None:  # fmt: skip
    e = cfg.eval
    protocol = {
        "split": e.split, "tiles": tiles.ids, "labels": e.labels, "window": window,
        "stride": e.stride, "mode": e.mode, "tta_flip": e.tta_flip, "world_size": info.world_size,
    }  # fmt: skip
    payload = {"weights": weights, "protocol": protocol, "seconds": result.seconds, **result.metrics}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(payload, indent=1))
    log(f"{cfg.name}: {e.split} split, {len(tiles)} tiles, stride {e.stride}, {e.labels} labels")
    log(result.table)
    log(f"metrics written to {out / 'metrics.json'}")


def draw_figures(out: Path, tiles: TileSet, preds: Path | None, result: EvalResult, name: str) -> list[Path]:
    """The confusion-matrix figure and, when predictions were written, one side-by-side figure per tile."""
    try:
        from .figures import confusion_figure, sample_panels, tile_figure
    except ImportError:  # matplotlib: pip install matplotlib (part of the isprs extra)
        return []
    info = tiles.layout.info
    paths = [confusion_figure(out / "confusion.png", result.confusion.mat.cpu().numpy(), info.class_names,
                              f"{name}: confusion matrix")]  # fmt: skip
    for i, tile in enumerate(tiles.ids if preds is not None else []):
        stem = tile.replace("/", "_")
        pred_file = next(iter(sorted(preds.glob(f"{stem}_pred.*"))), None)  # type: ignore[union-attr]
        if pred_file is None:
            continue
        sample = tiles.load(i)
        elevation = [m.name for m in tiles.modalities if m.kind == "elevation"]
        paths.append(tile_figure(out / f"tile_{stem}.png", f"{name}: tile {tile}", sample_panels(sample, tiles.modality_names),
                                 None, np.asarray(sample[tiles.label_key]), read_image(pred_file), info, elevation))  # fmt: skip
    return paths
