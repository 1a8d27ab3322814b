"""The application's data path, once: public core names only, one presence mask (one NaN check)
per forward, one layout per data module."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

import mmpeft
import mmpeft.backbones
from mmpeft import presence_tensor
from mmpeft_isprs.config import load_config
from mmpeft_isprs.data import Layout, generate_synthetic_vaihingen
from mmpeft_isprs.datamodule import ISPRSDataModule
from mmpeft_isprs.model import build_mfnet
from tests.isprs.test_layouts_real import make_mmhunan_archive

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = {"backbone": "vit_tiny", "embed_dim": 32, "depth": 2, "num_heads": 2, "decode_channels": 16,
              "window_size": 4, "decoder_heads": 2, "img_size": 64}  # fmt: skip
PUBLIC = {"mmpeft": set(mmpeft.__all__), "mmpeft.backbones": set(mmpeft.backbones.__all__)}


def core_imports(path: Path) -> list[str]:
    """Every import of the core in ``path`` that is not a public name, as 'file:line: what'."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):  # only ``import mmpeft`` (for mmpeft.__version__)
            bad += [f"{path.name}:{node.lineno}: import {a.name}" for a in node.names if a.name.startswith("mmpeft.")]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module == "mmpeft" or node.module.startswith("mmpeft."):
                names = {a.name for a in node.names}
                allowed = PUBLIC.get(node.module, set())
                bad += [f"{path.name}:{node.lineno}: from {node.module} import {n}" for n in sorted(names - allowed)]
    return bad


def test_the_application_imports_only_what_mmpeft_exports(tmp_path: Path) -> None:
    found = [b for p in sorted((ROOT / "mmpeft_isprs").rglob("*.py")) for b in core_imports(p)]
    assert found == []
    (tmp_path / "bad.py").write_text("from mmpeft.presence import masked_presence\nimport mmpeft.wrap\n"
                                     "from mmpeft import wrap_multimodal, _private\n")  # fmt: skip
    assert len(core_imports(tmp_path / "bad.py")) == 3  # the checker can fail


def _model(nonfinite: str = "error"):
    torch.manual_seed(0)
    model = build_mfnet(**TINY_MODEL, method="adapter", fusion="scalar").eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero adapters and lambdas: the branches mix
        for n, p in model.encoder.named_parameters():
            if p.requires_grad and "stem" not in n:
                p.copy_(torch.rand(p.shape, generator=g) * 0.6 + 0.2 if "lam" in n else torch.randn(p.shape, generator=g) * 0.05)
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
    assert torch.allclose(out, ref, atol=1e-6) and torch.allclose(alone, ref_alone, atol=1e-6)


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
    assert torch.allclose(out, ref, atol=1e-6)


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
    assert torch.allclose(out, batched, atol=1e-4)


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
        cfg = load_config({"data": {"dataset": "synthetic", "root": str(root), "synthetic": {"num_tiles": 3, "tile_size": 96}}})
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
