"""Training of an MFNet from an :class:`~mmpeft_isprs.config.ExperimentConfig`.

The published protocol by default: every step draws random 256x256 crops of random training
tiles (a pure function of ``(seed, epoch, index)``, so any rank, worker or resumed run gets
the same crop for the same index), joint flips, plain cross-entropy ignoring label 255, SGD
(lr 0.01, momentum 0.9, weight decay 5e-4) with the LR x0.1 at epochs 25, 35 and 45.

Beyond the paper: the best epoch is chosen on a validation split (never the test set) and
saved as ``best.safetensors``; ``last.pt`` holds everything needed to continue (trainable
tensors, optimizer, scheduler, counters, every rank's RNG states, config), written atomically
at every epoch end and every ``checkpoint_every`` steps; a resumed run reaches the same weights
as an uninterrupted one, bit for bit on CPU.

Files in ``run_dir``: ``config.yaml``, ``log.csv`` (one row per epoch), ``metrics/epoch_NNN.json``
(per-class validation metrics), ``last.pt``, ``last.safetensors``, ``best.safetensors``, and
TensorBoard events when TensorBoard is installed.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from mmpeft.io import atomic_write

from .config import ConfigError, ExperimentConfig
from .data import IGNORE_INDEX, JointFlipRotate, RandomCropDataset, TileSet
from .distributed import DistInfo, all_gather_object, barrier, init_distributed, sum_tensor
from .evaluate import evaluate_tileset, make_tileset, prepare_data_root, split_ids
from .model import MFNet, build_mfnet, save_mfnet
from .predict import autocast

__all__ = ["train", "TrainResult", "TrainState", "CHECKPOINT", "BEST", "load_checkpoint", "EpochBatchSampler"]

CHECKPOINT = "last.pt"
BEST = "best.safetensors"
LAST_WEIGHTS = "last.safetensors"
FORMAT = "mmpeft_isprs.train/1"
RESUMABLE_CHANGES = (  # config fields that may differ when a run is resumed
    "train.resume", "train.epochs", "train.num_workers", "train.device", "train.threads", "train.progress",
    "train.tensorboard", "train.val_every", "train.checkpoint_every", "data.root", "data.cache", "model.checkpoint",
)  # fmt: skip
CSV_FIELDS = ("epoch", "step", "lr", "train_loss", "val_OA", "val_mF1", "val_mIoU", "best_epoch", "seconds", "images_per_s")


@dataclass
class TrainState:
    """Counters that locate a run: ``epoch`` (0-based) and ``batch`` (within it) come next."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best_miou: float = -1.0
    best_epoch: int = 0
    loss_sum: float = 0.0  # of the current epoch's steps so far (rank-local; per rank in last.pt)
    seconds: float = 0.0  # training time of the current epoch so far


@dataclass
class TrainResult:
    """Where the run wrote its files and how it ended."""

    run_dir: Path
    best: Path
    last: Path
    state: TrainState
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = True


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches ``start..batches-1`` of one epoch; this rank's share of each global batch.

    Global batch ``b`` holds dataset items ``b*B .. b*B+B-1`` (B = global batch size); rank
    ``r`` of ``W`` takes the contiguous slice ``r*B/W .. (r+1)*B/W - 1``. Indices are
    ``(epoch, item)`` pairs, so workers need no ``set_epoch``. Skipping consumed batches on
    resume is exact because items depend only on (seed, epoch, index).
    """

    def __init__(self, epoch: int, start: int, batches: int, batch_size: int, rank: int = 0, world: int = 1) -> None:
        if batch_size % world:
            raise ConfigError(f"train.batch_size {batch_size} must be divisible by the number of processes ({world})")
        self.epoch, self.start, self.batches = epoch, start, batches
        self.global_bs, self.per_rank, self.rank = batch_size, batch_size // world, rank

    def __len__(self) -> int:
        return self.batches - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b in range(self.start, self.batches):
            first = b * self.global_bs + self.rank * self.per_rank
            yield [(self.epoch, first + j) for j in range(self.per_rank)]


# --------------------------------------------------------------------------- RNG and checkpoints
def _rng_state(device: torch.device) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k not in ("stems", "folders", "modalities") else {f"{prefix}{k}": v})
    return out


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a ``last.pt`` (tensors only, no code: ``weights_only``)."""
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} not found (train once without --resume first)")
    ckpt = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a training checkpoint written by mmpeft-isprs train")
    return ckpt


def _check_resumable(saved: dict[str, Any], cfg: ExperimentConfig, path: Path) -> None:
    old, new = _flat(saved), _flat(cfg.to_dict())
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES]
    if diff:
        listing = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
        raise ConfigError(f"cannot resume {path}: the config differs from the run's ({listing}); only {', '.join(RESUMABLE_CHANGES)} may change")


def _ids(ids: list[str], show: int = 8) -> str:
    return " ".join(ids[:show]) + (f" ... ({len(ids)} tiles)" if len(ids) > show else "")


# --------------------------------------------------------------------------- the trainer
class _Trainer:
    """One run: data, model, optimizer and the loop (a class only to share the state)."""

    def __init__(self, cfg: ExperimentConfig, info: DistInfo, log: Callable[[str], None]) -> None:
        self.cfg, self.info, self.log = cfg, info, log
        t = cfg.train
        self.run_dir = Path(t.run_dir)
        self.device = info.device
        if t.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("train.amp: fp16 needs a CUDA device (GradScaler); use bf16 on CPU")
        resume_ckpt = self._resume_checkpoint()
        self.train_tiles, self.val_tiles = self._data()  # validated before anything is built
        torch.manual_seed(t.seed)  # the random frozen encoder (no SAM file) is a function of the seed
        model_cfg = dataclasses.replace(cfg.model, grad_checkpointing=cfg.model.grad_checkpointing or t.grad_checkpointing)
        try:
            self.model: MFNet = build_mfnet(model_cfg).to(self.device)
        except (ValueError, FileNotFoundError) as exc:
            raise ConfigError(f"model: {exc}") from exc
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.net: torch.nn.Module = self.model
        if info.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = self._optimizer(params)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(t.milestones), t.gamma)
        self.scaler = torch.amp.GradScaler("cuda", enabled=t.amp == "fp16")
        self.state = TrainState()
        torch.manual_seed(t.seed * 1_000_003 + 1 + info.rank)  # dropout: distinct per rank
        np.random.seed((t.seed * 1_000_003 + info.rank) % 2**32)
        random.seed(t.seed * 1_000_003 + info.rank)
        if resume_ckpt is not None:
            self._restore(resume_ckpt)
        self.dataset = RandomCropDataset(
            self.train_tiles, crop_size=cfg.crop_size, samples_per_epoch=t.batches_per_epoch * t.batch_size,
            seed=t.seed, transforms=JointFlipRotate(hflip=t.flips, vflip=t.flips, rot90=t.rotations),
            tile_weights=cfg.data.tile_weights,
        )  # fmt: skip
        self.writer = self._tensorboard()

    # ---------------------------------------------------------------- setup
    def _resume_checkpoint(self) -> dict[str, Any] | None:
        path = self.run_dir / CHECKPOINT
        if self.cfg.train.resume:
            ckpt = load_checkpoint(path, "cpu")
            _check_resumable(ckpt["config"], self.cfg, path)
            if len(ckpt["rng"]) != self.info.world_size:
                raise ConfigError(f"{path} was written by {len(ckpt['rng'])} process(es); resume it with as many (now {self.info.world_size})")
            return ckpt
        if path.exists():
            raise ConfigError(
                f"{self.run_dir} already holds {CHECKPOINT} from an earlier run: add --resume (train.resume=true) "
                "to continue it, or choose another train.run_dir"
            )
        return None

    def _data(self) -> tuple[TileSet, TileSet | None]:
        d, e = self.cfg.data, self.cfg.eval
        prepare_data_root(d, self.info)
        train = make_tileset(d, "train", labels="full")
        val = make_tileset(d, "val", labels=e.labels) if split_ids(d, "val") else None
        if val is None and self.info.is_main:
            self.log("note: no validation split (data.val_ids / data.val_fraction); best.safetensors = last epoch")
        return train, val

    def _optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        t = self.cfg.train
        if t.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)

    def _tensorboard(self) -> Any:
        if not (self.cfg.train.tensorboard and self.info.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # TensorBoard is optional
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    # ---------------------------------------------------------------- checkpoints
    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_trainable_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(**ckpt["state"])
        rngs = ckpt["rng"]
        _set_rng_state(rngs[self.info.rank], self.device)
        self.state.loss_sum = float(rngs[self.info.rank]["loss_sum"])  # this rank's own
        if self.info.is_main:
            s = self.state
            self.log(f"resuming {self.run_dir / CHECKPOINT}: epoch {s.epoch + 1}, batch {s.batch}, step {s.step}")

    def _save(self) -> None:
        """Write ``last.pt`` atomically (rank 0; every rank's RNG state gathered)."""
        rngs = all_gather_object({**_rng_state(self.device), "loss_sum": self.state.loss_sum})
        if self.info.is_main:
            ckpt = {
                "format": FORMAT, "model": {k: v.detach().cpu().clone() for k, v in self.model.trainable_state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "state": dataclasses.asdict(self.state), "rng": rngs,
                "config": self.cfg.to_dict(),
            }  # fmt: skip
            atomic_write(self.run_dir / CHECKPOINT, lambda p: torch.save(ckpt, p))
        barrier()

    def _save_weights(self, name: str, epoch: int, metrics: dict[str, Any] | None) -> None:
        extra = {
            "experiment": json.dumps(self.cfg.to_dict()), "init_seed": str(self.cfg.train.seed), "epoch": str(epoch),
            "val_mIoU": "" if metrics is None else f"{metrics['mIoU']:.6f}",
        }  # fmt: skip
        save_mfnet(self.model, self.run_dir / name, extra=extra)

    # ---------------------------------------------------------------- loop
    def _loader(self, epoch: int, start: int) -> DataLoader:
        t = self.cfg.train
        sampler = EpochBatchSampler(epoch, start, t.batches_per_epoch, t.batch_size, self.info.rank, self.info.world_size)
        return DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=t.num_workers, pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(t.seed),  # workers' seeds never draw from the global RNG
        )  # fmt: skip

    def _step(self, batch: dict[str, Any]) -> float:
        inputs = {m: batch[m].to(self.device, non_blocking=True) for m in self.model.modalities}
        mask = batch["mask"].to(self.device, non_blocking=True)
        with autocast(self.cfg.train.amp, self.device):
            logits = self.net(inputs)  # (B, K, H, W)
        valid = (mask != IGNORE_INDEX).sum().clamp(min=1)
        loss = F.cross_entropy(logits.float(), mask, ignore_index=IGNORE_INDEX, reduction="sum") / valid
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    def run(self, max_steps: int | None = None) -> TrainResult:
        t, s = self.cfg.train, self.state
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(self.cfg.to_yaml())
            self._trim_csv(s.epoch)
            self.log(self._summary())
            if s.epoch >= t.epochs:
                self.log(f"{self.run_dir} already finished its {t.epochs} epochs; raise train.epochs to train on")
        history: list[dict[str, Any]] = []
        while s.epoch < t.epochs:
            if not self._train_epoch(max_steps):
                self._save()
                return self._result(history, finished=False)
            history.append(self._end_epoch())
            if max_steps is not None and s.step >= max_steps and s.epoch < t.epochs:
                return self._result(history, finished=False)
        return self._result(history, finished=True)

    def _train_epoch(self, max_steps: int | None) -> bool:
        """Train the rest of ``state.epoch``; False when stopped early by ``max_steps``."""
        t, s, info = self.cfg.train, self.state, self.info
        self.net.train()
        bar = tqdm(total=t.batches_per_epoch, initial=s.batch, desc=f"epoch {s.epoch + 1}/{t.epochs}",
                   disable=None if info.is_main and t.progress else True,  # None: off when not a terminal
                   dynamic_ncols=True, leave=False)  # fmt: skip
        t0 = time.perf_counter()
        for batch in self._loader(s.epoch, s.batch):
            s.loss_sum += self._step(batch)
            s.batch, s.step = s.batch + 1, s.step + 1
            elapsed = s.seconds + time.perf_counter() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{s.loss_sum / s.batch:.4f}", img_s=f"{s.batch * t.batch_size / max(elapsed, 1e-9):.1f}")
            done = s.batch >= t.batches_per_epoch
            stop = max_steps is not None and s.step >= max_steps and not done
            if stop or (t.checkpoint_every and s.step % t.checkpoint_every == 0 and not done):
                s.seconds, t0 = elapsed, time.perf_counter()  # saving time is not training time
                if stop:
                    bar.close()
                    return False
                self._save()
        s.seconds += time.perf_counter() - t0
        bar.close()
        return True

    def _end_epoch(self) -> dict[str, Any]:
        t, s, info = self.cfg.train, self.state, self.info
        lr = self.optimizer.param_groups[0]["lr"]
        loss = float(sum_tensor(torch.tensor([s.loss_sum], dtype=torch.float64, device=self.device)).item())
        loss /= max(1, t.batches_per_epoch * info.world_size)
        epoch = s.epoch + 1
        self.scheduler.step()
        metrics = None
        if self.val_tiles is not None and (epoch % t.val_every == 0 or epoch == t.epochs):
            result = evaluate_tileset(self.model, self.val_tiles, self.cfg, stride=self.cfg.eval.val_stride, info=info)
            metrics = result.metrics
            if info.is_main:
                self.log(f"epoch {epoch}/{t.epochs} validation ({len(self.val_tiles)} tiles, {result.seconds:.1f} s):\n{result.table}")
        improved = metrics is not None and metrics["mIoU"] > s.best_miou
        if improved or self.val_tiles is None:
            s.best_miou = metrics["mIoU"] if metrics is not None else s.best_miou
            s.best_epoch = epoch
        row = {
            "epoch": epoch, "step": s.step, "lr": lr, "train_loss": loss,
            "val_OA": metrics and metrics["OA"], "val_mF1": metrics and metrics["mF1"],
            "val_mIoU": metrics and metrics["mIoU"], "best_epoch": s.best_epoch, "seconds": s.seconds,
            "images_per_s": t.batches_per_epoch * t.batch_size / max(s.seconds, 1e-9),
        }  # fmt: skip
        if info.is_main:
            self._write_logs(row, metrics)
            if improved or self.val_tiles is None:
                self._save_weights(BEST, epoch, metrics)
            self._save_weights(LAST_WEIGHTS, epoch, metrics)
            self.log(f"epoch {epoch}: loss {loss:.4f}, lr {lr:g}, {row['images_per_s']:.1f} img/s"
                     + (f", val mIoU {metrics['mIoU'] * 100:.2f} (best {s.best_miou * 100:.2f} @ {s.best_epoch})" if metrics else ""))  # fmt: skip
        s.epoch, s.batch, s.loss_sum, s.seconds = epoch, 0, 0.0, 0.0
        self._save()
        return row

    # ---------------------------------------------------------------- logs
    def _write_logs(self, row: dict[str, Any], metrics: dict[str, Any] | None) -> None:
        path = self.run_dir / "log.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            if new:
                w.writeheader()
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})
        if metrics is not None:
            out = self.run_dir / "metrics" / f"epoch_{row['epoch']:03d}.json"
            out.parent.mkdir(exist_ok=True)
            out.write_text(json.dumps({"epoch": row["epoch"], "split": "val", **metrics}, indent=1))
        if self.writer is not None:
            for k, v in row.items():
                if v is not None and k not in ("epoch", "step", "best_epoch"):
                    self.writer.add_scalar(k, v, row["epoch"])
            for name, iou in (metrics or {}).get("IoU", {}).items():
                self.writer.add_scalar(f"val_IoU/{name}", iou, row["epoch"])
            self.writer.flush()

    def _trim_csv(self, completed: int) -> None:
        """Drop log rows of epochs a resumed run will redo (written after its checkpoint)."""
        path = self.run_dir / "log.csv"
        if not path.exists():
            return
        with path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= completed]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            w.writeheader()
            w.writerows(rows)

    def _summary(self) -> str:
        c, t = self.cfg, self.cfg.train
        groups = self.model.parameter_groups()
        trainable = groups["total"]["trainable"]
        return (
            f"{c.name}: {c.model.backbone} {c.model.mmpeft_preset}, modalities {c.model.modalities}, "
            f"{trainable:,} trainable parameters; {len(self.train_tiles)} train tiles, validation tiles "
            f"{_ids(self.val_tiles.ids) if self.val_tiles is not None else 'none'}; {t.epochs} epochs x "
            f"{t.batches_per_epoch} batches of {t.batch_size} ({self.info.world_size} process(es), {self.device}); "
            f"run dir {self.run_dir}"
        )

    def _result(self, history: list[dict[str, Any]], finished: bool) -> TrainResult:
        if self.writer is not None:
            self.writer.close()
        return TrainResult(self.run_dir, self.run_dir / BEST, self.run_dir / CHECKPOINT, self.state, history, finished)


def train(
    cfg: ExperimentConfig, *, max_steps: int | None = None, info: DistInfo | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``cfg`` (continuing ``run_dir/last.pt`` when ``cfg.train.resume``).

    Args:
        max_steps: stop after this many optimiser steps in total (a checkpoint is written),
            e.g. to split a run into jobs; resume later to finish.
        info: the process group (default: :func:`~mmpeft_isprs.distributed.init_distributed`).
        log: where messages go (rank 0 only).

    Raises:
        ConfigError / DataError: before anything is built when the config, the data or the
            resume checkpoint is wrong.
    """
    info = info or init_distributed(cfg.train.device, cfg.train.threads)
    trainer = _Trainer(cfg, info, log if info.is_main else (lambda _: None))
    return trainer.run(max_steps)

