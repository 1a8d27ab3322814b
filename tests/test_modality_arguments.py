"""set_modality_arguments on a model of one's own (no TerraTorch needed): each modality's own
argument reaches its patch embedding inside the wrapped forward, and the per-modality reference
(``mmpeft.reference_forward``), where such arguments cannot act, refuses instead of embedding every
modality with the model's own argument (46 % off on Clay, silently)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mmpeft import reference_forward, set_modality_arguments, wrap_multimodal
from tests.helpers import assert_close


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(2, 8, 4, 4)

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2) * gain


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = Embed()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(x))


def test_each_modality_gets_its_argument_and_the_reference_refuses() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    wrapped = wrap_multimodal(model, ("optical", "sar"), "lora", targets=["fc"], fusion="none")
    handle = set_modality_arguments(wrapped, "embed", {"sar": {"gain": 3.0}})
    x = {"optical": torch.rand(2, 2, 16, 16), "sar": torch.rand(2, 2, 16, 16)}
    with torch.no_grad():
        out = wrapped(x)
        assert_close(out["sar"], model.fc.base_layer(model.embed(x["sar"], gain=3.0)), rel=1e-6)
        assert_close(out["optical"], model.fc.base_layer(model.embed(x["optical"])), rel=1e-6)
        with pytest.raises(RuntimeError, match=r"set_modality_arguments on \['embed'\] do not act"):
            reference_forward(wrapped, x)
        handle.remove()
        ref = reference_forward(wrapped, x)
    assert_close(ref["optical"], out["optical"], rel=1e-6)
