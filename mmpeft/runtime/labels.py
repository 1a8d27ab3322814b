"""``labels=`` for Hugging Face heads: each modality's output carries its own loss.

A Hugging Face ``*ForImageClassification`` model computes ``loss = self.loss_function(labels,
logits, self.config)`` inside its forward. Called on the stacked batch its logits are (M*B, C)
while the labels are (B,), so the wrapped model takes ``labels`` out of the call, runs the model
once on the stacked batch, and gives each modality's output the loss of its own logits with the
same ``loss_function``: what the plain model returns for that modality alone. Other heads that
take ``labels`` (semantic segmentation: upsampled logits, ignore index, auxiliary heads, each
model its own) compute their loss inline; they are refused, naming how to compute the loss from
each modality's ``logits``.

With a dict input the output is a :class:`MultimodalOutput`: ``{"loss": combined, modality:
output, ...}``, the combined loss the mean of the present modalities' losses (what Hugging Face's
``Trainer`` reads as ``outputs["loss"]``). ``num_items_in_batch=`` (the Trainer's count of labels
over the accumulated batches) reaches each modality's ``loss_function`` as it reaches the plain
model's, so each modality's loss is its label sum over that count and gradient accumulation is
exact (:attr:`~mmpeft.MultimodalModel.accepts_loss_kwargs`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import MmpeftKeyError, MmpeftTypeError, MmpeftValueError

__all__ = [
    "LOSS_KWARGS",
    "Labels",
    "MultimodalOutput",
    "computes_losses",
    "take_labels",
    "check_presence",
    "with_losses",
    "as_output",
]

#: keyword arguments of a Hugging Face forward that go to its loss, not to the model
LOSS_KWARGS = ("num_items_in_batch",)


def _takes_labels(fn: Any) -> bool:
    try:
        return "labels" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForImageClassification") and hasattr(type(model), "loss_function")


def _hugging_face(model: nn.Module) -> bool:
    return any(c.__module__.split(".")[0] == "transformers" for c in type(model).__mro__)


def computes_losses(model: nn.Module) -> bool:
    """True when mmpeft computes ``model``'s loss per modality (a Hugging Face ``*ForImageClassification``)."""
    return _hugging_face(model) and _classifier(model)


@dataclass
class Labels:
    """The labels taken out of a call and the loss keyword arguments that came with them."""

    labels: Any
    loss_kwargs: dict[str, Any] = field(default_factory=dict)


class MultimodalOutput(dict[str, Any]):
    """``{"loss": the mean of the modalities' losses, modality: its output, ...}`` (a dict, as a
    Hugging Face ``ModelOutput`` is one, the loss first): ``out.loss``, ``out["loss"]``,
    ``out["optical"].loss``; :meth:`outputs` the per-modality part."""

    @property
    def loss(self) -> torch.Tensor:
        return self["loss"]

    def outputs(self) -> dict[str, Any]:
        """``{modality: output}`` without the combined loss."""
        return {k: v for k, v in self.items() if k != "loss"}

    def __missing__(self, key: str) -> Any:
        hint = ""
        if key == "logits":  # the stock Trainer's label smoothing reads outputs["logits"]
            hint = (
                ": each modality has its own (out[modality].logits). For the Trainer's label_smoothing_factor "
                "use mmpeft.interop.trainer.MultimodalTrainer, which smooths each modality's loss"
            )
        raise MmpeftKeyError(f"{key!r} is not in this multimodal output (keys {list(self)}){hint}")


def take_labels(model: nn.Module, fn: Any, kwargs: dict[str, Any]) -> Labels | None:
    """Pop ``labels`` (and :data:`LOSS_KWARGS`) from ``kwargs`` when ``fn`` (a method of the
    Hugging Face ``model``) takes them; None when not given (or another model: they go to it
    unchanged). A head whose loss cannot be computed per modality is an error naming the way."""
    if kwargs.get("labels") is None or not _hugging_face(model) or not _takes_labels(fn):
        return None
    name = type(model).__name__
    if not _classifier(model):
        raise MmpeftValueError(
            f"labels= with {name}: its forward computes the loss from the logits of the whole stacked batch "
            "((M*B, ...) against labels of B samples), and mmpeft computes per-modality losses only for "
            "Hugging Face *ForImageClassification heads. Call without labels= and compute each modality's loss "
            "from its logits, e.g. for semantic segmentation: out = model(pixel_values=x); loss = sum("
            "transformers.loss.loss_utils.ForSemanticSegmentationLoss(o.logits, labels, "
            "ignore_index=model.base_model.config.semantic_loss_ignore_index) for o in out.values())"
        )
    return Labels(kwargs.pop("labels"), {k: kwargs.pop(k) for k in LOSS_KWARGS if k in kwargs})


def check_presence(labels: Any, mask: Any, names: Sequence[str] = ()) -> None:
    """``labels`` with a per-sample presence mask (``presence=`` or ``nonfinite="absent"``) is an
    error; so is a modality named ``"loss"`` among ``names`` (the combined loss's key)."""
    if labels is not None and "loss" in names:
        raise MmpeftValueError(
            "labels= with a modality named 'loss': the output's 'loss' entry is the combined loss; "
            "rename the modality (e.g. 'loss_image')"
        )
    if labels is not None and mask is not None:
        raise MmpeftValueError(
            "labels= with a presence mask: the head's loss is a mean over every sample, absent ones included. "
            "Call without labels= and compute the loss of each modality's logits over its present samples"
        )


def _with_loss(model: nn.Module, out: Any, labels: Labels) -> Any:
    if not isinstance(out, Mapping) or out.get("logits") is None:
        raise MmpeftTypeError(
            f"{type(model).__name__} returned {type(out).__name__} without logits; cannot add its loss"
        )
    loss = model.loss_function(labels.labels, out["logits"], model.config, **labels.loss_kwargs)  # type: ignore[operator]
    n = labels.loss_kwargs.get("num_items_in_batch")
    if n is not None and getattr(model.config, "problem_type", None) != "single_label_classification":
        # transformers' regression / multi-label losses are means over this micro-batch and ignore
        # num_items_in_batch (the Trainer then divides by nothing: accumulation off by its factor, the
        # plain model's too): as a sum over the accumulated count, as the single-label loss is
        loss = loss * (labels.labels.numel() / n)
    fields = {"loss": loss, **{k: v for k, v in out.items() if k != "loss"}}
    return type(out)(**fields)


def as_output(model: nn.Module, outputs: Any) -> Any:
    """A dict of a Hugging Face classifier's outputs as a :class:`MultimodalOutput` (whose missing
    ``"logits"`` names where each modality's are); anything else as it is."""
    if not isinstance(outputs, dict) or "loss" in outputs or not computes_losses(model):
        return outputs  # a modality named "loss" stays a plain dict: MultimodalOutput reads "loss" as the combined loss
    return MultimodalOutput(outputs)


def with_losses(model: nn.Module, outputs: Any, labels: Labels) -> Any:
    """Each modality's output with its ``loss`` from its own logits: a :class:`MultimodalOutput`
    (with the mean loss) for a dict of outputs, a list for a list."""
    if isinstance(outputs, dict):
        per = {m: _with_loss(model, o, labels) for m, o in outputs.items()}
        return MultimodalOutput(loss=torch.stack([o.loss for o in per.values()]).mean(), **per)
    return [_with_loss(model, o, labels) for o in outputs]
