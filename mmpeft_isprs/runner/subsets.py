"""``mmpeft-isprs eval --subsets``: one trained model scored on every subset of its modalities."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ..config import ExperimentConfig
from ..datamodule import ISPRSDataModule
from ..distributed import DistInfo
from ..task import EvalResult, load_trained
from ..task.subsets import evaluate_subsets, format_subsets

__all__ = ["score_subsets"]


def score_subsets(
    cfg: ExperimentConfig, weights: str | Path, *, info: DistInfo | None = None, out_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, EvalResult]:
    """Load ``weights``, score ``cfg.eval.split`` with every modality subset, print the table and
    write ``subsets.json`` (rank 0) in ``out_dir`` (default ``<run_dir>/eval_<split>``)."""
    info = info or DistInfo()
    model, _ = load_trained(weights, info.device, checkpoint=cfg.model.checkpoint)
    tiles = ISPRSDataModule(cfg, info, log).tiles(cfg.eval.split, labels=cfg.eval.labels)
    results = evaluate_subsets(model, tiles, cfg, info=info, log=log)
    if info.is_main:
        log(f"{cfg.name}: {cfg.eval.split} split, {len(tiles)} tiles, every modality subset of one model")
        log(format_subsets(results))
        out = Path(out_dir) if out_dir is not None else Path(cfg.train.run_dir) / f"eval_{cfg.eval.split}"
        out.mkdir(parents=True, exist_ok=True)
        payload = {k: {n: r.metrics[n] for n in ("OA", "mF1", "mIoU", "F1", "IoU")} for k, r in results.items()}
        (out / "subsets.json").write_text(json.dumps({"weights": str(weights), "subsets": payload}, indent=1))
        log(f"subset metrics written to {out / 'subsets.json'}")
    return results
