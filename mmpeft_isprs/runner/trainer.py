"""The training loop: epochs of steps of a task on a data module, validation, checkpoints, logs.

Beyond the paper: the best epoch is chosen on a validation split (never the test set) and
saved as ``best.safetensors``; ``last.pt`` holds everything needed to continue (see
:mod:`.checkpoint`), written atomically at every epoch end and every ``checkpoint_every`` steps.

Files in ``run_dir``: ``config.yaml``, ``log.csv`` (one row per epoch), ``train.log`` (every line
printed: the run header, progress lines, per-epoch class tables; appended on resume), ``metrics/epoch_NNN.json``
(per-class validation metrics), ``last.pt``, ``last.safetensors``, ``best.safetensors``, and
TensorBoard events when TensorBoard is installed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..config import ExperimentConfig
from ..datamodule import ISPRSDataModule
from ..distributed import DistInfo, sum_tensor
from ..model.fingerprint import encoder_record
from ..task import SegmentationTask
from .checkpoint import (
    BEST,
    CHECKPOINT,
    LAST_WEIGHTS,
    TrainState,
    clear_run,
    restore_checkpoint,
    resume_checkpoint,
    save_checkpoint,
    seed_process,
)
from .logs import RunLog, TextLog, describe_run, run_header
from .progress import StepLog
from .records import logged_warnings

__all__ = ["Trainer", "TrainResult", "fit"]


@dataclass
class TrainResult:
    """Where the run wrote its files and how it ended."""

    run_dir: Path
    best: Path
    last: Path
    state: TrainState
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = True


def _quiet(_: str) -> None:
    return None


def fit(
    cfg: ExperimentConfig,
    info: DistInfo,
    *,
    max_steps: int | None = None,
    log: Callable[[str], None] = print,
    notes: Sequence[str] = (),
) -> TrainResult:
    """Train ``cfg`` on this process: check the run folder, open the data, build the task, loop.

    Everything that can be wrong (resume checkpoint, config, data) raises before training, and
    leaves no log behind. Every line printed on rank 0, ``notes`` (printed first) and warnings
    included, also goes to ``train.log``, timestamped.
    """
    text = TextLog(Path(cfg.train.run_dir) / "train.log", log, hold=True) if info.is_main else None
    out = text or _quiet
    with logged_warnings(text.write_file if text is not None else _quiet):
        resume = resume_checkpoint(cfg, info, clear=False)  # --overwrite: the earlier run goes once all is checked
        for note in notes:
            out(note)
        data = ISPRSDataModule(cfg, info, out)
        data.setup()
        task = SegmentationTask(cfg, info)
        clear_run(cfg, info)
        if text is not None:
            text.release()  # the work starts: the held lines go to the file
        return Trainer(cfg, info, out).fit(task, data, resume=resume, max_steps=max_steps)


def _next_timed(batches: Iterator[Any]) -> tuple[Any, float] | None:
    """The next batch and the seconds spent waiting for it (None at the end)."""
    t0 = time.perf_counter()
    batch = next(batches, None)
    return None if batch is None else (batch, time.perf_counter() - t0)


class Trainer:
    """Runs a :class:`SegmentationTask` on an :class:`ISPRSDataModule` for ``train.epochs`` epochs."""

    def __init__(self, cfg: ExperimentConfig, info: DistInfo, log: Callable[[str], None] = print) -> None:
        self.cfg, self.info, self.log = cfg, info, log
        self.run_dir = Path(cfg.train.run_dir)
        self.state = TrainState()
        self._pending: torch.Tensor | None = None  # losses of this epoch not yet read from the device

    def fit(
        self,
        task: SegmentationTask,
        data: ISPRSDataModule,
        *,
        resume: dict[str, Any] | None = None,
        max_steps: int | None = None,
    ) -> TrainResult:
        """Train from ``resume`` (a ``last.pt``) or from the start; stop after ``max_steps`` steps in total."""
        t, info = self.cfg.train, self.info
        self.task, self.data, self.resumed = task, data, resume is not None
        seed_process(t.seed, info.rank)
        if resume is not None:
            self.state = restore_checkpoint(resume, task, info)
            if info.is_main:
                s, where = self.state, self.run_dir / CHECKPOINT
                at = f"epoch {s.epoch + 1}, batch {s.batch}" if s.epoch < t.epochs else f"all {t.epochs} epochs done"
                self.log(f"resuming {where}: {at}, step {s.step}")
        self.logs = RunLog(self.run_dir, t.tensorboard) if info.is_main else None
        self.steps = StepLog(
            self.log,
            t.log_every,
            t.epochs * t.batches_per_epoch,
            t.batch_size,
            loss_label="rank-0 loss" if info.world_size > 1 else "loss",
        )  # not reduced: no sync per line
        try:
            return self._loop(max_steps)
        finally:
            if self.logs is not None:
                self.logs.close()

    def _loop(self, max_steps: int | None) -> TrainResult:
        t, s = self.cfg.train, self.state
        if self.logs is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(self.cfg.to_yaml())
            self.logs.trim(s.epoch)
            self.log(describe_run(self.cfg, self.task.model, self.data.train_tiles, self.data.val_tiles, self.info))  # type: ignore[arg-type]
            self.log(run_header(self.cfg, self.info, encoder_record(self.task.model), resumed=self.resumed))
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
        t, s = self.cfg.train, self.state
        bar = tqdm(
            total=t.batches_per_epoch,
            initial=s.batch,
            desc=f"epoch {s.epoch + 1}/{t.epochs}",
            disable=None if self.info.is_main and t.progress else True,  # None: off when not a terminal
            dynamic_ncols=True,
            leave=False,
        )
        self.steps.restart()
        t0 = shown = time.perf_counter()
        batches = iter(self.data.train_loader(s.epoch, s.batch))
        while (batch := _next_timed(batches)) is not None:
            loss = self.task.training_step(batch[0])  # a device tensor: read only when shown
            # summed in float64, where the sum of float32 losses is exact: the logged loss is the same
            # whenever it is read (a terminal's bar, checkpoints), not only the same weights
            loss64 = loss.detach().double()
            self._pending = loss64 if self._pending is None else self._pending + loss64
            s.batch, s.step = s.batch + 1, s.step + 1
            elapsed = s.seconds + time.perf_counter() - t0
            bar.update(1)
            if not bar.disable and time.perf_counter() - shown >= 1.0:  # the bar's loss: once a second
                shown = time.perf_counter()
                bar.set_postfix(
                    loss=f"{self._fold() / s.batch:.4f}", img_s=f"{s.batch * t.batch_size / max(elapsed, 1e-9):.1f}"
                )
            if self.info.is_main:
                self.steps.update(
                    s.step,
                    loss,
                    batch[1],
                    self.task.lr,
                    f"epoch {s.epoch + 1}/{t.epochs}, batch {s.batch}/{t.batches_per_epoch}",
                )
            done = s.batch >= t.batches_per_epoch
            stop = max_steps is not None and s.step >= max_steps and not done
            if stop or (t.checkpoint_every and s.step % t.checkpoint_every == 0 and not done):
                s.seconds, t0 = elapsed, time.perf_counter()  # saving time is not training time
                if stop:
                    bar.close()
                    return False
                self._save()
                self.steps.restart()
        s.seconds += time.perf_counter() - t0
        bar.close()
        return True

    def _validate(self, epoch: int) -> dict[str, Any] | None:
        """Validation metrics after ``epoch`` (1-based) when due, else None."""
        t, tiles = self.cfg.train, self.data.val_tiles
        if tiles is None or not (epoch % t.val_every == 0 or epoch == t.epochs):
            return None
        result = self.task.evaluation_step(tiles, self.info, stride=self.cfg.eval.val_stride)
        if self.info.is_main:
            self.log(
                f"epoch {epoch}/{t.epochs} validation ({len(tiles)} tiles, {result.seconds:.1f} s):\n{result.table}"
            )
        return result.metrics

    def _end_epoch(self) -> dict[str, Any]:
        t, s, info = self.cfg.train, self.state, self.info
        lr = self.task.lr
        loss = float(sum_tensor(torch.tensor([self._fold()], dtype=torch.float64, device=info.device)).item())
        loss /= max(1, t.batches_per_epoch * info.world_size)
        epoch = s.epoch + 1
        self.task.end_epoch()
        metrics = self._validate(epoch)
        no_val = self.data.val_tiles is None
        improved = metrics is not None and metrics["mIoU"] > s.best_miou
        if improved or no_val:
            s.best_miou = metrics["mIoU"] if metrics is not None else s.best_miou
            s.best_epoch = epoch
        row = {
            "epoch": epoch,
            "step": s.step,
            "lr": lr,
            "train_loss": loss,
            "val_OA": metrics and metrics["OA"],
            "val_mF1": metrics and metrics["mF1"],
            "val_mIoU": metrics and metrics["mIoU"],
            "best_epoch": s.best_epoch,
            "seconds": s.seconds,
            "images_per_s": t.batches_per_epoch * t.batch_size / max(s.seconds, 1e-9),
        }
        if self.logs is not None:
            self.logs.write(row, metrics)
            if improved or no_val:
                self.task.save_weights(self.run_dir / BEST, epoch, metrics)
            self.task.save_weights(self.run_dir / LAST_WEIGHTS, epoch, metrics)
            self.log(
                f"epoch {epoch}: loss {loss:.4f}, lr {lr:g}, {row['images_per_s']:.1f} img/s"
                + (
                    f", val mIoU {metrics['mIoU'] * 100:.2f} (best {s.best_miou * 100:.2f} @ {s.best_epoch})"
                    if metrics
                    else ""
                )
            )
        s.epoch, s.batch, s.loss_sum, s.seconds = epoch, 0, 0.0, 0.0
        self._save()
        return row

    def _fold(self) -> float:
        """The epoch's loss sum so far: the losses not yet read are added to it (this waits for
        the device; done when a number is shown or saved, never inside the step)."""
        if self._pending is not None:
            self.state.loss_sum += float(self._pending)
            self._pending = None
        return self.state.loss_sum

    def _save(self) -> None:
        self._fold()
        save_checkpoint(self.run_dir / CHECKPOINT, self.task, self.state, self.cfg, self.info)

    def _result(self, history: list[dict[str, Any]], finished: bool) -> TrainResult:
        if self.logs is not None and history:
            try:
                from .figures import curves_figure
            except ImportError:  # matplotlib: pip install matplotlib
                curves_figure = None  # type: ignore[assignment]
            curves = curves_figure and curves_figure(self.run_dir / "figures" / "curves.png", self.run_dir / "log.csv")
            if curves:
                self.log(f"training curves: {curves}")
        return TrainResult(self.run_dir, self.run_dir / BEST, self.run_dir / CHECKPOINT, self.state, history, finished)
