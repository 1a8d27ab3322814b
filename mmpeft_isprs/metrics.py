"""Segmentation metrics from one confusion matrix over all evaluated pixels (as the paper).

OA is computed over every class (clutter included, as the authors did); F1, precision,
recall and IoU per class; mF1 and mIoU average the ``eval_classes`` only (the 5 ISPRS classes
without clutter, all 7 for MMHunan); Cohen's kappa over all classes. A class with no pixel in
the ground truth and none predicted is *absent*: reported as such and left out of the means
(as mmsegmentation does), instead of entering them as IoU 0. Rows of the matrix are
the true class, columns the prediction. Everything returned is JSON-serialisable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .data.palette import IGNORE_INDEX


class ConfusionMatrix:
    """Accumulates a (K, K) int64 confusion matrix, ``mat[true, pred]``.

    Args:
        num_classes: K.
        ignore_index: target value left out (255).
        device: where the matrix lives (put it with the predictions to avoid copies).
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str = "cpu") -> None:
        if num_classes <= 0:
            raise ValueError(f"ConfusionMatrix: num_classes must be > 0, got {num_classes}")
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add pixels.

        Args:
            pred: (...) integer class predictions (e.g. argmax of (B, K, H, W) logits).
            target: (...) integer labels, same shape; ``ignore_index`` pixels are skipped.

        Raises:
            ValueError: shapes differ, or a prediction/label outside ``0..K-1``.
        """
        if pred.shape != target.shape:
            raise ValueError(f"ConfusionMatrix: pred {tuple(pred.shape)} vs target {tuple(target.shape)}")
        pred = pred.reshape(-1).to(self.mat.device, torch.int64)
        target = target.reshape(-1).to(self.mat.device, torch.int64)
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        k = self.num_classes
        if target.numel() and (target.min() < 0 or target.max() >= k):
            raise ValueError(f"ConfusionMatrix: labels outside 0..{k - 1} (and not {self.ignore_index})")
        if pred.numel() and (pred.min() < 0 or pred.max() >= k):
            raise ValueError(f"ConfusionMatrix: predictions outside 0..{k - 1}")
        self.mat += torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix of the same size (in place); returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError("ConfusionMatrix.merge: different numbers of classes")
        self.mat += other.mat.to(self.mat.device)
        return self

    def all_reduce(self, reduce_fn: Callable[[torch.Tensor], torch.Tensor | None] | None = None) -> ConfusionMatrix:
        """Sum the matrix over processes (in place); returns self.

        Args:
            reduce_fn: called with the matrix; it either sums in place and returns ``None`` or
                returns the summed tensor. ``None``: ``torch.distributed.all_reduce`` when a
                process group is initialised, else nothing to do.
        """
        if reduce_fn is None:
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(self.mat, op=dist.ReduceOp.SUM)
            return self
        result = reduce_fn(self.mat)
        if result is not None:
            self.mat = result.to(self.mat.device, torch.int64)
        return self


def compute_metrics(
    cm: ConfusionMatrix | torch.Tensor, class_names: Sequence[str], eval_classes: Sequence[int]
) -> dict[str, object]:
    """Metrics of a confusion matrix.

    Args:
        cm: a :class:`ConfusionMatrix` or a (K, K) tensor ``[true, pred]``.
        class_names: K names (keys of the per-class dicts).
        eval_classes: indices averaged by mF1/mIoU.

    Returns:
        ``{"OA", "mF1", "mIoU", "kappa", "pixels", "F1": {name: v}, "IoU": {...},
        "precision": {...}, "recall": {...}, "support": {name: pixels}, "eval_classes": [names
        averaged], "absent": [names], "confusion": [[...]]}``; values are floats in [0, 1]. A
        class never labelled nor predicted is listed in ``absent`` (its per-class values read
        0) and left out of mF1 and mIoU.
    """
    mat = (cm.mat if isinstance(cm, ConfusionMatrix) else cm).detach().to("cpu", torch.float64)
    k = mat.shape[0]
    if len(class_names) != k:
        raise ValueError(f"compute_metrics: {len(class_names)} names for {k} classes")
    tp = mat.diag()
    true, pred = mat.sum(1), mat.sum(0)
    total = mat.sum()
    div = lambda a, b: torch.where(b > 0, a / b.clamp(min=1e-300), torch.zeros_like(a))  # noqa: E731
    precision, recall = div(tp, pred), div(tp, true)
    f1 = div(2 * tp, true + pred)
    iou = div(tp, true + pred - tp)
    oa = float(div(tp.sum(), total))
    pe = float(div((true * pred).sum(), total * total))
    kappa = (oa - pe) / (1 - pe) if pe < 1 else 0.0
    absent = [i for i in range(k) if true[i] == 0 and pred[i] == 0]
    ev = [i for i in eval_classes if i not in absent] or list(eval_classes)
    named = lambda v: {class_names[i]: float(v[i]) for i in range(k)}  # noqa: E731
    return {
        "OA": oa,
        "mF1": float(f1[ev].mean()),
        "mIoU": float(iou[ev].mean()),
        "kappa": float(kappa),
        "pixels": int(total),
        "F1": named(f1),
        "IoU": named(iou),
        "precision": named(precision),
        "recall": named(recall),
        "support": {class_names[i]: int(true[i]) for i in range(k)},
        "eval_classes": [class_names[i] for i in ev],
        "absent": [class_names[i] for i in absent],
        "confusion": mat.to(torch.int64).tolist(),
    }


def format_table(metrics: dict[str, object], class_names: Sequence[str]) -> str:
    """Plain-text table: one row per class in the given (paper) order, then the means (in %)."""
    rows = [f"{'class':<22}{'F1':>8}{'IoU':>8}{'prec':>8}{'recall':>8}"]
    absent = list(metrics.get("absent", []))  # type: ignore[call-overload]
    for name in class_names:
        if name in absent:
            rows.append(f"{name:<22}  absent (no pixel labelled or predicted)")
            continue
        cells = [metrics[key][name] * 100 for key in ("F1", "IoU", "precision", "recall")]  # type: ignore[index]
        rows.append(f"{name:<22}" + "".join(f"{c:8.2f}" for c in cells))
    rows.append(
        f"OA {metrics['OA'] * 100:.2f}  mF1 {metrics['mF1'] * 100:.2f}  "  # type: ignore[operator]
        f"mIoU {metrics['mIoU'] * 100:.2f}  kappa {metrics['kappa'] * 100:.2f}  "  # type: ignore[operator]
        f"(means over {', '.join(metrics['eval_classes'])}"  # type: ignore[arg-type]
        + (f"; absent, left out: {', '.join(absent)})" if absent else ")")
    )
    return "\n".join(rows)


__all__ = ["ConfusionMatrix", "compute_metrics", "format_table"]
