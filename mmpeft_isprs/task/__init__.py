"""The task layer: what a run optimises and how a model is scored (the torchgeo "trainer").

- :mod:`.segmentation`: :class:`SegmentationTask` (model, loss, optimiser, schedule, scaler,
  one training step, state for checkpoints);
- :mod:`.evaluation`: :func:`evaluate_tileset` (the evaluation step over whole tiles);
- :mod:`.weights`: trained weights with their experiment (:func:`save_trained`,
  :func:`read_weights`: the file read once, :func:`load_trained`).

Never imports the data module, the runner or a command (see docs/architecture.md).
"""

from .evaluation import EvalResult, evaluate_tileset
from .segmentation import SegmentationTask, build_model, make_optimizer, segmentation_loss
from .weights import EncoderFile, encoder_file, load_trained, read_weights, save_trained

__all__ = [
    "SegmentationTask",
    "build_model",
    "make_optimizer",
    "segmentation_loss",
    "EvalResult",
    "evaluate_tileset",
    "save_trained",
    "load_trained",
    "read_weights",
    "encoder_file",
    "EncoderFile",
]
