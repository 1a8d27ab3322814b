"""``unload()``: the base model back, adapters dropped, nothing merged (peft's ``unload``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmpeft import wrap_multimodal
from tests.helpers import close
from tests.tiny_models import tiny_sam, tiny_timm_vit

MODS = ("optical", "dsm")


def _randomise(model: nn.Module, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize(("build", "size", "preset"), [(tiny_timm_vit, 32, "mmlora"), (tiny_sam, 64, "lora")])
def test_unload_gives_back_the_modules_passed_in_with_their_flags(build, size: int, preset: str) -> None:
    base = build()
    base.pos_embed.requires_grad_(False)  # a flag of the user's that must come back as it was
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    modules = {n: m for n, m in base.named_modules()}
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        want = base(x)
    save = ["head"] if build is tiny_timm_vit else ["neck"]
    w = wrap_multimodal(base, MODS, preset=preset, modules_to_save=save)
    _randomise(w)
    if preset == "lora":
        w.merge_adapters()  # merged copies are dropped too: the frozen weights were never written
    with torch.no_grad():
        assert not close(w({"optical": x, "dsm": x})["optical"], want, rel=1e-08)  # the adapters change it
    plain = w.unload()
    assert plain is base
    assert {n: m for n, m in plain.named_modules()} == modules  # the very same module objects
    assert all(type(m).__module__.split(".")[0] != "mmpeft" for m in plain.modules())
    assert all("forward" not in vars(m) for m in plain.modules())  # no block feature left
    assert {n: p.requires_grad for n, p in plain.named_parameters()} == flags
    with torch.no_grad():
        assert torch.equal(plain(x), want)
    with pytest.raises(RuntimeError, match=r"unload\(\).*wrap_multimodal"):
        w({"optical": x, "dsm": x})
