"""Pictures (issue 13): after a tiny demo the figures exist, have sizes, and carry the class legend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("matplotlib")

from mmpeft_isprs.data import ISPRS
from mmpeft_isprs.demo import run_demo
from mmpeft_isprs.runner.figures import tile_figure


def test_tile_figure_has_five_panels_and_the_legend(tmp_path: Path, monkeypatch) -> None:
    saved: list = []
    from matplotlib.figure import Figure

    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (saved.append(self), real(self, *a, **k))[1])
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 6, (32, 32))
    truth[0] = 255
    path = tile_figure(tmp_path / "t.png", "t", rng.random((3, 32, 32)), rng.random((32, 32)), truth, truth, ISPRS)
    (fig,) = saved
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["input", "DSM", "ground truth", "prediction", "errors (0.0%)"]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == [*ISPRS.class_names, "error", "ignored"]
    assert Image.open(path).size == (1600, 420)


def test_demo_writes_and_lists_its_figures(tmp_path: Path) -> None:
    lines: list[str] = []
    run_demo(tmp_path / "demo", quick=True, overrides=["train.threads=1"], log=lines.append)
    text = "\n".join(lines)
    for run in ("optical_dsm", "optical"):
        figs = tmp_path / "demo" / run / "test" / "figures"
        sizes = {p.name: Image.open(p).size for p in figs.iterdir()}
        panels = 1600 if run == "optical_dsm" else 1280  # the modalities the model takes: no DSM for optical alone
        assert sizes == {"confusion.png": sizes["confusion.png"], "tile_5.png": (panels, 420)}
        w, h = sizes["confusion.png"]
        assert w >= 700 and h >= 600
        curves = tmp_path / "demo" / run / "figures" / "curves.png"
        assert Image.open(curves).size == (900, 360)
        assert f"training curves: {curves}" in text and str(figs) in text
    assert "figures: " in text
