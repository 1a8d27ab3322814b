"""Progress lines that work in files and terminals alike (mmsegmentation's logger hook).

Every ``train.log_every`` steps, and at least every :data:`MAX_SILENCE` seconds of training, one
line: step, epoch and batch, mean loss since the last line, learning rate, images/s, the share of
time spent waiting for data, and the ETA of the remaining training steps. Plain lines, so a
redirected ``mmpeft-isprs demo > log`` shows them too (the progress bar is for terminals only).

Evaluation (:class:`EvalProgress`) prints the same kind of line: windows done / total, elapsed,
windows/s and ETA, at every tenth of the windows and at least every :data:`EVAL_SILENCE` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["StepLog", "EvalProgress", "MAX_SILENCE", "EVAL_SILENCE", "format_seconds"]

MAX_SILENCE = 25.0  # seconds of training between two lines at most (the promise: 30)
EVAL_SILENCE = 10.0  # seconds of evaluation between two lines at most (a line is printed after a batch)


def format_seconds(s: float) -> str:
    """``75`` -> ``"1m15s"``, ``3700`` -> ``"1h01m"``."""
    s = max(0, int(round(s)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class StepLog:
    """Accumulates steps and prints a line when due (rank 0 only).

    Args:
        log: where lines go.
        every: a line every N steps (0: only by time).
        total_steps: steps of the whole run (for the ETA).
        images_per_step: images in one step over all ranks.
        clock: the time source (a test may pass its own).
        loss_label: how the line names its loss (``"rank-0 loss"`` under torchrun: the loss of rank
            0's share of the batches, not reduced over the ranks; the epoch's loss in ``log.csv`` is).
    """

    def __init__(
        self,
        log: Callable[[str], None],
        every: int,
        total_steps: int,
        images_per_step: int,
        clock: Callable[[], float] = time.perf_counter,
        loss_label: str = "loss",
    ) -> None:
        self.log, self.every, self.total, self.images = log, every, total_steps, images_per_step
        self.loss_label = loss_label
        self.clock = clock
        self.restart()

    def restart(self) -> None:
        """Start a new window (after a pause: validation, checkpoints)."""
        self.t0 = self.clock()
        self.steps, self.wait = 0, 0.0
        self.loss: float | torch.Tensor = 0.0

    def update(self, step: int, loss: float | torch.Tensor, wait: float, lr: float, where: str) -> str | None:
        """Count one step (``wait``: seconds spent waiting for its batch); the line when one is due.
        ``loss`` may be a device tensor: it is summed there and read only when a line is due."""
        self.steps, self.loss, self.wait = self.steps + 1, self.loss + loss, self.wait + wait
        elapsed = self.clock() - self.t0
        due = (self.every and step % self.every == 0) or elapsed >= MAX_SILENCE or step == self.total
        if not due:
            return None
        rate = self.steps / max(elapsed, 1e-9)
        line = (
            f"step {step}/{self.total} ({where}): {self.loss_label} {float(self.loss) / self.steps:.4f}, lr {lr:.3g}, "
            f"{rate * self.images:.1f} img/s, data wait {100 * self.wait / max(elapsed, 1e-9):.0f}%, "
            f"ETA {format_seconds((self.total - step) / max(rate, 1e-9))}"
        )
        self.log(line)
        self.restart()
        return line


class EvalProgress:
    """Progress lines of an evaluation (rank 0): called with the windows of every scored batch.

    A line at every tenth of ``total`` and at least every ``every_s`` seconds (after the batch
    that crosses it): ``eval: D/T windows (P%), elapsed E, R windows/s, ETA S``.
    """

    def __init__(
        self,
        log: Callable[[str], None],
        total: int,
        what: str = "eval",
        every_s: float = EVAL_SILENCE,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.log, self.total, self.what, self.every_s, self.clock = log, max(int(total), 1), what, every_s, clock
        self.done = 0
        self.t0 = self.last = clock()

    def __call__(self, windows: int) -> None:
        tenth = -(-self.total // 10)  # ceil
        before, self.done = self.done, self.done + windows
        now = self.clock()
        if self.done // tenth == before // tenth and now - self.last < self.every_s and self.done < self.total:
            return
        self.last, elapsed = now, now - self.t0
        rate = self.done / max(elapsed, 1e-9)
        line = (
            f"{self.what}: {self.done}/{self.total} windows ({100 * self.done / self.total:.0f}%), "
            f"elapsed {format_seconds(elapsed)}, {rate:.1f} windows/s, "
            f"ETA {format_seconds(max(self.total - self.done, 0) / max(rate, 1e-9))}"
        )
        self.log(line)
