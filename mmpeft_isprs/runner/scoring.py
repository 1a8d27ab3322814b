"""Scoring trained weights on a split of an experiment's data, with the results as files."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import ExperimentConfig
from ..datamodule import ISPRSDataModule
from ..distributed import DistInfo, barrier
from ..data import TileSet, read_image
from ..task import EvalResult, evaluate_tileset, load_trained

__all__ = ["score_weights"]


def score_weights(
    cfg: ExperimentConfig, weights: str | Path, *, info: DistInfo | None = None, out_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> EvalResult:
    """Load ``weights``, score ``cfg.eval.split``, write ``metrics.json`` (rank 0).

    The model is the one stored in ``weights`` (its own MFNet config); ``model.checkpoint`` of
    ``cfg`` replaces the SAM path saved with it when set (e.g. the file moved).
    Outputs in ``out_dir`` (default ``<run_dir>/eval_<split>``): ``metrics.json`` and, with
    ``eval.save_predictions``, ``predictions/<tile>_pred.*`` and ``<tile>_colour.png``.
    """
    info = info or DistInfo()
    model, _ = load_trained(weights, info.device, checkpoint=cfg.model.checkpoint)
    if list(model.modalities) != list(cfg.model.modalities) and info.is_main:
        log(f"note: the weights use modalities {list(model.modalities)} (config: {cfg.model.modalities})")
    e = cfg.eval
    tiles = ISPRSDataModule(cfg, info, log).tiles(e.split, labels=e.labels)
    out = Path(out_dir) if out_dir is not None else Path(cfg.train.run_dir) / f"eval_{e.split}"
    preds = out / "predictions" if e.save_predictions else None
    progress = info.is_main and cfg.train.progress and sys.stderr.isatty()
    result = evaluate_tileset(model, tiles, cfg, info=info, out_dir=preds, progress=progress)
    if info.is_main:
        protocol = {
            "split": e.split, "tiles": tiles.ids, "labels": e.labels, "window": model.config.size[0],
            "stride": e.stride, "mode": e.mode, "tta_flip": e.tta_flip, "world_size": info.world_size,
        }  # fmt: skip
        payload = {"weights": str(weights), "protocol": protocol, "seconds": result.seconds, **result.metrics}
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(payload, indent=1))
        log(f"{cfg.name}: {e.split} split, {len(tiles)} tiles, stride {e.stride}, {e.labels} labels")
        log(result.table)
        log(f"metrics written to {out / 'metrics.json'}")
        figures = draw_figures(out / "figures", tiles, preds, result, cfg.name)
        if figures:
            log(f"figures ({len(figures)}) in {out / 'figures'}: " + ", ".join(p.name for p in figures))
    barrier()
    return result


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
        optical, dsm = sample_panels(sample, tiles.modality_names)
        paths.append(tile_figure(out / f"tile_{stem}.png", f"{name}: tile {tile}", optical, dsm,
                                 np.asarray(sample[tiles.label_key]), read_image(pred_file), info))  # fmt: skip
    return paths
