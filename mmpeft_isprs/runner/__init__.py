"""The runner layer: the loops that drive a task on a data module (what Lightning's Trainer does for torchgeo).

- :mod:`.trainer`: :func:`fit` / :class:`Trainer` (epochs, validation, best and last weights);
- :mod:`.checkpoint`: ``last.pt`` (resume bit for bit), :class:`TrainState`;
- :mod:`.logs`: ``log.csv``, per-epoch metrics, TensorBoard, the run summary, ``train.log`` / ``eval.log`` (:class:`~.logs.TextLog`);
- :mod:`.scoring`: :func:`score_weights` (trained weights on a split, ``metrics.json``, one folder per protocol).

Commands compose these; the runner never imports a command (see docs/architecture.md).
"""

from .checkpoint import BEST, CHECKPOINT, LAST_WEIGHTS, TrainState, load_checkpoint
from .scoring import score_weights
from .trainer import Trainer, TrainResult, fit

__all__ = [
    "fit",
    "Trainer",
    "TrainResult",
    "TrainState",
    "score_weights",
    "load_checkpoint",
    "CHECKPOINT",
    "BEST",
    "LAST_WEIGHTS",
]
