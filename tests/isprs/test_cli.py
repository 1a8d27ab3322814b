"""The mmpeft-isprs command line: help, clear errors, train -> eval -> predict, GeoTIFF outputs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mmpeft_isprs.cli import build_parser, main
from mmpeft_isprs.data import ISPRS, generate_synthetic_vaihingen, read_geotags, read_image
from tests.isprs.runs import TINY_SYNTHETIC, synthetic_config_file


@pytest.mark.parametrize(
    "command", [[], ["train"], ["eval"], ["predict"], ["demo"], ["generate-synthetic"], ["list-configs"]]
)
def test_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mmpeft-isprs")
    assert "key=value" in out if command in (["train"], ["eval"], ["demo"]) else True


def test_module_entry_point_and_console_script() -> None:
    out = subprocess.run([sys.executable, "-m", "mmpeft_isprs", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "generate-synthetic" in out.stdout
    assert {a.dest for a in build_parser()._actions} >= {"command"}
    script = shutil.which("mmpeft-isprs", path=str(Path(sys.executable).parent))
    assert script is not None, "console script missing: pip install -e ."


def test_list_configs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list-configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 21 and any(line.startswith("vaihingen_mmadapter_vit_b ") and "83.24" in line for line in lines)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["train", "vaihingen_mmadaptor_vit_b"],
            "config file 'vaihingen_mmadaptor_vit_b' not found; did you mean vaihingen_mmadapter_vit_b",
        ),
        (["train", "demo", "train.lrr=0.1"], "unknown config key 'train.lrr'; did you mean 'train.lr'"),
        (["train", "demo", "train.batch_size=ten"], "train.batch_size: expected an integer, got 'ten'"),
        (
            ["train", "vaihingen_mmadapter_vit_b", "data.root=/nonexistent/vaihingen"],
            "data.root: folder /nonexistent/vaihingen not found",
        ),
        (
            ["eval", "demo", "--weights", "/nonexistent/best.safetensors"],
            "--weights: /nonexistent/best.safetensors not found",
        ),
        (
            ["predict", "--weights", "/nonexistent/w.safetensors", "--optical", "x.tif", "--out", "o"],
            "weights file /nonexistent/w.safetensors not found",
        ),
        (
            ["demo", "--checkpoint", "/nonexistent/sam_vit_b_01ec64.pth"],
            "--checkpoint: /nonexistent/sam_vit_b_01ec64.pth not found",
        ),
    ],
)
def test_errors_are_one_clear_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_missing_tiles_are_listed_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "vaihingen" / "top").mkdir(parents=True)
    assert (
        main(
            [
                "train",
                "vaihingen_mmadapter_vit_b",
                f"data.root={tmp_path / 'vaihingen'}",
                f"train.run_dir={tmp_path / 'run'}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "missing file(s)" in err and "top_mosaic_09cm_area1.tif" in err and "dsm_09cm_matching_area37.tif" in err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy model trained through the CLI on tiny synthetic data: (folder with data/ and run/)."""
    base = tmp_path_factory.mktemp("cli")
    cfg = synthetic_config_file(base)
    assert main(["train", str(cfg), f"train.run_dir={base / 'run'}", *TINY_SYNTHETIC]) == 0
    assert (
        main(
            [
                "eval",
                str(cfg),
                "--weights",
                str(base / "run" / "best.safetensors"),
                *TINY_SYNTHETIC,
                f"train.run_dir={base / 'run'}",
            ]
        )
        == 0
    )
    assert (base / "run" / "eval_test_stride32_average_eroded" / "metrics.json").is_file()
    return base


def test_predict_geotiff_in_georeferenced_geotiff_out(trained: Path) -> None:
    top = trained / "data" / "top" / "top_mosaic_09cm_area5.tif"
    dsm = trained / "data" / "dsm" / "dsm_09cm_matching_area5.tif"
    out = trained / "pred_geo"
    assert (
        main(
            [
                "predict",
                "--weights",
                str(trained / "run" / "best.safetensors"),
                "--optical",
                str(top.parent),
                "--dsm",
                str(dsm.parent),
                "--out",
                str(out),
                "--stride",
                "32",
            ]
        )
        == 0
    )
    names = {p.name for p in out.iterdir()}
    stems = {p.stem for p in top.parent.glob("*.tif")}
    assert names == {f"{s}_{kind}" for s in stems for kind in ("pred.tif", "colour.tif", "colour.png")}
    index = read_image(out / "top_mosaic_09cm_area5_pred.tif")
    assert index.shape == (96, 96) and index.dtype == np.uint8 and index.max() < 6
    assert read_geotags(out / "top_mosaic_09cm_area5_pred.tif") == read_geotags(top)
    assert read_geotags(out / "top_mosaic_09cm_area5_colour.tif") == read_geotags(top)
    colour = np.asarray(Image.open(out / "top_mosaic_09cm_area5_colour.png"))
    assert colour.shape == (96, 96, 3)
    assert np.array_equal(colour, np.asarray(ISPRS.palette, dtype=np.uint8)[index])


def test_predict_plain_images_of_any_size(trained: Path) -> None:
    rng = np.random.default_rng(0)
    src = trained / "plain"
    src.mkdir()
    Image.fromarray(rng.integers(0, 255, (150, 70, 3), dtype=np.uint8)).save(src / "scene.png")  # not a window multiple
    Image.fromarray(rng.integers(0, 255, (150, 70), dtype=np.uint8)).save(src / "scene_dsm.png")
    out = trained / "pred_png"
    assert (
        main(
            [
                "predict",
                "--weights",
                str(trained / "run" / "best.safetensors"),
                "--optical",
                str(src / "scene.png"),
                "--dsm",
                str(src / "scene_dsm.png"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["scene_colour.png", "scene_pred.png"]
    index = np.asarray(Image.open(out / "scene_pred.png"))
    assert index.shape == (150, 70) and index.max() < 6


def test_predict_needs_the_dsm(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    top = trained / "data" / "top" / "top_mosaic_09cm_area5.tif"
    assert (
        main(
            [
                "predict",
                "--weights",
                str(trained / "run" / "best.safetensors"),
                "--optical",
                str(top),
                "--out",
                str(trained / "x"),
            ]
        )
        == 2
    )
    assert "give --dsm as well" in capsys.readouterr().err


def test_generate_synthetic_refuses_a_foreign_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["generate-synthetic", str(tmp_path), "--num-tiles", "3", "--tile-size", "64"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert generate_synthetic_vaihingen(tmp_path / "new", num_tiles=3, tile_size=64)["splits"]["test"] == ["5"]


def test_demo_quick_with_a_sam_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`demo --quick --checkpoint FILE`: the SAM file is loaded (backbone from its name), both runs
    train and are scored, colour maps and the side-by-side table are written."""
    import torch

    from mmpeft.backbones import SAM_SPECS
    from tests.tiny_models import official_sam_state as official_state

    ckpt = tmp_path / "sam_vit_tiny_random.pth"
    torch.save(official_state(SAM_SPECS["vit_tiny"]), ckpt)
    assert main(["demo", "--quick", "--checkpoint", str(ckpt), "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "=== test tiles: optical+DSM vs optical ===" in out and "DSM gain: mIoU" in out
    summary = yaml.safe_load((tmp_path / "demo" / "demo_summary.json").read_text())
    assert summary["checkpoint"] == str(ckpt) and set(summary["runs"]) == {"optical+dsm", "optical"}
    for run in ("optical_dsm", "optical"):
        assert (tmp_path / "demo" / run / "test" / "predictions" / "5_colour.png").is_file()
        assert "vit_tiny" in (tmp_path / "demo" / run / "config.yaml").read_text()


def test_predict_refuses_a_modality_given_twice_and_a_stray_dsm() -> None:
    from types import SimpleNamespace

    from mmpeft_isprs.config import ConfigError
    from mmpeft_isprs.predict import _sources

    two = SimpleNamespace(modalities=("optical", "dsm"))
    with pytest.raises(ConfigError, match=r"'optical' is given twice, by --optical and --input optical="):
        _sources(two, {}, ["A"], ["D"], {"optical": ["B"]})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"'dsm' is given twice, by --dsm and --input dsm="):
        _sources(two, {}, ["A"], ["D"], {"dsm": ["E"]})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"--dsm: this model has no dsm modality"):
        _sources(SimpleNamespace(modalities=("optical",)), {}, ["A"], ["D"], {})  # type: ignore[arg-type]
