"""Runs are never lost (issue 13): reuse refused, --overwrite, interrupt messages whose command works."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from mmpeft_isprs.cli import main
from mmpeft_isprs.demo import QUICK_OVERRIDES
from mmpeft_isprs.task import SegmentationTask

# the demo's --quick settings, two epochs of two steps (the interrupt tests count on it)
TINY = [*QUICK_OVERRIDES, "train.epochs=2", "train.batches_per_epoch=2", "train.tensorboard=false", "train.threads=1"]


def _command(err: str) -> list[str]:
    """The command printed on the line after 'Continue with:' / 'Start again with:'."""
    lines = err.strip().splitlines()
    assert lines[-2].endswith("with:"), err
    cmd = shlex.split(lines[-1])
    assert cmd[0] == "mmpeft-isprs"
    return cmd[1:]


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    real, calls = SegmentationTask.training_step, [0]

    def step(self, batch):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(SegmentationTask, "training_step", step)


def test_train_refuses_a_used_folder_until_resume_or_overwrite(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["train", "demo", *TINY, "data.root=data", "train.run_dir=run"]
    assert main(args) == 0
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "run already holds last.pt and config.yaml" in err and "--resume" in err and "--overwrite" in err
    before = (tmp_path / "run" / "log.csv").read_text()
    assert main([*args, "--overwrite"]) == 0
    assert (tmp_path / "run" / "log.csv").read_text().count("\n") == before.count("\n")  # replaced, not appended


def test_train_interrupt_names_the_resume_command_and_it_works(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _interrupt_at(monkeypatch, 3)  # during epoch 2: epoch 1's checkpoint exists
    assert main(["train", "demo", *TINY, "data.root=data", "train.run_dir=run"]) == 130
    cmd = _command(capsys.readouterr().err)
    assert cmd[-1] == "--resume" and "train.run_dir=run" in cmd
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert main(cmd) == 0
    out = capsys.readouterr().out
    assert "resuming run/last.pt: epoch 2" in out and (tmp_path / "run" / "best.safetensors").is_file()


def test_train_interrupt_before_a_checkpoint_says_start_again(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _interrupt_at(monkeypatch, 1)
    assert main(["train", "demo", *TINY, "data.root=data", "train.run_dir=run"]) == 130
    cmd = _command(capsys.readouterr().err)
    assert cmd[-1] == "--overwrite"
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert main(cmd) == 0


def test_demo_runs_get_their_own_folders_and_resume_works(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    _interrupt_at(monkeypatch, 4)  # the second run (optical) of the quick demo, before its checkpoint
    assert main(["demo", "--quick", "train.threads=1"]) == 130
    cmd = _command(capsys.readouterr().err)
    (folder,) = list((tmp_path / "runs" / "demo").iterdir())
    assert cmd == ["demo", "--resume", str(Path("runs/demo") / folder.name)]
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--resume"]) == 0  # the latest demo, with the options it was started with
    out = capsys.readouterr().out
    assert "already finished" in out and (folder / "demo_summary.json").is_file()
    assert main(["demo", "--out", str(folder)]) == 2
    assert "already holds a demo run" in capsys.readouterr().err
    assert main(["demo", "--quick", "train.threads=1"]) == 0
    assert len(list((tmp_path / "runs" / "demo").iterdir())) == 2  # a new folder, the first one kept


def test_overwrite_removes_earlier_evaluation_folders(tmp_path) -> None:
    from mmpeft_isprs.config import load_config
    from mmpeft_isprs.distributed import DistInfo
    from mmpeft_isprs.runner.checkpoint import resume_checkpoint

    run = tmp_path / "run"
    (run / "eval_test_stride32_full_full").mkdir(parents=True)
    (run / "eval_test_stride32_full_full" / "metrics.json").write_text("{}")
    (run / "config.yaml").write_text("")
    cfg = load_config("demo", [f"train.run_dir={run}", "train.overwrite=true"])
    assert resume_checkpoint(cfg, DistInfo()) is None
    assert not list(run.glob("eval_*")) and not (run / "config.yaml").exists()
