"""What a run folder records, whoever watches it: each evaluation in its own folder named by its
protocol, ``train.log`` / ``eval.log`` beside ``log.csv``, a logged loss that does not depend on
checkpoints or a terminal, the thread count reused on ``--resume``, the official split's missing
test tiles named at the start, data warnings printed as the docs show them."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile

from mmpeft_isprs.cli import main
from mmpeft_isprs.data import write_tiff
from mmpeft_isprs.data.splits import VAIHINGEN_SPLITS
from mmpeft_isprs.train import train
from tests.isprs.archives import TINY, make_vaihingen_archive
from tests.isprs.runs import quiet, tiny_config


def _losses(run: Path) -> list[str]:
    with (run / "log.csv").open() as f:
        return [row["train_loss"] for row in csv.DictReader(f)]


def test_logged_loss_does_not_depend_on_checkpoints(data_root: Path, tmp_path: Path) -> None:
    plain = tiny_config(data_root, tmp_path / "a", epochs=1, batches_per_epoch=6)
    watched = tiny_config(data_root, tmp_path / "b", epochs=1, batches_per_epoch=6, checkpoint_every=1)
    train(plain, log=quiet)
    train(watched, log=quiet)  # the loss sum is read from the device at every checkpoint
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_each_evaluation_keeps_its_folder_and_logs_are_written(data_root: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    cfg = tiny_config(data_root, run, epochs=1, batches_per_epoch=2)
    train(cfg)
    log = (run / "train.log").read_text()
    assert "epoch 1/1 validation" in log and "mIoU" in log and "step 2/2" in log  # class table and progress lines
    weights = str(run / "best.safetensors")
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(cfg.to_yaml())
    assert main(["eval", str(cfg_file), "--weights", weights, "eval.stride=32"]) == 0
    assert main(["eval", str(cfg_file), "--weights", weights, "eval.stride=64"]) == 0
    first = json.loads((run / "eval_test_stride32_average_eroded" / "metrics.json").read_text())
    second = json.loads((run / "eval_test_stride64_average_eroded" / "metrics.json").read_text())
    assert (first["protocol"]["stride"], second["protocol"]["stride"]) == (32, 64)
    assert (run / "eval_test_stride32_average_eroded" / "figures" / "confusion.png").is_file()
    out = tmp_path / "mine"  # an explicit folder of another protocol is refused, the same one rewritten
    assert main(["eval", str(cfg_file), "--weights", weights, "eval.stride=32", "--out", str(out)]) == 0
    assert main(["eval", str(cfg_file), "--weights", weights, "eval.stride=32", "--out", str(out)]) == 0
    assert main(["eval", str(cfg_file), "--weights", weights, "eval.stride=64", "--out", str(out)]) == 2
    assert f"{out} holds an evaluation of another protocol (stride 32 -> 64)" in capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["protocol"]["stride"] == 32
    evals = (run / "eval.log").read_text()
    assert evals.count("== evaluation of") == 4 and "stride 64" in evals and "mIoU" in evals


def test_an_evaluation_of_the_same_protocol_is_replaced_with_a_word(data_root: Path, tmp_path: Path, capsys) -> None:
    """A second eval of the same protocol says it replaces the first and leaves none of its
    predictions behind (saved the first time, not the second)."""
    run = tmp_path / "run"
    cfg = tiny_config(data_root, run, epochs=1, batches_per_epoch=1)
    train(cfg)
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(cfg.to_yaml())
    weights = str(run / "best.safetensors")
    folder = run / "eval_test_stride32_average_eroded"
    assert main(["eval", str(cfg_file), "--weights", weights, "eval.stride=32", "eval.save_predictions=true"]) == 0
    assert any((folder / "predictions").iterdir())
    capsys.readouterr()
    assert main(["eval", str(cfg_file), "--weights", weights, "eval.stride=32"]) == 0
    assert (
        f"note: {folder} holds an earlier evaluation of the same protocol and weights; it is replaced"
        in capsys.readouterr().out
    )
    assert not (folder / "predictions").exists() and (folder / "figures" / "confusion.png").is_file()


def test_resume_reuses_the_runs_thread_count(data_root: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(tiny_config(data_root, run, epochs=1, batches_per_epoch=4).to_yaml())
    assert main(["train", str(cfg), "train.threads=1", "--max-steps", "2"]) == 0
    assert json.loads((run / "run.json").read_text())["threads"]["threads"] == 1
    assert main(["train", str(cfg), "--resume"]) == 0  # threads=0 (auto): the run's count, not the machine's
    out = capsys.readouterr().out
    assert "1 torch thread(s) per process (the run's count, recorded in" in out
    assert json.loads((run / "run.json").read_text())["threads"]["threads"] == 1
    assert main(["train", str(cfg), "--overwrite", "train.threads=1", "--max-steps", "2"]) == 0
    assert main(["train", str(cfg), "--resume", "train.threads=2"]) == 0
    assert (
        "note: resuming with 2 torch thread(s), the run used 1: the result is not bit-exact" in capsys.readouterr().out
    )


def test_official_split_without_the_test_tiles_is_said_at_the_start(tmp_path: Path, capsys) -> None:
    root = tmp_path / "vaihingen"
    official = VAIHINGEN_SPLITS["official"]
    make_vaihingen_archive(root, official["train"])
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "vaihingen_mmadapter_vit_b",
                f"data.root={root}",
                f"train.run_dir={run}",
                "data.split=official",
                "data.val_fraction=0",
                *TINY,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    n = len(official["test"])
    assert f"warning: data.split=official: {n} of the {n} official test tiles lack files under {root}" in out
    assert "ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE" in out
    assert main(["eval", "vaihingen_mmadapter_vit_b", "--weights", str(run / "best.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "also looked in ISPRS_semantic_labeling_Vaihingen_ground_truth_eroded_COMPLETE" in err


def test_data_warnings_print_as_the_docs_show(tmp_path: Path) -> None:
    root = tmp_path / "vaihingen"
    make_vaihingen_archive(root, ["1", "5"])
    path = root / "dsm" / "dsm_09cm_matching_area5.tif"
    dsm = tifffile.imread(path)
    dsm[0, 3] = np.nan
    write_tiff(path, dsm)
    run = tmp_path / "run"
    args = [
        f"data.root={root}",
        f"train.run_dir={run}",
        "data.splits={train: [1, 5], test: [5]}",
        "data.val_fraction=0",
        *TINY,
    ]
    done = subprocess.run(
        [sys.executable, "-m", "mmpeft_isprs", "train", "vaihingen_mmadapter_vit_b", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )  # as on a cluster: stderr to a file
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stderr.splitlines() if "NaN/no-data" in x)
    assert line.startswith(f"DataWarning: {path} (tile 5): DSM has 1 NaN/no-data pixel(s)")
    assert ".py:" not in done.stderr and "warnings.warn" not in done.stderr


def test_replacing_an_evaluation_removes_its_earlier_subsets_json(tmp_path: Path) -> None:
    from mmpeft_isprs.runner.scoring import _clear_earlier

    (tmp_path / "figures").mkdir()
    (tmp_path / "subsets.json").write_text("{}")
    lines: list[str] = []
    _clear_earlier(tmp_path, lines.append)
    assert not (tmp_path / "subsets.json").exists() and not (tmp_path / "figures").exists()
    assert "it is replaced" in lines[0]
