"""The segmentation task: model, loss, optimiser, LR schedule and one training step.

The published protocol by default: plain cross-entropy ignoring label 255 (summed over the
valid pixels, divided by their count), SGD (lr 0.01, momentum 0.9, weight decay 5e-4) on every
trainable tensor, LR x0.1 at epochs 25, 35 and 45. The loop that calls :meth:`training_step`
lives in :mod:`mmpeft_isprs.runner`; the data in :mod:`mmpeft_isprs.datamodule`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ..config import ConfigError, ExperimentConfig, TrainConfig
from ..data import IGNORE_INDEX, TileSet
from ..distributed import DistInfo
from ..inference import autocast
from ..model import MFNet, build_mfnet
from .evaluation import EvalResult, evaluate_tileset
from .subsets import TrainingPresence
from .weights import save_trained

__all__ = ["SegmentationTask", "build_model", "make_optimizer", "segmentation_loss"]


def build_model(cfg: ExperimentConfig, device: torch.device) -> MFNet:
    """The MFNet of ``cfg.model`` on ``device``; a random frozen encoder is a function of ``train.seed``."""
    torch.manual_seed(cfg.train.seed)
    try:
        model = build_mfnet(cfg.model).to(device)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"model: {exc}") from exc
    model.compile_for(device)
    return model


def make_optimizer(t: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """SGD (the paper) or AdamW over ``params`` with the ``train`` section's settings."""
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, foreach=True)
    # foreach: a few multi-tensor kernels per step instead of a few per parameter (PyTorch's
    # default on CUDA only); same update
    return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, foreach=True)


def segmentation_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (B, K, H, W) against mask (B, H, W), label 255 ignored, mean over valid pixels."""
    valid = (mask != IGNORE_INDEX).sum().clamp(min=1)
    return F.cross_entropy(logits.float(), mask, ignore_index=IGNORE_INDEX, reduction="sum") / valid


class SegmentationTask:
    """What one run optimises, on one process.

    Attributes:
        model: the :class:`MFNet` (saved, evaluated).
        net: what the training step calls: ``model``, or its DDP wrapper on several processes.
        optimizer, scheduler, scaler: SGD/AdamW, MultiStepLR (stepped once per epoch), GradScaler
            (active for fp16 only).
    """

    def __init__(self, cfg: ExperimentConfig, info: DistInfo) -> None:
        t = cfg.train
        self.cfg, self.device = cfg, info.device
        if t.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("train.amp: fp16 needs a CUDA device (GradScaler); use bf16 on CPU")
        self.model = build_model(cfg, self.device)
        self.presence = TrainingPresence(cfg, self.model, info.rank)  # modality dropout, NaN check (CPU)
        self.net: torch.nn.Module = self.model
        if info.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.net = self.model.compiled(self.net, self.device)  # model.compile "model" / "model-ro"
        self.optimizer = make_optimizer(t, [p for p in self.model.parameters() if p.requires_grad])
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(t.milestones), t.gamma)
        self.scaler = torch.amp.GradScaler("cuda", enabled=t.amp == "fp16")

    @property
    def lr(self) -> float:
        """The current learning rate."""
        return float(self.optimizer.param_groups[0]["lr"])

    def training_step(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """One optimiser step on ``batch`` ({modality: (B, C, H, W), "mask": (B, H, W)}).

        Returns the loss as a 0-dim tensor on the model's device, not a number: reading it waits
        for the device, so the step itself never does (the host queues the next step while the
        GPU computes this one); the runner reads the losses when it logs."""
        presence = self.presence(batch)  # {modality: (B,) bool} or None
        inputs = {m: batch[m].to(self.device, non_blocking=True) for m in self.model.modalities}
        mask = batch["mask"].to(self.device, non_blocking=True)
        self.net.train()
        with autocast(self.cfg.train.amp, self.device):
            logits = self.net(inputs, presence=presence)  # (B, K, H, W)
        loss = segmentation_loss(logits, mask)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    def evaluation_step(self, tiles: TileSet, info: DistInfo, stride: int | None = None) -> EvalResult:
        """Sliding-window scores of the model on every tile of ``tiles`` (validation)."""
        return evaluate_tileset(self.model, tiles, self.cfg, stride=stride, info=info)

    def end_epoch(self) -> None:
        """Advance the LR schedule by one epoch."""
        self.scheduler.step()

    def state_dict(self) -> dict[str, Any]:
        """Trainable tensors (on CPU), optimiser, scheduler and scaler states."""
        return {
            "model": {k: v.detach().cpu().clone() for k, v in self.model.trainable_state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.model.load_trainable_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def save_weights(self, path: Path, epoch: int, metrics: Mapping[str, Any] | None) -> None:
        """Write the trainable tensors and the experiment to ``path`` (see :func:`save_trained`)."""
        save_trained(self.model, path, self.cfg, epoch, metrics)
