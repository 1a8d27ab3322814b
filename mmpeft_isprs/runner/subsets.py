"""``mmpeft-isprs eval --subsets``: the report of one trained model scored on every subset of its
modalities (the scoring itself is :func:`mmpeft_isprs.runner.score_weights`, the one eval path)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

from ..config import ExperimentConfig
from ..task import EvalResult
from ..task.subsets import format_subsets

__all__ = ["report_subsets"]


def report_subsets(
    out: Path,
    cfg: ExperimentConfig,
    weights: str,
    tiles: int,
    results: Mapping[str, EvalResult],
    log: Callable[[str], None] = print,
) -> None:
    """Print the subsets side by side and write ``out/subsets.json`` (rank 0): per subset OA, mF1,
    mIoU, per-class F1 and IoU, the classes left out as absent and the confusion matrix (rows: truth,
    columns: prediction, in the class order of ``"support"``), as ``metrics.json`` holds them."""
    log(f"{cfg.name}: {cfg.eval.split} split, {tiles} tiles, every modality subset of one model")
    log(format_subsets(results))
    out.mkdir(parents=True, exist_ok=True)
    keys = ("OA", "mF1", "mIoU", "F1", "IoU", "support", "absent", "confusion")
    payload = {k: {n: r.metrics[n] for n in keys if n in r.metrics} for k, r in results.items()}
    (out / "subsets.json").write_text(json.dumps({"weights": weights, "subsets": payload}, indent=1))
    log(f"subset metrics written to {out / 'subsets.json'}")
