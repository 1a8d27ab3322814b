"""Scoring trained weights on a split of an experiment's data, with the results as files."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

from ..config import ExperimentConfig
from ..datamodule import ISPRSDataModule
from ..distributed import DistInfo, barrier
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
    barrier()
    return result
