"""Pictures of a run, drawn with matplotlib (the ``isprs`` extra) into ``<run>/figures``.

- :func:`tile_figure`: one evaluated tile side by side: every modality, ground truth, prediction
  and the error map, with the class legend;
- :func:`curves_figure`: training loss and validation mIoU per epoch (from ``log.csv``);
- :func:`confusion_figure`: the row-normalised confusion matrix with counts.

Only matplotlib's object API is used (no pyplot, no global state, no display needed).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data import IGNORE_INDEX, DatasetInfo, index_to_colour

__all__ = ["tile_figure", "curves_figure", "confusion_figure", "ERROR_COLOUR"]

ERROR_COLOUR = (220, 20, 60)  # wrong pixels in the error map; right ones grey, ignored ones black


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _display(arr: Any) -> np.ndarray:
    """(H, W), (H, W, C) or (C, H, W) to an image in [0, 1] (first three bands, per-band stretch)."""
    a = np.asarray(arr, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] <= 16 and a.shape[-1] > 16:
        a = a.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    if a.ndim == 3:
        a = a[..., :3] if a.shape[-1] >= 3 else a[..., 0]
    lo, hi = np.nanpercentile(a, 1), np.nanpercentile(a, 99)
    return np.clip((a - lo) / max(float(hi - lo), 1e-6), 0, 1)


def tile_figure(
    path: Path,
    title: str,
    optical: Any,
    dsm: Any | None,
    truth: np.ndarray,
    pred: np.ndarray,
    info: DatasetInfo,
    elevation: Sequence[str] = ("dsm",),
) -> Path:
    """Every input | ground truth | prediction | errors, with the class legend; returns ``path``.

    ``optical``: a mapping ``{modality: array}`` (one panel per modality, in order; those named in
    ``elevation`` drawn with a terrain colour map, other single bands in grey; ``dsm`` unused),
    or the optical array with the DSM (or None) in ``dsm``."""
    from matplotlib.patches import Patch

    truth, pred = np.asarray(truth), np.asarray(pred)
    valid = truth != IGNORE_INDEX
    errors = np.full((*truth.shape, 3), 128, np.uint8)
    errors[valid & (truth != pred)] = ERROR_COLOUR
    errors[~valid] = 0
    shown = np.where(valid, truth, 0)
    truth_rgb = index_to_colour(shown.astype(np.uint8), info)
    truth_rgb[~valid] = 0
    panels = _input_panels(
        optical if isinstance(optical, Mapping) else {"input": optical, "DSM": dsm}, (*elevation, "DSM")
    )
    panels += [
        ("ground truth", truth_rgb, None),
        ("prediction", index_to_colour(pred.astype(np.uint8), info), None),
        (f"errors ({100 * float((truth != pred)[valid].mean() if valid.any() else 0):.1f}%)", errors, None),
    ]
    fig = _figure(3.2 * len(panels), 4.2)
    for i, (name, img, cmap) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.set_title(name)
        ax.axis("off")
        if img is not None:
            ax.imshow(img, cmap=cmap, interpolation="nearest")
    colours = [*(np.array(c) / 255 for c in info.palette), np.array(ERROR_COLOUR) / 255, "black"]
    handles = [
        Patch(facecolor=c, edgecolor="black", linewidth=0.5, label=n)
        for n, c in zip([*info.class_names, "error", "ignored"], colours)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=8)
    fig.suptitle(title)
    fig.subplots_adjust(bottom=0.12, top=0.85, wspace=0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def curves_figure(path: Path, log_csv: Path) -> Path | None:
    """Training loss and validation mIoU (%) per epoch from ``log.csv``; None when it is empty."""
    rows = list(csv.DictReader(log_csv.open())) if log_csv.is_file() else []
    if not rows:
        return None
    epochs = [int(r["epoch"]) for r in rows]
    fig = _figure(9, 3.6)
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(epochs, [float(r["train_loss"]) for r in rows], marker="o", label="training loss")
    ax.set(xlabel="epoch", ylabel="loss", title="training loss")
    ax.legend()
    ax = fig.add_subplot(1, 2, 2)
    val = [(int(r["epoch"]), float(r["val_mIoU"]) * 100) for r in rows if r.get("val_mIoU")]
    ax.plot([e for e, _ in val], [v for _, v in val], marker="o", color="tab:green", label="validation mIoU")
    ax.set(xlabel="epoch", ylabel="mIoU (%)", title="validation mIoU")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def confusion_figure(path: Path, matrix: Any, class_names: Sequence[str], title: str) -> Path:
    """Rows (ground truth) normalised to 100%, counts in the cells; returns ``path``."""
    m = np.asarray(matrix, dtype=np.float64)
    share = 100 * m / np.maximum(m.sum(1, keepdims=True), 1)
    k = len(class_names)
    fig = _figure(1.1 * k + 3, 1.0 * k + 2)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=100)
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                f"{share[i, j]:.0f}%\n{int(m[i, j])}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if share[i, j] > 60 else "black",
            )
    ax.set_xticks(range(k), class_names, rotation=40, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set(xlabel="prediction", ylabel="ground truth", title=title)
    fig.colorbar(im, ax=ax, label="% of the row")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _input_panels(inputs: Mapping[str, Any], elevation: Sequence[str]) -> list[tuple[str, Any, str | None]]:
    """One (title, image, colour map) per input: elevation in terrain colours, single bands in grey."""
    panels = []
    for name, arr in inputs.items():
        img = _display(arr) if arr is not None else None
        cmap = "terrain" if name in elevation else ("gray" if img is not None and img.ndim == 2 else None)
        panels.append((name, img, cmap))
    return panels


def sample_panels(sample: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """Every modality of a tile sample with modalities ``names``, in order, as (H, W, C) arrays."""
    return {n: np.moveaxis(np.asarray(sample[n]), 0, -1) for n in names if n in sample}
