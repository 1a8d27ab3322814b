"""The shape-only dry run (mmpeft.targeting.shapes) sees what the real one sees: the same input and
output shapes of every linear / attention / MLP module on several families, the same placements
and batch factors once wrapped; a model that cannot run on meta tensors falls back to the real
run with the reason logged, and is left exactly as it was. Plus the model's own input size and
channels (VOLO, GCViT, CoaT-lite, DaViT, NaFlexViT)."""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import mmpeft.targeting.inject as inject
from mmpeft import wrap_multimodal
from mmpeft.targeting.inputs import choose_size, infer_in_channels
from mmpeft.targeting.probe import ProbeError, dry_run
from tests.family_zoo import build
from tests.tiny_models import tiny_sam, tiny_timm_vit

MODS = ("optical", "dsm")
FAMILIES: dict[str, Callable[[], nn.Module]] = {
    "sam": tiny_sam,
    "timm_vit": tiny_timm_vit,
    **{
        k: functools.partial(build, k)
        for k in ("volo", "davit", "maxvit_rmlp", "cait", "naflexvit", "vit_relpos", "mobilevit")
    },
}


def _probed_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or n.endswith(("attn", "mlp"))]


@pytest.mark.parametrize("kind", FAMILIES)
def test_shape_only_dry_run_sees_what_the_real_one_sees(kind: str) -> None:
    model = FAMILIES[kind]()
    names = _probed_names(model)
    channels = infer_in_channels(model)
    assert channels == 3
    size = (64, 64) if kind in ("davit", "mobilevit") else choose_size(model, channels)  # any size: a small one
    shapes = dry_run(model, names, channels, size)
    real = dry_run(model, names, channels, size, shapes_only=False)
    assert shapes == real
    assert all(p.called for p in shapes.values() if not p.name.endswith("head"))


def _wrap(model: nn.Module, method: str, shapes_only: bool) -> dict[str, Any]:
    inject.dry_run = functools.partial(dry_run, shapes_only=shapes_only)  # type: ignore[assignment]
    try:
        wrapped = wrap_multimodal(model, MODS, method)
    finally:
        inject.dry_run = dry_run  # type: ignore[assignment]
    return {
        n: (type(layer).__name__, layer.batch_factor, layer.factor_size, getattr(layer, "in_features", None))
        for n, layer in wrapped.layers()
    }


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", ["lora", "adapter"])
@pytest.mark.parametrize("kind", ["sam", "volo", "maxvit_rmlp", "cait"])
def test_placements_identical_to_the_real_dry_runs(kind: str, method: str) -> None:
    base = FAMILIES[kind]()
    assert _wrap(copy.deepcopy(base), method, True) == _wrap(copy.deepcopy(base), method, False)


class _MakesCpuTensor(nn.Module):
    """A forward that makes a CPU tensor of its own (no meta run) and caches it."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 8, 8)
        self.fc = nn.Linear(8, 8)
        self.cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        self.cache = torch.ones(tokens.shape[1], 1)  # on the CPU: a meta run fails adding it
        return self.fc(tokens + self.cache)


def test_a_model_that_cannot_run_on_meta_falls_back_with_the_reason_logged(caplog: Any) -> None:
    model = _MakesCpuTensor()
    with caplog.at_level(logging.INFO, logger="mmpeft.targeting.probe"):
        probed = dry_run(model, ["fc"], 3, (32, 32))
    assert probed["fc"].shapes == (((1, 16, 8),), ((2, 16, 8),)) and probed["fc"].width == 8
    assert "shape-only dry run of _MakesCpuTensor failed" in caplog.text and "running it for real" in caplog.text
    assert model.cache is not None and model.cache.device.type == "cpu"  # the real run's cache, no meta left behind


def test_meta_attributes_set_during_the_shape_run_are_undone() -> None:
    class Caches(_MakesCpuTensor):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.patch(x).flatten(2).transpose(1, 2)
            self.cache = tokens.new_ones(tokens.shape[1], 1)  # on the input's device: meta in the shape run
            return self.fc(tokens * self.cache)

    model = Caches()
    dry_run(model, ["fc"], 3, (32, 32))
    assert model.cache is None  # the meta tensor cached on the module was removed


@pytest.mark.parametrize(("kind", "size"), [("volo", 64), ("coat_lite", 64), ("davit", 224), ("naflexvit", 384)])
def test_the_model_own_size_and_channels(kind: str, size: int) -> None:
    model = build(kind)
    assert infer_in_channels(model) == 3  # DaViT: not its depthwise cpe.proj (16 -> 16); NaFlexViT: a linear
    assert choose_size(model, 3) == (
        size,
        size,
    )  # VOLO: its position table; CoaT-lite: patch_embed1.img_size; DaViT: any (224); NaFlexViT: pretrained_cfg


def test_gcvit_size_from_its_stage_grid() -> None:
    model = build("gcvit")  # windows of 2, 2, 4, 2 cut from a 64 px input: 224 px does not run
    assert choose_size(model, 3) == (64, 64)  # stages[0].feat_size (16, 16) x a stem's usual stride 4
    with pytest.raises(RuntimeError):
        model(torch.rand(1, 3, 224, 224))


def test_a_failed_dry_run_names_the_probe_option() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    with pytest.raises(ProbeError, match=r"wrap_multimodal\(\.\.\., probe=\(H, W\)\), 224x224 was tried"):
        wrap_multimodal(net, MODS, "lora", targets=["2"])
