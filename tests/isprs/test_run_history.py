"""What the run folder keeps (issue 30, items 4 and 5): every printed line in the logs with a
timestamp, warnings and notes included; ``run.json`` keeps every launch; the encoder file known
by its SHA-256 in the weights, ``run.json`` and each evaluation, with its load report."""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from mmpeft_isprs.cli import main
from mmpeft_isprs.config import load_config
from mmpeft_isprs.data import write_tiff
from mmpeft_isprs.model.mfnet import _base_encoder
from mmpeft_isprs.task import read_weights
from tests.isprs.archives import TINY, make_vaihingen_archive

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")
ARGS = ["data.splits={train: [1, 5], test: [5]}", "data.val_fraction=0", "train.batches_per_epoch=2"]


def _archive(root: Path) -> Path:
    """A Vaihingen archive of tiles 1 and 5 whose DSM of tile 5 has a NaN pixel (a DataWarning)."""
    make_vaihingen_archive(root, ["1", "5"])
    path = root / "dsm" / "dsm_09cm_matching_area5.tif"
    dsm = tifffile.imread(path)
    dsm[0, 3] = np.nan
    write_tiff(path, dsm)
    return root


@pytest.fixture(autouse=True)
def terminal_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Warnings printed to stderr as outside pytest (pytest records them instead)."""

    def show(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    monkeypatch.setattr(warnings, "showwarning", show)


def _unstamped(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    assert all(STAMP.match(x) for x in lines), [x for x in lines if not STAMP.match(x)][:3]
    return [STAMP.sub("", x) for x in lines]


def test_train_log_holds_every_printed_line_with_timestamps(tmp_path: Path, capsys) -> None:
    root, run = _archive(tmp_path / "v"), tmp_path / "run"
    args = ["train", "vaihingen_mmadapter_vit_b", f"data.root={root}", f"train.run_dir={run}", *ARGS, *TINY]
    assert main([*args, "train.threads=1", "--max-steps", "1"]) == 0
    first = capsys.readouterr()
    terminal = (first.out + first.err).splitlines()
    logged = _unstamped(run / "train.log")
    assert sorted(terminal) == sorted(logged)  # the same lines, only the timestamps differ
    assert any(x.startswith("DataWarning: ") and "dsm_09cm_matching_area5.tif (tile 5)" in x for x in logged)
    assert any(x.startswith("encoder weights: none") for x in logged)
    assert main([*args, "--resume", "train.threads=2"]) == 0
    second = capsys.readouterr()
    note = "note: resuming with 2 torch thread(s), the run used 1: the result is not bit-exact"
    assert note in second.out
    logged = _unstamped(run / "train.log")
    assert any(x.startswith(note) for x in logged)
    assert sorted((first.out + first.err + second.out + second.err).splitlines()) == sorted(logged)
    record = json.loads((run / "run.json").read_text())
    launches = record["launches"]
    assert [x["threads"]["threads"] for x in launches] == [1, 2] and [x["resumed"] for x in launches] == [False, True]
    assert all(x["command"] and x["started"] and x["versions"]["torch"] for x in launches)
    assert record["threads"]["threads"] == 2  # the latest launch's, as before


def test_eval_log_holds_the_note_about_the_saved_experiment(tmp_path: Path, capsys) -> None:
    root, run = _archive(tmp_path / "v"), tmp_path / "run"
    assert main(["train", "vaihingen_mmadapter_vit_b", f"data.root={root}", f"train.run_dir={run}", *ARGS, *TINY]) == 0
    capsys.readouterr()
    assert main(["eval", "vaihingen_mmadapter_vit_b", "--weights", str(run / "best.safetensors")]) == 0
    got = capsys.readouterr()
    logged = _unstamped(run / "eval.log")
    assert any(x.startswith("note: using the experiment saved with") for x in logged)
    assert sorted((got.out + got.err).splitlines()) == sorted(logged)


# ------------------------------------------------------------------ the encoder file by content


def _encoder_files(tmp_path: Path) -> tuple[Path, Path]:
    """Two SAM-layout encoder files of the tiny model: identical shapes, other values."""
    cfg = load_config("vaihingen_mmadapter_vit_b", [*TINY]).model
    torch.manual_seed(3)
    encoder, _, _ = _base_encoder(cfg)
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    a, b = tmp_path / "enc_a.pth", tmp_path / "enc_b.pth"
    torch.save(state, a)
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, b)
    return a, b


def test_encoder_hash_is_recorded_and_another_file_warns_and_gets_its_own_evaluation(tmp_path: Path, capsys) -> None:
    root, run = _archive(tmp_path / "v"), tmp_path / "run"
    a, b = _encoder_files(tmp_path)
    tiny = [x for x in TINY if not x.startswith("model.checkpoint")]
    assert (
        main(
            [
                "train",
                "vaihingen_mmadapter_vit_b",
                f"data.root={root}",
                f"train.run_dir={run}",
                f"model.checkpoint={a}",
                *ARGS,
                *tiny,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    digest_a = read_weights(run / "best.safetensors").metadata["encoder_sha256"]
    assert len(digest_a) == 64 and f"encoder weights: {a} (sha256 {digest_a[:12]})" in out
    record = json.loads((run / "run.json").read_text())
    assert record["encoder"]["sha256"] == digest_a and record["encoder"]["report"]["n_loaded"] > 0
    assert (run / "train.log").read_text().count("encoder weights:") == 1
    weights = str(run / "best.safetensors")
    assert main(["eval", "vaihingen_mmadapter_vit_b", "--weights", weights]) == 0
    capsys.readouterr()
    first = next(run.glob("eval_test_*"))
    assert json.loads((first / "metrics.json").read_text())["encoder_sha256"] == digest_a
    assert main(["eval", "vaihingen_mmadapter_vit_b", "--weights", weights, f"model.checkpoint={b}"]) == 0
    got = capsys.readouterr()
    text = got.out + got.err
    assert "the same protocol and weights" not in text
    assert re.search(
        rf"warning: {re.escape(str(b))} \(sha256 [0-9a-f]{{12}}\) is not the encoder file .*trained with "
        rf"\(sha256 {digest_a[:12]}\)",
        text,
    ), text
    folders = sorted(run.glob("eval_test_*"))
    assert len(folders) == 2  # the first evaluation is kept beside the other encoder's
    other = next(f for f in folders if f != first)
    assert json.loads((other / "metrics.json").read_text())["encoder_sha256"] != digest_a
    out = tmp_path / "pred"
    assert (
        main(
            [
                "predict",
                "--weights",
                weights,
                "--optical",
                str(root / "top"),
                "--dsm",
                str(root / "dsm"),
                "--out",
                str(out),
                "--checkpoint",
                str(b),
            ]
        )
        == 0
    )
    got = capsys.readouterr()
    assert f"warning: {b} (sha256 " in got.out + got.err and "is not the encoder file" in got.out + got.err
    assert f"encoder weights: {b} (sha256 " in got.out  # predict says which file it loaded, too


def test_file_hash_is_of_the_content(tmp_path: Path) -> None:
    from mmpeft_isprs.model.fingerprint import file_sha256

    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x" * 10)
    b.write_bytes(b"x" * 9 + b"y")
    assert file_sha256(a) != file_sha256(b) and len(file_sha256(a)) == 64
    b.write_bytes(b"x" * 10)
    assert file_sha256(a) == file_sha256(b)


@pytest.mark.parametrize(
    "launches,expected",
    [
        ([{"threads": {"threads": 1}}, {"threads": {"threads": 2}}], "torch threads 1 -> 2"),
        ([{"threads": {"threads": 1}}, {"threads": {"threads": 1}}], None),
    ],
)
def test_mixed_launches_are_said(launches: list, expected: str | None) -> None:
    from mmpeft_isprs.runner.records import mixed_launches

    note = mixed_launches(launches)
    assert (note is None) if expected is None else (expected in note)  # type: ignore[operator]


def test_a_refused_overwrite_leaves_the_earlier_run_as_it_was(tmp_path: Path, capsys) -> None:
    root, run = _archive(tmp_path / "v"), tmp_path / "run"
    args = ["train", "vaihingen_mmadapter_vit_b", f"train.run_dir={run}", *ARGS, *TINY]
    assert main([*args, f"data.root={root}"]) == 0
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main([*args, f"data.root={tmp_path / 'elsewhere'}", "--overwrite"]) == 2  # the data is refused
    assert "data.root: folder" in capsys.readouterr().err
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before
    assert main([*args, f"data.root={root}", "--overwrite"]) == 0  # checked: the earlier run is replaced
    assert (run / "train.log").read_text().count("resolved config:") == 1
