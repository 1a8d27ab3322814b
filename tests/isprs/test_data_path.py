"""The application's data path, once: one presence mask (one NaN check) per forward, one layout
per data module, one evaluation path (``--subsets`` included) that opens the weights file once
and prints progress lines with an ETA."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

import mmpeft
import mmpeft_isprs.evaluate
import mmpeft_isprs.task.evaluation
import mmpeft_isprs.task.subsets
from mmpeft import presence_tensor
from mmpeft_isprs.cli import main
from mmpeft_isprs.config import load_config
from mmpeft_isprs.data import Layout, generate_synthetic_vaihingen
from mmpeft_isprs.datamodule import ISPRSDataModule
from mmpeft_isprs.model import build_mfnet
from mmpeft_isprs.runner.progress import EvalProgress
from mmpeft_isprs.task import save_trained
from tests.helpers import close
from tests.isprs.archives import make_mmhunan_archive
from tests.isprs.runs import TINY_MFNET, mixing_mfnet


def _model(nonfinite: str = "error"):
    model = mixing_mfnet()
    model.encoder.set_nonfinite(nonfinite)
    return model


def _count_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the core's NaN / inf checks: patch ``check_finite`` in the module that defines it
    (where the core's presence code looks it up)."""
    module = sys.modules[mmpeft.check_finite.__module__]
    original, calls = module.check_finite, []

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "check_finite", counted)
    return calls


def _reference(model, x, presence=None):
    """MFNet's forward by hand from its parts: the encoder (checking its inputs itself), the DFM over
    the present branches with the per-sample mask, the decoder."""
    names = [m for m in model.modalities if m in x]
    feats = model.encoder(x, presence=presence)
    b = x[names[0]].shape[0]
    mask = None if presence is None else presence_tensor(presence, names, b, x[names[0]].device)
    levels = model.dfm([feats[m] for m in names], [model.modalities.index(m) for m in names], mask)
    return model.decoder(levels, model.config.size)


@pytest.mark.parametrize("nonfinite", ["error", "absent"])
def test_one_nan_check_per_forward_and_unchanged_outputs(nonfinite: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(nonfinite)
    g = torch.Generator().manual_seed(0)
    x = {"optical": torch.rand(3, 3, 64, 64, generator=g), "dsm": torch.rand(3, 1, 64, 64, generator=g)}
    with torch.no_grad():
        ref = _reference(model, x)
        ref_alone = _reference(model, {"optical": x["optical"]})
        calls = _count_checks(monkeypatch)
        out = model(x)
        assert len(calls) == 1
        alone = model({"optical": x["optical"]})
        assert len(calls) == 2
    assert close(out, ref, rel=1e-5) and close(alone, ref_alone, rel=1e-5)


def test_nan_as_absent_is_checked_once_and_matches_the_explicit_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("absent")
    g = torch.Generator().manual_seed(0)
    x = {"optical": torch.rand(3, 3, 64, 64, generator=g), "dsm": torch.rand(3, 1, 64, 64, generator=g)}
    presence = {"dsm": torch.tensor([True, False, True])}
    with torch.no_grad():
        ref = _reference(model, x, presence)
        bad = {**x, "dsm": x["dsm"].clone()}
        bad["dsm"][1, 0, 5, 5] = float("nan")
        calls = _count_checks(monkeypatch)
        out = model(bad)
    assert len(calls) == 1 and torch.isfinite(out).all()
    assert close(out, ref, rel=1e-5)


def test_the_check_is_off_when_the_pipeline_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("off")
    calls = _count_checks(monkeypatch)
    with torch.no_grad():
        model({"optical": torch.rand(1, 3, 64, 64), "dsm": torch.rand(1, 1, 64, 64)})
    assert calls == []


def test_per_modality_execution_checks_once_and_restores_the_action(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("error")
    model.config.execution = "per_modality"
    g = torch.Generator().manual_seed(0)
    x = {"optical": torch.rand(2, 3, 64, 64, generator=g), "dsm": torch.rand(2, 1, 64, 64, generator=g)}
    calls = _count_checks(monkeypatch)
    with torch.no_grad():
        out = model(x)
        model.config.execution = "batched"
        batched = model(x)
    assert len(calls) == 2 and model.encoder.nonfinite == "error"
    assert close(out, batched, rel=1e-4)


def _count_layouts(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every layout constructed (every layout class runs ``Layout.__init__``)."""
    original, made = Layout.__init__, []

    def counted(self, *args, **kwargs):
        made.append(type(self).__name__)
        original(self, *args, **kwargs)

    monkeypatch.setattr(Layout, "__init__", counted)
    return made


@pytest.mark.parametrize("dataset", ["synthetic", "mmhunan"])
def test_setup_builds_the_layout_once(dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / dataset
    if dataset == "mmhunan":  # its setup also logs the split sizes and where they come from
        make_mmhunan_archive(root, 8)
        cfg = load_config("mmhunan_mmlora_vit_b", [f"data.root={root}", "data.val_fraction=0.25", "data.cache=false"])
    else:
        generate_synthetic_vaihingen(root, num_tiles=3, tile_size=96)
        cfg = load_config(
            {"data": {"dataset": "synthetic", "root": str(root), "synthetic": {"num_tiles": 3, "tile_size": 96}}}
        )
    made, lines = _count_layouts(monkeypatch), []
    dm = ISPRSDataModule(cfg, log=lines.append)
    dm.setup()
    assert made == ["MMHunanLayout" if dataset == "mmhunan" else "VaihingenLayout"]
    assert dm.train_tiles is not None and dm.val_tiles is not None and len(dm.val_tiles.ids) >= 1
    test = dm.tiles("test")  # evaluation's tiles reuse it too
    assert len(made) == 1 and test.layout is dm.layout and dm.train_tiles.layout is dm.layout
    if dataset == "mmhunan":
        assert any(line.startswith("data: mmhunan split from seeded ratio") for line in lines), lines


def test_generating_the_synthetic_set_builds_one_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made = _count_layouts(monkeypatch)
    manifest = generate_synthetic_vaihingen(tmp_path / "s", num_tiles=3, tile_size=64)
    assert made == ["VaihingenLayout"] and len(manifest["files"]) == 12


# ------------------------------------------------------------------ one eval path
PROGRESS = re.compile(r"^eval: (\d+)/(\d+) windows \(\d+%\), elapsed \S+, [\d.]+ windows/s, ETA \S+$")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny synthetic data set (1 test tile of 96 px: 4 windows of 64 at stride 32) and weights
    written as training writes them (random frozen encoder, rebuilt from the stored seed)."""
    tmp = tmp_path_factory.mktemp("eval")
    generate_synthetic_vaihingen(tmp / "data", num_tiles=3, tile_size=96)
    cfg = load_config(
        {
            "name": "tiny",
            "data": {"dataset": "synthetic", "root": str(tmp / "data"), "synthetic": {"num_tiles": 3, "tile_size": 96}},
            "model": TINY_MFNET,
            "train": {"run_dir": str(tmp / "run")},
            "eval": {"stride": 32, "val_stride": 64, "batch_size": 1},
        }
    )
    torch.manual_seed(cfg.train.seed)
    save_trained(build_mfnet(cfg.model), tmp / "best.safetensors", cfg, epoch=1, metrics=None)
    return tmp, tmp / "best.safetensors"


def _count_opens(monkeypatch: pytest.MonkeyPatch, path: Path) -> list[str]:
    """Opens of ``path`` by any safetensors reader the application holds (patched where it looks them up)."""
    opened: list[str] = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("mmpeft_isprs"):
            continue
        for attr in ("safe_open", "load_file"):
            original = getattr(module, attr, None)
            if original is None or not callable(original):
                continue

            def counted(target, *args, _original=original, _name=name, **kwargs):
                if Path(target).resolve() == path.resolve():
                    opened.append(_name)
                return _original(target, *args, **kwargs)

            monkeypatch.setattr(module, attr, counted)
    return opened


@pytest.mark.parametrize("subsets", [False, True])
def test_eval_reads_the_weights_once_through_one_path(
    subsets: bool, trained: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp, weights = trained
    calls: list[bool] = []
    scored: list[tuple[str, ...]] = []
    evaluate, evaluate_tileset = mmpeft_isprs.evaluate.evaluate, mmpeft_isprs.task.evaluation.evaluate_tileset

    def spy_evaluate(*args, **kwargs):
        calls.append(kwargs.get("subsets", False))
        return evaluate(*args, **kwargs)

    def spy_tileset(model, *args, **kwargs):
        scored.append(tuple(model.modalities))
        return evaluate_tileset(model, *args, **kwargs)

    monkeypatch.setattr(mmpeft_isprs.evaluate, "evaluate", spy_evaluate)
    monkeypatch.setattr(mmpeft_isprs.task.subsets, "evaluate_tileset", spy_tileset)
    opened = _count_opens(monkeypatch, weights)
    out_dir = tmp / f"out_{subsets}"
    assert (
        main(["eval", "tiny", "--weights", str(weights), "--out", str(out_dir), *(["--subsets"] if subsets else [])])
        == 0
    )
    assert len(opened) == 1, opened
    assert calls == [subsets]  # the same function, --subsets or not
    assert scored == ([("optical", "dsm"), ("optical",), ("dsm",)] if subsets else [("optical", "dsm")])
    assert json.loads((out_dir / "metrics.json").read_text())["weights"] == str(weights)
    assert (out_dir / "subsets.json").is_file() == subsets
    lines = [line for line in capsys.readouterr().out.splitlines() if PROGRESS.match(line)]
    counts = [tuple(map(int, PROGRESS.match(line).groups())) for line in lines]  # type: ignore[union-attr]
    total = 12 if subsets else 4  # one 96 px tile: 2 x 2 windows of 64 at stride 32, per subset
    assert counts and all(t == total for _, t in counts) and counts[-1][0] == total
    assert [d for d, _ in counts] == sorted({d for d, _ in counts})  # increasing, no repeats


def test_eval_progress_lines_by_count_and_by_time() -> None:
    now, lines = [0.0], []
    progress = EvalProgress(lines.append, total=100, every_s=10.0, clock=lambda: now[0])
    for _ in range(4):  # 4 windows in 4 s: no tenth crossed, no 10 s silence yet
        now[0] += 1.0
        progress(2)
    assert lines == []
    now[0] += 1.0
    progress(2)  # 10 of 100: a tenth
    assert lines == ["eval: 10/100 windows (10%), elapsed 5s, 2.0 windows/s, ETA 45s"]
    now[0] += 30.0
    progress(1)  # 11 of 100 after 30 s of silence: a line by time
    assert (
        len(lines) == 2
        and lines[1].startswith("eval: 11/100 windows (11%), elapsed 35s")
        and lines[1].endswith("0.3 windows/s, ETA 4m43s")
    )  # 89 left at 11/35 per s
    now[0] += 1.0
    progress(89)
    assert lines[-1].startswith("eval: 100/100 windows (100%)") and lines[-1].endswith("ETA 0s")
