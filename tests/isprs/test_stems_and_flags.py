"""Stems checked against the bands when the config is read, and ``predict``'s modality flags with
one meaning when repeated (issue 30, items 6 and 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mmpeft_isprs.cli import main
from mmpeft_isprs.config import ConfigError, load_config

MS = [
    "data.files.ms=ms/ms_area{id}.tif",
    "data.modalities.ms.bands=[0,1,2,3,4,5,6,7,8,9,10,11]",
    "model.modalities=[optical, ms, dsm]",
]


def test_a_twelve_band_modality_without_a_fitting_stem_names_model_stems_and_adapt() -> None:
    with pytest.raises(ConfigError) as err:
        load_config("vaihingen_mmadapter_vit_b", MS)
    text = str(err.value)
    assert text.startswith("model.stems.ms:") and "12 band(s)" in text and "model.stems.ms=[adapt, 12]" in text
    assert "conv1x1" in text and "data.modalities.ms.bands" in text
    with pytest.raises(
        ConfigError, match=r"model\.stems\.ms: .*\[adapt, 8\].*12 band\(s\).*model\.stems\.ms=\[adapt, 12\]"
    ):
        load_config("vaihingen_mmadapter_vit_b", [*MS, "model.stems={ms: [adapt, 8]}"])
    with pytest.raises(ConfigError, match=r"model\.stems\.ms: a 'repeat' stem.*12 band\(s\)"):
        load_config("vaihingen_mmadapter_vit_b", [*MS, "model.stems={ms: repeat}"])
    with pytest.raises(ConfigError, match=r"model\.stems\.ms: an 'identity' stem"):
        load_config("vaihingen_mmadapter_vit_b", [*MS, "model.stems={ms: identity}"])


def test_fitting_stems_and_unknown_band_counts_pass() -> None:
    for stem in ("[adapt, 12]", "[conv1x1, 12]", "{kind: adapt, in_channels: 12}"):
        load_config("vaihingen_mmadapter_vit_b", [*MS, f"model.stems={{ms: {stem}}}"])
    load_config("potsdam_rgb_nir_dsm_mmadapter_vit_b")  # nir: one band, repeated (the default)
    load_config("vaihingen_mmadapter_vit_b", ["model.stems={dsm: repeat}"])
    # bands unknown until the files are read (all bands of a new role): checked at the first step
    load_config("vaihingen_mmadapter_vit_b", ["data.files.sar=sar/{id}.tif", "model.modalities=[optical, sar]"])
    with pytest.raises(ConfigError, match=r"model\.stems\.nir: .*\[adapt, 2\].*1 band"):
        load_config("potsdam_rgb_nir_dsm_mmadapter_vit_b", ["model.stems={nir: [adapt, 2]}"])


# ------------------------------------------------------------------ predict's modality flags


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []

    def fake(weights, optical, dsm, out_dir, options=None, device="cpu", log=print, inputs=None):  # type: ignore[no-untyped-def]
        seen.append(
            {"optical": list(optical), "dsm": list(dsm), "inputs": {k: list(v) for k, v in (inputs or {}).items()}}
        )
        return []

    monkeypatch.setattr("mmpeft_isprs.predict.predict_files", fake)
    return seen


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--optical", "a", "--optical", "b"], {"optical": ["a", "b"]}),
        (["--optical", "a", "b"], {"optical": ["a", "b"]}),
        (["--optical", "a", "--dsm", "x", "--dsm", "y"], {"optical": ["a"], "dsm": ["x", "y"]}),
        (["--input", "optical=a", "--input", "optical=b"], {"inputs": {"optical": ["a", "b"]}}),
        (["--optical", "a", "--input", "nir=x", "--input", "nir=y"], {"optical": ["a"], "inputs": {"nir": ["x", "y"]}}),
    ],
)
def test_a_repeated_modality_flag_pools_its_files_in_every_spelling(
    argv: list[str], expected: dict, calls: list
) -> None:
    assert main(["predict", "--weights", "w.safetensors", "--out", "o", *argv]) == 0
    got = calls[0]
    assert got == {"optical": [], "dsm": [], "inputs": {}, **expected}


@pytest.mark.parametrize(
    "argv,flags",
    [
        (["--optical", "a", "--input", "optical=b"], "--optical and --input optical="),
        (["--dsm", "a", "--input", "dsm=b", "--optical", "c"], "--dsm and --input dsm="),
    ],
)
def test_one_modality_by_two_flags_is_an_error(argv: list[str], flags: str, calls: list, capsys) -> None:
    assert main(["predict", "--weights", "w.safetensors", "--out", "o", *argv]) == 2
    assert f"given twice, by {flags}" in capsys.readouterr().err and not calls


def test_repeated_optical_predicts_every_tile(tmp_path: Path, capsys) -> None:
    """End to end: ``--optical A --optical B`` writes the maps of both tiles (it kept only B)."""
    from tests.isprs.archives import TINY, make_vaihingen_archive

    root, run = tmp_path / "v", tmp_path / "run"
    make_vaihingen_archive(root, ["1", "5", "7"])
    assert (
        main(
            [
                "train",
                "vaihingen_mmadapter_vit_b",
                f"data.root={root}",
                f"train.run_dir={run}",
                "data.splits={train: [1, 7], test: [5]}",
                "data.val_fraction=0",
                *TINY,
            ]
        )
        == 0
    )
    top, out = root / "top", tmp_path / "pred"
    files = [str(top / f"top_mosaic_09cm_area{i}.tif") for i in ("1", "5", "7")]
    assert (
        main(
            [
                "predict",
                "--weights",
                str(run / "best.safetensors"),
                "--optical",
                files[0],
                "--optical",
                files[1],
                "--optical",
                files[2],
                "--dsm",
                str(root / "dsm"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert len(list(out.glob("*_colour.png"))) == 3
    assert "wrote" in capsys.readouterr().out


def test_a_stem_that_does_not_fit_the_files_is_named_before_training(tmp_path: Path, capsys) -> None:
    """All bands of a new role (unknown to the config): checked against the first tile's file
    when the data is opened, before the first step."""
    import numpy as np

    from mmpeft_isprs.data import write_tiff
    from tests.isprs.archives import SIZE, TINY, make_vaihingen_archive

    root, run = tmp_path / "v", tmp_path / "run"
    make_vaihingen_archive(root, ["1", "5"])
    for i in ("1", "5"):
        write_tiff(root / "sar" / f"sar_area{i}.tif", np.zeros((SIZE, SIZE, 2), np.float32))
    args = [f"data.root={root}", f"train.run_dir={run}", "data.files.sar=sar/sar_area{id}.tif", *TINY]
    args += ["data.splits={train: [1], test: [5]}", "data.val_fraction=0", "model.modalities=[optical, sar]"]
    assert main(["train", "vaihingen_mmadapter_vit_b", *args]) == 2
    err = capsys.readouterr().err
    assert "model.stems.sar: no stem fits" in err and f"(all bands of {root / 'sar' / 'sar_area1.tif'})" in err
    assert "model.stems.sar=[adapt, 2]" in err and not run.exists()
