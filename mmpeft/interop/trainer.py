"""Hugging Face's ``Trainer`` writing and reading mmpeft's adapter files (docs/peft.md, "Training
with the Trainer and accelerate").

The stock ``transformers.Trainer`` trains, evaluates, accumulates gradients exactly and resumes a
wrapped model as it is (:attr:`~mmpeft.MultimodalModel.accepts_loss_kwargs`, the forward's named
``pixel_values`` / ``labels``, the combined ``"loss"``: :mod:`mmpeft.runtime.labels`). What it
cannot do is save a model that is neither a ``PreTrainedModel`` nor a peft ``PeftModel`` other
than as the whole state dict (``model.safetensors``, frozen weights included), which
:func:`~mmpeft.load_multimodal` cannot read (no config). :class:`MultimodalTrainer` changes only
that, through the methods the Trainer calls to save and load weights: ``save_model`` and every
checkpoint write :meth:`~mmpeft.MultimodalModel.save_pretrained`'s files (trainable tensors and
config), and ``resume_from_checkpoint`` / ``load_best_model_at_end`` read the active set's back
into the model (a stock checkpoint with ``model.safetensors`` still loads as the stock Trainer
loads it). With ``label_smoothing_factor`` it smooths each modality's loss and averages them (the
stock Trainer reads ``outputs["logits"]``, which a multimodal output does not have: it stops
with that said). Importing this module imports ``transformers``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ..errors import MmpeftValueError
from ..model.io import CONFIG_NAME, read_adapter
from ..model.multimodal import MultimodalModel
from ..runtime.labels import computes_losses

__all__ = ["MultimodalTrainer", "checkpoint_sets"]

TRAINING_ARGS_NAME = "training_args.bin"  # the stock Trainer's name for the saved arguments


def checkpoint_sets(model: MultimodalModel, directory: str | os.PathLike) -> dict[str, Path]:
    """{set name: its folder} for every set of ``model`` saved in ``directory`` as
    :meth:`~mmpeft.MultimodalModel.save_pretrained` lays them out (``"default"`` in the folder
    itself, another set in ``directory/<name>``); empty when it holds no mmpeft files."""
    d = Path(directory)
    found = {n: d if n == "default" else d / n for n in model.adapters}
    return {n: p for n, p in found.items() if (p / CONFIG_NAME).is_file()}


class MultimodalTrainer(Trainer):
    """``transformers.Trainer`` whose checkpoints and ``save_model`` hold mmpeft's adapter files
    (module docstring); everything else is the stock Trainer's. A model that is not a
    :class:`~mmpeft.MultimodalModel` is saved and loaded as the stock Trainer does."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if self._wrapped() is not None and (self.is_fsdp_enabled or getattr(plugin, "zero_stage", 0) == 3):
            raise MmpeftValueError(
                "MultimodalTrainer saves the adapters from the model's own tensors, which FSDP / DeepSpeed ZeRO-3 "
                "shard across processes: train with DDP (or ZeRO-1/2), or use the stock Trainer and "
                "model.save_pretrained(directory) after gathering the model"
            )
        wrapped = self._wrapped()
        if self.label_smoother is not None and self.compute_loss_func is None and wrapped is not None:
            if not computes_losses(wrapped.base_model):
                raise MmpeftValueError(
                    "label_smoothing_factor: MultimodalTrainer smooths the losses of a Hugging Face "
                    f"*ForImageClassification head, not of {type(wrapped.base_model).__name__}: give "
                    "compute_loss_func= a loss over each modality's output instead"
                )
            self.compute_loss_func = self._smoothed_loss

    def _smoothed_loss(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        """``label_smoothing_factor``: the Trainer's ``LabelSmoother`` on each modality's logits,
        averaged over the modalities (as the model's ``"loss"`` averages their losses). Given as
        ``compute_loss_func``, so the Trainer normalises accumulated batches by
        ``num_items_in_batch`` as it does for its own smoothing."""
        assert self.label_smoother is not None
        # labels were taken out before the call: every entry is a modality's output (no combined loss)
        parts = [self.label_smoother(o, labels, num_items_in_batch=num_items_in_batch) for o in outputs.values()]
        return torch.stack(parts).mean()

    def _wrapped(self, model: nn.Module | None = None) -> MultimodalModel | None:
        found = self.accelerator.unwrap_model(self.model if model is None else model, keep_torch_compile=False)
        return found if isinstance(found, MultimodalModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None) -> None:
        """mmpeft's files (every set, :meth:`~mmpeft.MultimodalModel.save_pretrained`), the
        processing class if any and the training arguments, from the main process."""
        model = self._wrapped()
        if model is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        directory = output_dir if output_dir is not None else self.args.output_dir
        if directory is None:
            raise MmpeftValueError(
                "MultimodalTrainer.save_model: no output_dir given and none in the TrainingArguments"
            )
        model.save_pretrained(directory)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(directory)
        torch.save(self.args, os.path.join(directory, TRAINING_ARGS_NAME))
        return None

    def _load_sets(self, model: MultimodalModel, directory: str) -> bool:
        """Load the active set (the one that trains) as saved in ``directory`` (strict: the same
        keys and shapes); False when the folder holds no mmpeft files (a stock checkpoint)."""
        folder = checkpoint_sets(model, directory).get(model.active_adapter)
        if folder is None:
            return False
        model.load_trainable_state_dict(read_adapter(folder)[0])
        return True

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        wrapped = self._wrapped(model)
        if wrapped is None or not self._load_sets(wrapped, resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        wrapped = self._wrapped()
        best = self.state.best_model_checkpoint
        if wrapped is None or best is None or not self._load_sets(wrapped, best):
            super()._load_best_model()
