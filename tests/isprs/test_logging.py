"""Logs that work in files and terminals (issue 13): progress lines, the run header, run.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from mmpeft_isprs.data import generate_synthetic_vaihingen
from mmpeft_isprs.runner.progress import MAX_SILENCE, StepLog, format_seconds
from mmpeft_isprs.task import SegmentationTask
from mmpeft_isprs.train import train
from tests.isprs.runs import tiny_config

LINE = re.compile(
    r"^step (\d+)/(\d+) \(epoch \d+/\d+, batch \d+/\d+\): loss [\d.]+, lr [\d.e-]+, [\d.]+ img/s, "
    r"data wait \d+%, ETA \S+$"
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_step_log_every_n_steps_and_eta() -> None:
    lines: list[str] = []
    clock = Clock()
    log = StepLog(lines.append, every=2, total_steps=6, images_per_step=4, clock=clock)
    for step in range(1, 7):
        clock.now += 1.0
        log.update(step, loss=float(step), wait=0.25, lr=0.01, where="epoch 1/1, batch x/6")
    assert len(lines) == 3
    assert lines[0] == "step 2/6 (epoch 1/1, batch x/6): loss 1.5000, lr 0.01, 4.0 img/s, data wait 25%, ETA 4s"
    assert lines[-1].endswith("ETA 0s")


def test_step_log_never_silent_longer_than_30_s() -> None:
    """A slow step rate (one step per 10 s) with a large N still prints at least every 30 s."""
    lines: list[str] = []
    clock = Clock()
    log = StepLog(lines.append, every=1000, total_steps=100, images_per_step=8, clock=clock)
    printed_at = [0.0]
    for step in range(1, 40):
        clock.now += 10.0
        if log.update(step, 1.0, 0.0, 0.01, "e") is not None:
            printed_at.append(clock.now)
    gaps = [b - a for a, b in zip(printed_at, printed_at[1:])]
    assert len(gaps) >= 10 and max(gaps) <= 30.0 and MAX_SILENCE <= 30


def test_format_seconds() -> None:
    assert [format_seconds(x) for x in (5, 75, 3700)] == ["5s", "1m15s", "1h01m"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic_vaihingen(root, num_tiles=3, tile_size=96)
    return root


def test_training_prints_progress_lines_and_header(data_root: Path, tmp_path: Path) -> None:
    out: list[str] = []
    cfg = tiny_config(data_root, tmp_path / "run", log_every=2)
    train(cfg, log=out.append)
    text = "\n".join(out).splitlines()
    steps = [int(m.group(1)) for line in text if (m := LINE.match(line))]
    assert steps == [2, 4, 6], text  # every 2 steps (the last step of the run always)
    assert any(line.startswith("versions: python") and "torch" in line for line in text)
    assert any(line.startswith("device: cpu") and "torch thread(s)" in line for line in text)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["train"]["log_every"] == 2 and run["threads"]["threads"] >= 1
    assert set(run["versions"]) == {"python", "torch", "mmpeft"} and run["device"] == "cpu"


class _CountedLoss(torch.Tensor):
    """A loss tensor that counts how often the host reads a number out of it."""

    reads = 0

    def __float__(self) -> float:
        type(self).reads += 1
        return super().__float__()

    def item(self) -> float:  # type: ignore[override]
        type(self).reads += 1
        return super().item()


def test_losses_are_read_at_log_time_not_every_step(data_root: Path, tmp_path: Path, monkeypatch) -> None:
    """The step returns a device tensor and the runner reads it only for a line, a checkpoint or
    the epoch's mean: no host synchronisation per step (issue 9)."""
    real = SegmentationTask.training_step
    seen: list[torch.Tensor] = []

    def step(self, batch):  # type: ignore[no-untyped-def]
        loss = real(self, batch)
        seen.append(loss)
        return loss.as_subclass(_CountedLoss)

    monkeypatch.setattr(SegmentationTask, "training_step", step)
    _CountedLoss.reads = 0
    out: list[str] = []
    train(tiny_config(data_root, tmp_path / "run", epochs=1, batches_per_epoch=6, log_every=100), log=out.append)
    assert len(seen) == 6 and all(isinstance(x, torch.Tensor) and x.dim() == 0 for x in seen)
    assert _CountedLoss.reads == 2  # the run's last line and the epoch's mean, not one per step
    line = next(x for x in out if LINE.match(x))
    assert f"loss {sum(float(x) for x in seen) / 6:.4f}" in line  # the line still shows the mean
